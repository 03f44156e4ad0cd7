//! A plain tensor (dims, element type, little-endian bytes) — the shape wasi:nn uses — and its
//! conversion to and from tract.

use tract_onnx::prelude::{DatumType, Tensor as TractTensor};

use crate::EngineError;

/// Element types that cross the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F16,
    F32,
    F64,
    BF16,
    U8,
    I32,
    I64,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    fn datum(self) -> Option<DatumType> {
        Some(match self {
            DType::F16 => DatumType::F16,
            DType::F32 => DatumType::F32,
            DType::F64 => DatumType::F64,
            DType::U8 => DatumType::U8,
            DType::I32 => DatumType::I32,
            DType::I64 => DatumType::I64,
            DType::BF16 => return None,
        })
    }

    fn from_datum(dt: DatumType) -> Option<DType> {
        Some(match dt {
            DatumType::F16 => DType::F16,
            DatumType::F32 => DType::F32,
            DatumType::F64 => DType::F64,
            DatumType::U8 => DType::U8,
            DatumType::I32 => DType::I32,
            DatumType::I64 => DType::I64,
            _ => return None,
        })
    }
}

/// A dense tensor: `data` holds `dims.product()` elements of `dtype`, little-endian.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dims: Vec<usize>,
    pub dtype: DType,
    pub data: Vec<u8>,
}

impl Tensor {
    /// Checks that the byte length matches the dims and type.
    pub fn new(dims: Vec<usize>, dtype: DType, data: Vec<u8>) -> Result<Tensor, EngineError> {
        // Checked: the dims are the caller's, and a product that wraps could match a short buffer.
        let Some(want) = dims.iter().try_fold(dtype.size(), |n, &d| n.checked_mul(d)) else {
            return Err(EngineError::InvalidInput(format!(
                "tensor {dims:?} of {dtype:?} is too large"
            )));
        };
        if data.len() != want {
            return Err(EngineError::InvalidInput(format!(
                "tensor {dims:?} of {dtype:?} needs {want} bytes, got {}",
                data.len()
            )));
        }
        Ok(Tensor { dims, dtype, data })
    }

    pub fn from_i64(dims: Vec<usize>, values: &[i64]) -> Tensor {
        Tensor {
            dims,
            dtype: DType::I64,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    pub fn from_f32(dims: Vec<usize>, values: &[f32]) -> Tensor {
        // Byte for byte into a buffer of the right size (a copy the compiler vectorizes; a
        // collected flat_map grows its buffer and costs ~2 ns a value, 0.5 ms per 262k logits).
        let mut data = vec![0u8; values.len() * 4];
        for (bytes, v) in data.chunks_exact_mut(4).zip(values) {
            bytes.copy_from_slice(&v.to_le_bytes());
        }
        Tensor {
            dims,
            dtype: DType::F32,
            data,
        }
    }

    /// The elements as i64 (for I64 and I32 tensors).
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        match self.dtype {
            DType::I64 => Some(
                self.data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            DType::I32 => Some(
                self.data
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                    .collect(),
            ),
            _ => None,
        }
    }

    /// The elements as f32 (for F32 tensors).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        (self.dtype == DType::F32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        })
    }

    pub(crate) fn to_tract(&self) -> Result<TractTensor, EngineError> {
        let dt = self.dtype.datum().ok_or_else(|| {
            EngineError::InvalidInput(format!("{:?} tensors are not supported", self.dtype))
        })?;
        // SAFETY: the byte length was checked against dims and type in `Tensor::new`, and tract copies
        // the bytes into an aligned buffer; every bit pattern is a valid value of these numeric types.
        unsafe { TractTensor::from_raw_dt(dt, &self.dims, &self.data) }
            .map_err(|e| EngineError::InvalidInput(format!("{e:#}")))
    }

    pub(crate) fn from_tract(t: &TractTensor) -> Result<Tensor, EngineError> {
        let dtype = DType::from_datum(t.datum_type()).ok_or_else(|| {
            EngineError::Runtime(format!(
                "output of type {:?} is not supported",
                t.datum_type()
            ))
        })?;
        let data = t.as_bytes().to_vec();
        Ok(Tensor {
            dims: t.shape().to_vec(),
            dtype,
            data,
        })
    }
}
