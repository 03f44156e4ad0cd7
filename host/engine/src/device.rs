//! Where a model runs: the CPU (our tract plan with int8 weights) or an NVIDIA GPU (tract's CUDA
//! runtime, `tract-cuda`, behind the `gpu` cargo feature).
//!
//! The GPU plan is a plain tract-onnx parse (none of our CPU rewrites: tract-cuda does not know
//! [`crate::quant`]'s ops; tract folds the int8 `Cast * scale` weights to f32), decluttered, with
//! tract-transformers' rope / masked-softmax patterns detected, then prepared by the `cuda`
//! [`Runtime`](tract_onnx::tract_core::runtime::Runtime). It is an ordinary `TypedSimplePlan`
//! with the same inputs and outputs, so [`crate::Session`] (stateful KV cache, rewinds,
//! [`crate::KvSnapshot`]) runs it unchanged: the KV tensors stay host tensors between steps.
//!
//! cudarc loads libcuda, cudart, nvrtc, cublas and cudnn with `dlopen` when first asked: a `gpu`
//! build still starts on a machine without them, and [`gpu`] says which one is missing.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use tract_onnx::prelude::*;
#[allow(unused_imports)]
use tract_onnx::tract_core::internal::TractErrorContext as _;

use crate::model::{input_kind, InputKind};
use crate::{proto, EngineError, Model};

/// What the caller asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// The GPU, or an error saying why there is none.
    Gpu,
    /// The GPU when one is usable, else the CPU.
    #[default]
    Auto,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "gpu" | "cuda" => Ok(Device::Gpu),
            "auto" => Ok(Device::Auto),
            other => Err(format!("unknown device {other:?} (cpu, gpu or auto)")),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Gpu => "gpu",
            Device::Auto => "auto",
        })
    }
}

/// A usable CUDA device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub memory_mib: u64,
}

impl fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GPU {} ({}, {} MiB, CUDA)",
            self.ordinal, self.name, self.memory_mib
        )
    }
}

/// Where a model is (to be) loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    Cpu,
    Gpu(GpuInfo),
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::Cpu => f.write_str("CPU"),
            Placement::Gpu(g) => g.fmt(f),
        }
    }
}

/// Whether this build has the GPU engine (the `gpu` cargo feature).
pub const GPU_BUILT: bool = cfg!(feature = "gpu");

/// Why a build without the `gpu` feature has no GPU.
pub const NOT_BUILT: &str = "this slm was built without GPU support (build it with `cargo build --release -p slm --features gpu`, or scripts/build-gpu)";

/// The GPU this process can use, probed once: the CUDA driver, the CUDA libraries tract-cuda
/// loads (cudart, nvrtc, cublas, cudnn) and a device. `Err` is one line naming what is missing.
pub fn gpu() -> Result<GpuInfo, String> {
    static PROBE: OnceLock<Result<GpuInfo, String>> = OnceLock::new();
    PROBE.get_or_init(probe).clone()
}

/// What `device` comes to on this machine. Only [`Device::Gpu`] fails (with [`gpu`]'s reason);
/// [`Device::Auto`] falls back to the CPU.
pub fn resolve(device: Device) -> Result<Placement, String> {
    match device {
        Device::Cpu => Ok(Placement::Cpu),
        Device::Gpu => gpu().map(Placement::Gpu),
        Device::Auto => Ok(gpu().map(Placement::Gpu).unwrap_or(Placement::Cpu)),
    }
}

/// Device memory in use and in all, in MiB (the whole device, every process), when a GPU is
/// usable.
pub fn gpu_memory_mib() -> Option<(u64, u64)> {
    #[cfg(feature = "gpu")]
    {
        gpu().ok()?;
        let ctx = cudarc::driver::CudaContext::new(0).ok()?;
        let (free, total) = ctx.mem_get_info().ok()?;
        Some((((total - free) >> 20) as u64, (total >> 20) as u64))
    }
    #[cfg(not(feature = "gpu"))]
    None
}

#[cfg(not(feature = "gpu"))]
fn probe() -> Result<GpuInfo, String> {
    Err(NOT_BUILT.to_string())
}

