//! The glue between wasi:nn values and slm-engine, free of generated bindings so it tests natively.
//!
//! Error kinds follow the native host (host/src/nn.rs + runtime.rs): the caller's bad tensors are
//! `InvalidArgument`, engine failures `RuntimeError`, unknown models `NotFound`.

use std::path::Path;
use std::sync::Arc;

use slm_engine::{DType, EngineError, Model, Session, Tensor};

/// The wasi:nn error codes this component reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InvalidArgument,
    InvalidEncoding,
    UnsupportedOperation,
    NotFound,
    RuntimeError,
}

pub type Failure = (Kind, String);

/// wasi:nn tensor types, by their WIT order (fp16, fp32, fp64, bf16, u8, i32, i64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Fp16,
    Fp32,
    Fp64,
    Bf16,
    U8,
    I32,
    I64,
}

pub fn to_dtype(t: Ty) -> DType {
    match t {
        Ty::Fp16 => DType::F16,
        Ty::Fp32 => DType::F32,
        Ty::Fp64 => DType::F64,
        Ty::Bf16 => DType::BF16,
        Ty::U8 => DType::U8,
        Ty::I32 => DType::I32,
        Ty::I64 => DType::I64,
    }
}

pub fn to_ty(t: DType) -> Ty {
    match t {
        DType::F16 => Ty::Fp16,
        DType::F32 => Ty::Fp32,
        DType::F64 => Ty::Fp64,
        DType::BF16 => Ty::Bf16,
        DType::U8 => Ty::U8,
        DType::I32 => Ty::I32,
        DType::I64 => Ty::I64,
    }
}

fn engine_failure(e: EngineError) -> Failure {
    let kind = match e {
        EngineError::InvalidInput(_) => Kind::InvalidArgument,
        _ => Kind::RuntimeError,
    };
    (kind, e.to_string())
}

/// A wasi:nn tensor (dims, type, bytes) as an engine tensor; the byte length is checked.
pub fn to_engine(dims: &[u32], ty: Ty, data: Vec<u8>) -> Result<Tensor, Failure> {
    let dims = dims.iter().map(|&d| d as usize).collect();
    Tensor::new(dims, to_dtype(ty), data).map_err(engine_failure)
}

/// An engine tensor as wasi:nn parts.
pub fn from_engine(t: Tensor) -> Result<(Vec<u32>, Ty, Vec<u8>), Failure> {
    let dims = t
        .dims
        .iter()
        .map(|&d| {
            u32::try_from(d).map_err(|_| (Kind::RuntimeError, format!("dimension {d} too large")))
        })
        .collect::<Result<Vec<u32>, _>>()?;
    Ok((dims, to_ty(t.dtype), t.data))
}

/// Loads a model file (`load-by-name`).
pub fn load_path(path: &Path) -> Result<Model, Failure> {
    Model::load(path).map_err(|e| (Kind::RuntimeError, e.to_string()))
}

/// Loads a model from the bytes of one graph builder (`load`).
pub fn load_bytes(bytes: &[u8]) -> Result<Model, Failure> {
    Model::from_bytes(bytes).map_err(|e| (Kind::InvalidArgument, e.to_string()))
}

/// A model name is one path component.
pub fn check_name(name: &str) -> Result<(), Failure> {
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err((
            Kind::InvalidArgument,
            format!("invalid model name {name:?}"),
        ));
    }
    Ok(())
}

/// One execution context: the stateful session (KV cache). After an engine failure the session
/// is not trusted again (as in the native host).
pub struct Context {
    session: Session,
    broken: bool,
}

impl Context {
    pub fn new(model: Arc<Model>) -> Context {
        Context {
            session: Session::new(model),
            broken: false,
        }
    }

    pub fn run(&mut self, inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>, Failure> {
        if self.broken {
            return Err((
                Kind::RuntimeError,
                "this execution context is unusable after an engine failure; create a new one"
                    .into(),
            ));
        }
        let vocab = self.session.model().info().vocab;
        for (name, t) in &inputs {
            if name != "input_ids" || vocab == 0 {
                continue;
            }
            if let Some(bad) = t
                .to_i64()
                .and_then(|ids| ids.into_iter().find(|&i| i < 0 || i as u64 >= vocab as u64))
            {
                return Err((
                    Kind::InvalidArgument,
                    format!("invalid input: input_ids: token id {bad} is out of range (vocabulary size {vocab})"),
                ));
            }
        }
        match self.session.run(inputs) {
            Ok(out) => Ok(out),
            Err(e @ EngineError::InvalidInput(_)) => Err(engine_failure(e)),
            Err(e) => {
                self.broken = true;
                Err(engine_failure(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip() {
        let data: Vec<u8> = [3i64, 4].iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = to_engine(&[1, 2], Ty::I64, data.clone()).unwrap();
        assert_eq!(t.to_i64().unwrap(), vec![3, 4]);
        assert_eq!(from_engine(t).unwrap(), (vec![1, 2], Ty::I64, data));
        for ty in [
            Ty::Fp16,
            Ty::Fp32,
            Ty::Fp64,
            Ty::Bf16,
            Ty::U8,
            Ty::I32,
            Ty::I64,
        ] {
            assert_eq!(to_ty(to_dtype(ty)), ty);
        }
    }

    #[test]
    fn wrong_byte_length_is_invalid_argument() {
        let (kind, msg) = to_engine(&[1, 2], Ty::I64, vec![0; 8]).unwrap_err();
        assert_eq!(kind, Kind::InvalidArgument);
        assert!(msg.contains("needs 16 bytes, got 8"), "{msg}");
    }

    #[test]
    fn names_are_one_path_component() {
        assert!(check_name("smollm2-135m-instruct").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a\\b"] {
            assert_eq!(
                check_name(bad).unwrap_err().0,
                Kind::InvalidArgument,
                "{bad}"
            );
        }
    }

    #[test]
    fn missing_model_is_a_clear_error() {
        let (kind, msg) = load_path(Path::new("/nonexistent/model.onnx")).unwrap_err();
        assert_eq!(kind, Kind::RuntimeError);
        assert!(msg.contains("/nonexistent/model.onnx"), "{msg}");
        assert_eq!(
            load_bytes(b"not onnx").unwrap_err().0,
            Kind::InvalidArgument
        );
    }
}
