//! The CPU engine: the ONNX file streamed in (Q4_1 weights packed as they arrive), rewritten
//! onto our ops ([`crate::onnx`], [`crate::ops`]), parsed and optimized by tract.

use std::path::Path;

use tract_onnx::prelude::*;

use super::{decoder_inputs, io_names, Model};
use crate::onnx::nbits::NBitsStream;
use crate::onnx::proto;
use crate::{onnx, ops, EngineError};

/// The ONNX front end, with our quantized matmuls and fused attention.
fn front_end() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    ops::register(&mut onnx);
    onnx
}

/// Hands free heap pages back to the OS: after loading (the decoded protobuf, in pieces of a few
/// hundred KB that glibc keeps for reuse: ~10 MiB less resident for the process's life), and for
/// servers after a burst of long prompts. A no-op off glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim takes any pad and only returns unused heap memory to the
        // OS; no memory in use moves.
        unsafe { malloc_trim(0) };
    }
}

impl Model {
    /// Loads `model.onnx` (external data files next to it are found by tract).
    pub fn load(path: &Path) -> Result<Model, EngineError> {
        let name = path.display().to_string();
        if !path.is_file() {
            return Err(EngineError::load(&name, "file not found"));
        }
        let onnx = front_end();
        let mut q4 = NBitsStream::default();
        let proto = proto::read_path(path, &mut q4).map_err(|e| EngineError::load(&name, e))?;
        let dir = path.parent().and_then(|d| d.to_str());
        let model = Self::parse(&onnx, proto, q4, dir).map_err(|e| EngineError::load(&name, e))?;
        let model = Self::optimize(model, &name);
        release_free_memory();
        model
    }

    /// Loads an ONNX model from memory (wasi:nn `load` with the file's bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Model, EngineError> {
        let onnx = front_end();
        let mut q4 = NBitsStream::default();
        let proto =
            proto::read_bytes(bytes, &mut q4).map_err(|e| EngineError::load("<bytes>", e))?;
        let model =
            Self::parse(&onnx, proto, q4, None).map_err(|e| EngineError::load("<bytes>", e))?;
        let model = Self::optimize(model, "<bytes>");
        release_free_memory();
        model
    }

    /// Parses the protobuf after fusing its attention chains and moving its int8 and Q4_1
    /// weights into our quantized matmuls ([`onnx::rewrite`]).
    fn parse(
        onnx: &tract_onnx::Onnx,
        mut proto: tract_onnx::pb::ModelProto,
        q4: NBitsStream,
        dir: Option<&str>,
    ) -> TractResult<InferenceModel> {
        let weights = onnx::rewrite(&mut proto, q4);
        let parsed = ops::with_weights(weights, || onnx.parse(&proto, dir))?;
        drop(proto);
        if !parsed.unresolved_inputs.is_empty() {
            return Err(tract_onnx::tract_core::internal::format_err!(
                "could not resolve inputs {:?}",
                parsed.unresolved_inputs
            ));
        }
        Ok(parsed.model)
    }

    fn optimize(model: InferenceModel, name: &str) -> Result<Model, EngineError> {
        let io = io_names(&model).map_err(|e| EngineError::load(name, e))?;
        let mut typed = model
            .into_optimized()
            .map_err(|e| EngineError::load(name, e))?;
        // tract's float kernels differ by target: ours give every build the same logits.
        ops::deterministic::make_deterministic(&mut typed)
            .map_err(|e| EngineError::load(name, e))?;
        ops::arith::replace_adds_and_muls(&mut typed).map_err(|e| EngineError::load(name, e))?;
        ops::rope::fuse_rotations(&mut typed).map_err(|e| EngineError::load(name, e))?;
        ops::gelu::fuse_gelus(&mut typed).map_err(|e| EngineError::load(name, e))?;
        ops::deterministic::fuse_norm_weights(&mut typed)
            .map_err(|e| EngineError::load(name, e))?;
        let input_kinds = decoder_inputs(&io.0, name)?;
        Self::build(name, typed, io, input_kinds, |typed| typed.into_runnable())
    }
}