#[cfg(feature = "gpu")]
fn probe() -> Result<GpuInfo, String> {
    let one_line = |s: String| s.split_whitespace().collect::<Vec<_>>().join(" ");
    // Loads every library by dlopen and calls cuInit; must come before any other cudarc call
    // (cudarc panics when it binds a symbol of a library that is absent).
    tract_cuda::utils::ensure_cuda_runtime_dependencies("CUDA libraries missing").map_err(|e| {
        let root = one_line(e.root_cause().to_string());
        let root = root
            .strip_prefix("CUDA libraries missing: ")
            .unwrap_or(&root)
            .to_string();
        if root.contains("cuInit returned 100") {
            "no CUDA device found (cuInit: CUDA_ERROR_NO_DEVICE)".to_string()
        } else {
            root
        }
    })?;
    let info = std::panic::catch_unwind(|| -> Result<GpuInfo, String> {
        use cudarc::driver::result::{device, init};
        init().map_err(|e| format!("cuInit failed: {e}"))?;
        let count = device::get_count().map_err(|e| format!("cannot count CUDA devices: {e}"))?;
        if count < 1 {
            return Err("no CUDA device found (cuDeviceGetCount: 0)".to_string());
        }
        let dev = device::get(0).map_err(|e| format!("cannot open CUDA device 0: {e}"))?;
        let name = device::get_name(dev).unwrap_or_else(|_| "unknown".to_string());
        // SAFETY: `dev` comes from cuDeviceGet.
        let bytes = unsafe { device::total_mem(dev) }.unwrap_or(0);
        Ok(GpuInfo {
            ordinal: 0,
            name,
            memory_mib: (bytes >> 20) as u64,
        })
    });
    info.unwrap_or_else(|_| Err("the CUDA driver failed while probing the device".to_string()))
        .map_err(one_line)
}

/// A model file, or its bytes (wasi:nn `load`).
#[derive(Clone, Copy)]
enum Source<'a> {
    Path(&'a Path),
    Bytes(&'a [u8]),
}

impl Source<'_> {
    fn name(&self) -> String {
        match self {
            Source::Path(p) => p.display().to_string(),
            Source::Bytes(_) => "<bytes>".to_string(),
        }
    }
}

/// The ONNX front end without our CPU rewrites (the GPU plan's, and [`Model::load_plain`]'s).
fn parse_plain(source: Source, name: &str) -> Result<InferenceModel, EngineError> {
    let (proto, dir) = match source {
        Source::Path(path) => {
            if !path.is_file() {
                return Err(EngineError::load(name, "file not found"));
            }
            (
                proto::read_path(path, &mut proto::KeepAll),
                path.parent().and_then(|d| d.to_str()),
            )
        }
        Source::Bytes(bytes) => (proto::read_bytes(bytes, &mut proto::KeepAll), None),
    };
    let mut proto = proto.map_err(|e| EngineError::load(name, e))?;
    crate::quant::dequantize_nbits(&mut proto);
    let parsed = tract_onnx::onnx()
        .parse(&proto, dir)
        .map_err(|e| EngineError::load(name, e))?;
    drop(proto);
    if !parsed.unresolved_inputs.is_empty() {
        return Err(EngineError::load(
            name,
            format!("could not resolve inputs {:?}", parsed.unresolved_inputs),
        ));
    }
    Ok(parsed.model)
}

/// Typed, decluttered, with the transformer patterns tract's GPU kernels know (rotary
/// embeddings, scaled masked softmax) detected. The KV cache stays in the inputs and outputs
/// (no `detect_kv_cache`): the session owns it.
fn plain_typed(model: InferenceModel) -> TractResult<TypedModel> {
    let mut typed = model.into_typed()?.into_decluttered()?;
    for name in ["detect_apply_rope", "detect_scaled_masked_softmax"] {
        if let Some(t) = tract_onnx::tract_core::transform::get_transform(name)? {
            t.transform(&mut typed)?;
        }
    }
    typed.declutter()?;
    Ok(typed)
}

/// The names of the nodes from each `past_key_values.*` input up to (and with) the Concat that
/// appends the step's keys or values to it.
#[cfg_attr(not(feature = "gpu"), allow(dead_code))]
fn past_concats(model: &TypedModel) -> Vec<String> {
    let mut names = Vec::new();
    for input in model.input_outlets().unwrap_or(&[]) {
        if !model.node(input.node).name.starts_with("past_key_values.") {
            continue;
        }
        let mut frontier = vec![*input];
        for _depth in 0..4 {
            let mut next = Vec::new();
            for outlet in frontier {
                for succ in &model.outlet_successors(outlet)[..] {
                    let node = model.node(succ.node);
                    names.push(node.name.clone());
                    if !node.op().name().contains("Concat") {
                        next.extend(
                            (0..node.outputs.len()).map(|slot| OutletId::new(node.id, slot)),
                        );
                    }
                }
            }
            frontier = next;
        }
    }
    names.sort();
    names.dedup();
    names
}

