//! The in-wasm wasi:nn (dist/slm-nn.wasm: the engine compiled to wasm32 with simd128) called
//! straight from the host, with no generator in the way: `slm logits --portable` reads its
//! logits step by step, to compare them bit for bit with the native engine's.
//!
//! The component gets what the portable apps give it: the models directory, read-only, at
//! `/models`, and nothing else.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _, Result};
use wasmtime::component::ResourceAny;
use wasmtime::Store;

use crate::registry::ModelRegistry;
use crate::runtime::{one_line, wasi_component, werr, HostState};

mod bindings {
    wasmtime::component::bindgen!({
        world: "nn-component",
        path: "../wit",
    });
}

use bindings::exports::wasi::nn::tensor::TensorType;
use bindings::NnComponent;

/// One instance of the in-wasm wasi:nn.
pub struct NnGuest {
    store: Store<HostState>,
    nn: NnComponent,
}

/// A graph execution context of the guest: one sequence with its KV cache.
pub struct GuestContext(ResourceAny);

impl NnGuest {
    pub fn new(component: &Path, registry: Arc<ModelRegistry>) -> Result<NnGuest> {
        let (engine, component, linker) = wasi_component(component)?;
        let mut store = Store::new(&engine, HostState::new(registry)?);
        let nn = NnComponent::instantiate(&mut store, &component, &linker)
            .map_err(|e| anyhow!("the wasi:nn component does not link: {}", one_line(&e)))?;
        Ok(NnGuest { store, nn })
    }

    /// The guest's error resource as "code: message" (and the resource dropped).
    fn error_text(&mut self, e: ResourceAny) -> String {
        let api = self.nn.wasi_nn_errors().error();
        let code = api.call_code(&mut self.store, e);
        let data = api.call_data(&mut self.store, e);
        let _ = e.resource_drop(&mut self.store);
        match (code, data) {
            (Ok(c), Ok(d)) => format!("{c:?}: {d}"),
            _ => "an error the component could not describe".into(),
        }
    }

    /// A fresh execution context on the model called `name` (`load-by-name`, then
    /// `init-execution-context`).
    pub fn context(&mut self, name: &str) -> Result<GuestContext> {
        let loaded = self
            .nn
            .wasi_nn_graph()
            .call_load_by_name(&mut self.store, name)
            .map_err(werr)?;
        let graph = match loaded {
            Ok(g) => g,
            Err(e) => bail!("loading {name:?} in wasm: {}", self.error_text(e)),
        };
        let ctx = self
            .nn
            .wasi_nn_graph()
            .graph()
            .call_init_execution_context(&mut self.store, graph)
            .map_err(werr)?;
        // The context keeps the model alive inside the guest; the handle is not needed.
        graph.resource_drop(&mut self.store).map_err(werr)?;
        match ctx {
            Ok(c) => Ok(GuestContext(c)),
            Err(e) => bail!("creating an execution context: {}", self.error_text(e)),
        }
    }

    fn i64_row(&mut self, values: &[i64]) -> Result<ResourceAny> {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.nn
            .wasi_nn_tensor()
            .tensor()
            .call_constructor(
                &mut self.store,
                &vec![1, values.len() as u32],
                TensorType::I64,
                &data,
            )
            .map_err(werr)
    }

    /// Runs `ids` from position `start` (a start below the cached length rewinds); the last
    /// position's logits.
    pub fn step(&mut self, ctx: &GuestContext, ids: &[i64], start: usize) -> Result<Vec<f32>> {
        let positions: Vec<i64> = (start as i64..(start + ids.len()) as i64).collect();
        let inputs = vec![
            ("input_ids".to_string(), self.i64_row(ids)?),
            ("position_ids".to_string(), self.i64_row(&positions)?),
        ];
        let outputs = self
            .nn
            .wasi_nn_inference()
            .graph_execution_context()
            .call_compute(&mut self.store, ctx.0, &inputs)
            .map_err(werr)?;
        let outputs = match outputs {
            Ok(o) => o,
            Err(e) => bail!("compute in wasm: {}", self.error_text(e)),
        };
        let mut logits = None;
        for (name, t) in outputs {
            if name == "logits" {
                let api = self.nn.wasi_nn_tensor().tensor();
                let dims = api.call_dimensions(&mut self.store, t).map_err(werr)?;
                let ty = api.call_ty(&mut self.store, t).map_err(werr)?;
                let data = api.call_data(&mut self.store, t).map_err(werr)?;
                if ty != TensorType::Fp32 {
                    bail!("the wasm logits are {ty:?}, not f32");
                }
                let vocab = *dims.last().context("logits without dimensions")? as usize;
                let values: Vec<f32> = data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                if vocab == 0 || values.len() < vocab {
                    bail!("logits of shape {dims:?} hold {} values", values.len());
                }
                logits = Some(values[values.len() - vocab..].to_vec());
            }
            t.resource_drop(&mut self.store).map_err(werr)?;
        }
        logits.context("the wasm compute returned no logits")
    }

    pub fn drop_context(&mut self, ctx: GuestContext) -> Result<()> {
        ctx.0.resource_drop(&mut self.store).map_err(werr)
    }
}
