//! A wasi:nn tensor as it crosses the boundary, and its checked conversion to the engine's.

use slm_engine::{DType, Tensor};

use crate::NnError;

/// What a wasi:nn `tensor` resource holds: dimensions, element type and little-endian bytes,
/// unchecked (the WIT constructor cannot fail; `compute` checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NnTensor {
    pub dimensions: Vec<u32>,
    pub ty: DType,
    pub data: Vec<u8>,
}

impl NnTensor {
    /// The engine tensor; a byte length that does not match the dimensions is the caller's error.
    pub fn into_engine(self) -> Result<Tensor, NnError> {
        let dims = self.dimensions.iter().map(|&d| d as usize).collect();
        Ok(Tensor::new(dims, self.ty, self.data)?)
    }

    /// An engine result as a wasi:nn tensor.
    pub fn from_engine(t: Tensor) -> Result<NnTensor, NnError> {
        let dimensions = t
            .dims
            .iter()
            .map(|&d| {
                u32::try_from(d).map_err(|_| NnError::runtime(format!("dimension {d} too large")))
            })
            .collect::<Result<Vec<u32>, _>>()?;
        Ok(NnTensor {
            dimensions,
            ty: t.dtype,
            data: t.data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn round_trips_through_the_engine() {
        let data: Vec<u8> = [3i64, 4].iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = NnTensor {
            dimensions: vec![1, 2],
            ty: DType::I64,
            data: data.clone(),
        };
        let engine = t.clone().into_engine().unwrap();
        assert_eq!(engine.to_i64().unwrap(), vec![3, 4]);
        assert_eq!(NnTensor::from_engine(engine).unwrap(), t);
    }

    #[test]
    fn wrong_byte_length_is_invalid_argument() {
        let t = NnTensor {
            dimensions: vec![1, 2],
            ty: DType::I64,
            data: vec![0; 8],
        };
        let e = t.into_engine().unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("needs 16 bytes, got 8"), "{}", e.message);
    }
}
