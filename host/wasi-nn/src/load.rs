//! Graph loading as both wasi:nn implementations report it.

use std::path::Path;

use slm_engine::{Model, Placement};

use crate::{catch_panic, ErrorKind, NnError};

/// wasi:nn `execution-target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Cpu,
    Gpu,
    Tpu,
}

/// The start of the message a guest gets when it asks for the GPU and there is none.
pub const NO_GPU: &str = "no usable GPU";

/// A `gpu` target that cannot be served, and why (a build without GPU support, no driver, a
/// missing CUDA library, no device, `--device cpu`, wasi:nn inside wasm).
pub fn no_gpu(why: impl std::fmt::Display) -> NnError {
    NnError::new(ErrorKind::UnsupportedOperation, format!("{NO_GPU}: {why}"))
}

impl Target {
    /// The error for a target this implementation does not run.
    pub fn unsupported(self, why: impl std::fmt::Display) -> NnError {
        match self {
            Target::Gpu => no_gpu(why),
            Target::Cpu | Target::Tpu => NnError::new(
                ErrorKind::UnsupportedOperation,
                format!("the {self:?} execution target is not supported").to_lowercase(),
            ),
        }
    }
}

/// `graph.load`: exactly one builder, the ONNX file's bytes. A file that does not parse is the
/// caller's error; so is one on which the CPU engine panics (tract's ONNX front end indexes some
/// malformed graphs unchecked), caught here: the bytes come from a guest. On the GPU a panic may
/// also be the driver's: a runtime error.
pub fn load_bytes<B: AsRef<[u8]>>(builders: &[B], placement: &Placement) -> Result<Model, NnError> {
    let [bytes] = builders else {
        return Err(NnError::invalid_argument(format!(
            "expected 1 graph builder (the ONNX file), got {}",
            builders.len()
        )));
    };
    match catch_panic(|| Model::from_bytes_on(bytes.as_ref(), placement)) {
        Ok(r) => r.map_err(|e| NnError::invalid_argument(e.to_string())),
        Err(panic) => {
            let kind = match placement {
                Placement::Cpu => ErrorKind::InvalidArgument,
                Placement::Gpu(_) => ErrorKind::RuntimeError,
            };
            let message = format!("cannot load model <bytes>: the engine failed: {panic}");
            Err(NnError::new(kind, message))
        }
    }
}

/// A model file of the models directory; it failing to load (a panic included) is the host's
/// error.
pub fn load_file(path: &Path) -> Result<Model, NnError> {
    catch_panic(|| Model::load(path))
        .map_err(|p| {
            format!(
                "cannot load model {}: the engine failed: {p}",
                path.display()
            )
        })
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(NnError::runtime)
}

/// `load-by-name`: a model name is one plain path component.
pub fn check_model_name(name: &str) -> Result<(), NnError> {
    if name.is_empty() || name.contains(['/', '\\', '\0']) || name.starts_with('.') {
        return Err(NnError::invalid_argument(format!(
            "invalid model name {name:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_path_component() {
        assert!(check_model_name("smollm2-135m-instruct").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a\\b", "a\0b"] {
            let e = check_model_name(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn load_failures_say_whose_fault() {
        let e = load_file(Path::new("/nonexistent/model.onnx")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::RuntimeError);
        assert!(
            e.message.contains("/nonexistent/model.onnx"),
            "{}",
            e.message
        );
        let e = load_bytes(&[b"not onnx"], &Placement::Cpu).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        let e = load_bytes::<&[u8]>(&[], &Placement::Cpu).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert_eq!(e.message, "expected 1 graph builder (the ONNX file), got 0");
    }

    #[test]
    fn unsupported_targets_are_unsupported_operations() {
        let e = Target::Tpu.unsupported("");
        assert_eq!(e.kind, ErrorKind::UnsupportedOperation);
        assert_eq!(e.message, "the tpu execution target is not supported");
        let e = Target::Gpu.unsupported("the host runs with --device cpu");
        assert_eq!(
            e.message,
            format!("{NO_GPU}: the host runs with --device cpu")
        );
    }
}
