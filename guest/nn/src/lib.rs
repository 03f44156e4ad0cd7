//! wasi:nn@0.2.0-rc-2024-10-28, exported from a component: the same engine as the native host
//! (`slm-engine`, tract), so hosts without wasi:nn (Spin, jco, most edge platforms) run the models.
//!
//! Only the export glue is here; tensors, errors and the stateful execution context are the
//! `slm-wasi-nn` crate's, shared with the native host, so both answer alike. `load-by-name(<name>)`
//! reads `/models/<name>/model.onnx`; loaded graphs are cached for the life of the instance.
//! `preload` fills that cache at build time (a baked component: `scripts/build --bake`).

#[cfg(target_arch = "wasm32")]
mod component {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::Arc;

    use slm_engine::{Model, Placement};
    use slm_wasi_nn::{ErrorKind, ExecContext, NnError, NnTensor, Target};

    wit_bindgen::generate!({ path: "../../wit", world: "edge:slm/nn-build" });

    use exports::wasi::nn::errors::{self, ErrorCode, GuestError};
    use exports::wasi::nn::graph::{
        self, ExecutionTarget, GraphBuilder, GraphEncoding, GuestGraph,
    };
    use exports::wasi::nn::inference::{self, GuestGraphExecutionContext, NamedTensor};
    use exports::wasi::nn::tensor::{self, GuestTensor, TensorData, TensorDimensions, TensorType};

    slm_wasi_nn::wit_conversions!(TensorType, ErrorCode, ExecutionTarget);

    struct Component;
    export!(Component);

    /// Where `load-by-name` looks for models.
    const MODELS_DIR: &str = "/models";

    thread_local! {
        /// Graphs loaded by name, shared by every `graph` handle of this instance.
        static GRAPHS: RefCell<HashMap<String, Arc<Model>>> = RefCell::new(HashMap::new());
    }

    fn error(e: NnError) -> errors::Error {
        errors::Error::new(NnErrorResource(e))
    }

    pub struct NnErrorResource(NnError);

    impl GuestError for NnErrorResource {
        fn code(&self) -> ErrorCode {
            to_error_code(self.0.kind)
        }
        fn data(&self) -> String {
            self.0.message.clone()
        }
    }

    pub struct NnTensorResource(NnTensor);

    impl GuestTensor for NnTensorResource {
        fn new(dimensions: TensorDimensions, ty: TensorType, data: TensorData) -> Self {
            let ty = to_dtype(ty);
            NnTensorResource(NnTensor {
                dimensions,
                ty,
                data,
            })
        }
        fn dimensions(&self) -> TensorDimensions {
            self.0.dimensions.clone()
        }
        fn ty(&self) -> TensorType {
            to_tensor_type(self.0.ty)
        }
        fn data(&self) -> TensorData {
            self.0.data.clone()
        }
    }

    pub struct NnGraph(Arc<Model>);

    impl GuestGraph for NnGraph {
        fn init_execution_context(
            &self,
        ) -> Result<inference::GraphExecutionContext, errors::Error> {
            let ctx = ExecContext::new(self.0.clone(), None);
            Ok(inference::GraphExecutionContext::new(NnContext(
                RefCell::new(ctx),
            )))
        }
    }

    pub struct NnContext(RefCell<ExecContext>);

    impl GuestGraphExecutionContext for NnContext {
        fn compute(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, errors::Error> {
            let inputs = inputs
                .into_iter()
                .map(|(name, t)| (name, t.into_inner::<NnTensorResource>().0))
                .collect();
            let outputs = self.0.borrow_mut().compute(inputs).map_err(error)?;
            Ok(outputs
                .into_iter()
                .map(|(name, t)| (name, tensor::Tensor::new(NnTensorResource(t))))
                .collect())
        }
    }

    impl graph::Guest for Component {
        type Graph = NnGraph;

        fn load(
            builders: Vec<GraphBuilder>,
            encoding: GraphEncoding,
            target: ExecutionTarget,
        ) -> Result<graph::Graph, errors::Error> {
            if encoding != GraphEncoding::Onnx {
                return Err(error(NnError::invalid_encoding(encoding)));
            }
            match to_target(target) {
                Target::Cpu => {}
                other => {
                    return Err(error(
                        other.unsupported("wasi:nn inside wasm runs on the cpu target only"),
                    ))
                }
            }
            let model = slm_wasi_nn::load_bytes(&builders, &Placement::Cpu).map_err(error)?;
            Ok(graph::Graph::new(NnGraph(Arc::new(model))))
        }

        fn load_by_name(name: String) -> Result<graph::Graph, errors::Error> {
            let model = graph_by_name(name).map_err(error)?;
            Ok(graph::Graph::new(NnGraph(model)))
        }
    }

    /// The model called `name`: from this instance's cache, else read from `/models` and cached.
    fn graph_by_name(name: String) -> Result<Arc<Model>, NnError> {
        slm_wasi_nn::check_model_name(&name)?;
        if let Some(model) = GRAPHS.with(|g| g.borrow().get(&name).cloned()) {
            return Ok(model);
        }
        let path = std::path::PathBuf::from(format!("{MODELS_DIR}/{name}/model.onnx"));
        if !path.is_file() {
            return Err(NnError::new(
                ErrorKind::NotFound,
                format!("no model named {name:?} in {MODELS_DIR}"),
            ));
        }
        let model = Arc::new(slm_wasi_nn::load_file(&path)?);
        GRAPHS.with(|g| g.borrow_mut().insert(name, model.clone()));
        Ok(model)
    }

    /// The build-time hook of a baked component (`scripts/build --bake`).
    impl Guest for Component {
        fn preload() {
            slm_preinit::preloading(|| {
                let names = model_dirs().unwrap_or_else(|e| panic!("preload: {e}"));
                if names.is_empty() {
                    panic!("preload: no model directory in {MODELS_DIR}");
                }
                for name in names {
                    if let Err(e) = graph_by_name(name.clone()) {
                        panic!("preload: model {name:?}: {}", e.message);
                    }
                }
            })
        }
    }

    /// The directories in `/models` that hold a `model.onnx`, by name.
    fn model_dirs() -> std::io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(MODELS_DIR)? {
            let entry = entry?;
            if entry.path().join("model.onnx").is_file() {
                names.extend(entry.file_name().to_str().map(str::to_string));
            }
        }
        names.sort();
        Ok(names)
    }

    impl tensor::Guest for Component {
        type Tensor = NnTensorResource;
    }

    impl errors::Guest for Component {
        type Error = NnErrorResource;
    }

    impl inference::Guest for Component {
        type GraphExecutionContext = NnContext;
    }
}