impl Model {
    /// Loads `model.onnx` where `placement` says: [`Model::load`] for the CPU, the tract-cuda
    /// plan for a GPU.
    pub fn load_on(path: &Path, placement: &Placement) -> Result<Model, EngineError> {
        match placement {
            Placement::Cpu => Model::load(path),
            Placement::Gpu(_) => Self::load_gpu(Source::Path(path)),
        }
    }

    /// [`Model::from_bytes`] where `placement` says.
    pub fn from_bytes_on(bytes: &[u8], placement: &Placement) -> Result<Model, EngineError> {
        match placement {
            Placement::Cpu => Model::from_bytes(bytes),
            Placement::Gpu(_) => Self::load_gpu(Source::Bytes(bytes)),
        }
    }

    /// The GPU plan's graph (plain tract-onnx, f32 weights, transformer patterns detected),
    /// optimized for the CPU: what a GPU run is compared with, and a test of everything in the
    /// GPU path but tract-cuda itself.
    #[doc(hidden)]
    pub fn load_plain(path: &Path) -> Result<Model, EngineError> {
        Self::load_with(Source::Path(path), |typed| {
            Ok(typed.into_optimized()?.into_runnable()?)
        })
    }

    /// The nodes the GPU plan keeps on the CPU (each KV cache input up to its Concat).
    #[doc(hidden)]
    pub fn gpu_cpu_nodes(path: &Path) -> Result<Vec<String>, EngineError> {
        let name = path.display().to_string();
        let typed = plain_typed(parse_plain(Source::Path(path), &name)?)
            .map_err(|e| EngineError::load(&name, e))?;
        Ok(past_concats(&typed))
    }

    #[cfg(not(feature = "gpu"))]
    fn load_gpu(_source: Source) -> Result<Model, EngineError> {
        Err(EngineError::Runtime(NOT_BUILT.to_string()))
    }

    #[cfg(feature = "gpu")]
    fn load_gpu(source: Source) -> Result<Model, EngineError> {
        gpu().map_err(EngineError::Runtime)?;
        Self::load_with(source, |typed| {
            use tract_onnx::tract_core::runtime::runtime_for_name;
            // Naming the crate links it, and with it the `cuda` runtime it registers.
            let _ = tract_cuda::CudaTransform;
            let rt = runtime_for_name("cuda")?.context("tract's cuda runtime is not registered")?;
            // The KV cache inputs are empty on a session's first step, and CUDA does not allocate
            // 0 bytes (cuMemAlloc: invalid value): keep each past -> Concat on the CPU, so only
            // the (never empty) concatenation crosses to the GPU.
            let on_cpu = past_concats(&typed).join(",");
            let knobs = tract_onnx::tract_core::tract_data::knobs::KnobScope::new([(
                "TRACT_CUDA_FORCE_CPU",
                on_cpu.as_str(),
            )])?;
            // tract-cuda panics (`expect`) when it cannot create its context or streams.
            let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                knobs.enter(|| rt.prepare(typed))
            }))
            .map_err(|p| {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tract_onnx::tract_core::internal::format_err!("tract-cuda failed: {msg}")
            })??;
            prepared
                .typed_plan()
                .cloned()
                .context("the cuda runtime did not build a tract plan")
        })
    }

    fn load_with(
        source: Source,
        prepare: impl FnOnce(TypedModel) -> TractResult<Arc<TypedRunnableModel>>,
    ) -> Result<Model, EngineError> {
        let name = source.name();
        let model = parse_plain(source, &name)?;
        let err = |e| EngineError::load(&name, e);
        let input_names: Vec<String> = model
            .input_outlets()
            .map_err(err)?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let output_names: Vec<String> = model
            .output_outlets()
            .map_err(err)?
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| model.node(o.node).name.clone())
            })
            .collect();
        let input_kinds: Vec<InputKind> = input_names.iter().map(|n| input_kind(n)).collect();
        if !input_kinds.contains(&InputKind::InputIds) {
            return Err(EngineError::load(
                &name,
                "the model has no `input_ids` input: not a decoder",
            ));
        }
        let typed = plain_typed(model).map_err(err)?;
        let info = Self::read_info(&typed, &input_kinds, &output_names).map_err(err)?;
        let plan = prepare(typed).map_err(err)?;
        Ok(Model {
            plan,
            input_names,
            input_kinds,
            output_names,
            info,
        })
    }
}
