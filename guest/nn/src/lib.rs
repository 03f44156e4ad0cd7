//! wasi:nn@0.2.0-rc-2024-10-28, exported from a component: the same engine as the native host
//! (`slm-engine`, tract), so hosts without wasi:nn (Spin, jco, most edge platforms) run the models.
//!
//! Same contract as the host: an execution context keeps the KV cache; the caller sends only new
//! `input_ids` + `position_ids` and gets last-position `logits`. `load-by-name(<name>)` reads
//! `/models/<name>/model.onnx`; loaded graphs are cached for the life of the instance.

pub mod convert;

#[cfg(target_arch = "wasm32")]
mod component {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::Arc;

    use crate::convert::{self, Failure, Kind, Ty};

    wit_bindgen::generate!({ path: "../../wit", world: "edge:slm/nn-component" });

    use exports::wasi::nn::errors::{self, ErrorCode, GuestError};
    use exports::wasi::nn::graph::{
        self, ExecutionTarget, GraphBuilder, GraphEncoding, GuestGraph,
    };
    use exports::wasi::nn::inference::{self, GuestGraphExecutionContext, NamedTensor};
    use exports::wasi::nn::tensor::{self, GuestTensor, TensorData, TensorDimensions, TensorType};

    struct Component;
    export!(Component);

    /// Where `load-by-name` looks for models.
    const MODELS_DIR: &str = "/models";

    thread_local! {
        /// Graphs loaded by name, shared by every `graph` handle of this instance.
        static GRAPHS: RefCell<HashMap<String, Arc<slm_engine::Model>>> = RefCell::new(HashMap::new());
    }

    fn error(code: ErrorCode, message: impl Into<String>) -> errors::Error {
        errors::Error::new(NnError {
            code,
            message: message.into(),
        })
    }

    fn fail((kind, message): Failure) -> errors::Error {
        let code = match kind {
            Kind::InvalidArgument => ErrorCode::InvalidArgument,
            Kind::InvalidEncoding => ErrorCode::InvalidEncoding,
            Kind::UnsupportedOperation => ErrorCode::UnsupportedOperation,
            Kind::NotFound => ErrorCode::NotFound,
            Kind::RuntimeError => ErrorCode::RuntimeError,
        };
        error(code, message)
    }

    fn ty(t: TensorType) -> Ty {
        match t {
            TensorType::Fp16 => Ty::Fp16,
            TensorType::Fp32 => Ty::Fp32,
            TensorType::Fp64 => Ty::Fp64,
            TensorType::Bf16 => Ty::Bf16,
            TensorType::U8 => Ty::U8,
            TensorType::I32 => Ty::I32,
            TensorType::I64 => Ty::I64,
        }
    }

    fn tensor_type(t: Ty) -> TensorType {
        match t {
            Ty::Fp16 => TensorType::Fp16,
            Ty::Fp32 => TensorType::Fp32,
            Ty::Fp64 => TensorType::Fp64,
            Ty::Bf16 => TensorType::Bf16,
            Ty::U8 => TensorType::U8,
            Ty::I32 => TensorType::I32,
            Ty::I64 => TensorType::I64,
        }
    }

    pub struct NnError {
        code: ErrorCode,
        message: String,
    }

    impl GuestError for NnError {
        fn code(&self) -> ErrorCode {
            self.code
        }
        fn data(&self) -> String {
            self.message.clone()
        }
    }

    pub struct NnTensor {
        dimensions: Vec<u32>,
        ty: TensorType,
        data: Vec<u8>,
    }

    impl GuestTensor for NnTensor {
        fn new(dimensions: TensorDimensions, ty: TensorType, data: TensorData) -> Self {
            NnTensor {
                dimensions,
                ty,
                data,
            }
        }
        fn dimensions(&self) -> TensorDimensions {
            self.dimensions.clone()
        }
        fn ty(&self) -> TensorType {
            self.ty
        }
        fn data(&self) -> TensorData {
            self.data.clone()
        }
    }

    pub struct NnGraph {
        model: Arc<slm_engine::Model>,
    }

    impl GuestGraph for NnGraph {
        fn init_execution_context(
            &self,
        ) -> Result<inference::GraphExecutionContext, errors::Error> {
            let ctx = convert::Context::new(self.model.clone());
            Ok(inference::GraphExecutionContext::new(NnContext {
                ctx: RefCell::new(ctx),
            }))
        }
    }

    pub struct NnContext {
        ctx: RefCell<convert::Context>,
    }

    impl GuestGraphExecutionContext for NnContext {
        fn compute(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, errors::Error> {
            let mut named = Vec::with_capacity(inputs.len());
            for (name, t) in inputs {
                let t: NnTensor = t.into_inner();
                named.push((
                    name,
                    convert::to_engine(&t.dimensions, ty(t.ty), t.data).map_err(fail)?,
                ));
            }
            let outputs = self.ctx.borrow_mut().run(named).map_err(fail)?;
            let mut out = Vec::with_capacity(outputs.len());
            for (name, t) in outputs {
                let (dimensions, t, data) = convert::from_engine(t).map_err(fail)?;
                out.push((
                    name,
                    tensor::Tensor::new(NnTensor {
                        dimensions,
                        ty: tensor_type(t),
                        data,
                    }),
                ));
            }
            Ok(out)
        }
    }

    impl graph::Guest for Component {
        type Graph = NnGraph;

        fn load(
            builder: Vec<GraphBuilder>,
            encoding: GraphEncoding,
            target: ExecutionTarget,
        ) -> Result<graph::Graph, errors::Error> {
            if encoding != GraphEncoding::Onnx {
                return Err(error(
                    ErrorCode::InvalidEncoding,
                    format!("graph encoding {encoding:?} is not supported (only onnx)"),
                ));
            }
            match target {
                ExecutionTarget::Cpu => {}
                ExecutionTarget::Gpu => {
                    return Err(error(
                        ErrorCode::UnsupportedOperation,
                        "no GPU backend in wasi:nn inside wasm (use the cpu target)",
                    ))
                }
                ExecutionTarget::Tpu => {
                    return Err(error(
                        ErrorCode::UnsupportedOperation,
                        "the tpu execution target is not supported",
                    ))
                }
            }
            let [bytes] = builder.as_slice() else {
                return Err(error(
                    ErrorCode::InvalidArgument,
                    format!(
                        "expected 1 graph builder (the ONNX file), got {}",
                        builder.len()
                    ),
                ));
            };
            let model = convert::load_bytes(bytes).map_err(fail)?;
            Ok(graph::Graph::new(NnGraph {
                model: Arc::new(model),
            }))
        }

        fn load_by_name(name: String) -> Result<graph::Graph, errors::Error> {
            convert::check_name(&name).map_err(fail)?;
            if let Some(model) = GRAPHS.with(|g| g.borrow().get(&name).cloned()) {
                return Ok(graph::Graph::new(NnGraph { model }));
            }
            let path = std::path::PathBuf::from(format!("{MODELS_DIR}/{name}/model.onnx"));
            if !path.is_file() {
                return Err(error(
                    ErrorCode::NotFound,
                    format!("no model named {name:?} in {MODELS_DIR}"),
                ));
            }
            let model = Arc::new(convert::load_path(&path).map_err(fail)?);
            GRAPHS.with(|g| g.borrow_mut().insert(name, model.clone()));
            Ok(graph::Graph::new(NnGraph { model }))
        }
    }

    impl tensor::Guest for Component {
        type Tensor = NnTensor;
    }

    impl errors::Guest for Component {
        type Error = NnError;
    }

    impl inference::Guest for Component {
        type GraphExecutionContext = NnContext;
    }
}
