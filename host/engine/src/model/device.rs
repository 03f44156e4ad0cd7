//! Where a model runs: the CPU (our engine, [`super::cpu`]) or an NVIDIA GPU (tract's CUDA
//! runtime, `tract-cuda`, behind the `gpu` cargo feature: [`super::gpu`]). Probing the GPU, and
//! loading a model where the caller's [`Device`] resolves.
//!
//! cudarc loads libcuda, cudart, nvrtc, cublas and cudnn with `dlopen` when first asked: a `gpu`
//! build still starts on a machine without them, and [`gpu`] says which one is missing.

use std::fmt;
use std::path::Path;
use std::sync::OnceLock;

use super::gpu::Source;
use crate::{EngineError, Model};

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
    refuse_stub_libraries()?;
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
        // SAFETY: `dev` is a valid device handle: cuDeviceGet returned it, after cuInit succeeded.
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

/// The CUDA toolkit's `stubs/` libraries exist to link against, not to run: they load, then
/// answer calls with garbage (on an H200, tract-cuda then asked for a 10^17-byte buffer and the
/// process aborted). An `LD_LIBRARY_PATH` that names a `stubs` directory before the real one
/// picks them. cudarc opens each library lazily, by the first of its candidate names that loads:
/// this opens them the same way, holds them while the process's mappings are read, and refuses a
/// library mapped from a `stubs` directory, naming it.
#[cfg(feature = "gpu")]
fn refuse_stub_libraries() -> Result<(), String> {
    let held: Vec<libloading::Library> = ["cuda", "cudart", "nvrtc", "cublas", "cublasLt", "cudnn"]
        .iter()
        .filter_map(|lib| {
            cudarc::get_lib_name_candidates(lib)
                .into_iter()
                // SAFETY: loading a CUDA library runs its initializers, as cudarc's own load does.
                .find_map(|name| unsafe { libloading::Library::new(name) }.ok())
        })
        .collect();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    drop(held);
    match stub_libraries(&maps).first() {
        Some(stub) => Err(format!(
            "the CUDA stub library {stub} would be loaded (link-time stubs do not run): take its \
             directory out of LD_LIBRARY_PATH, or put the real CUDA libraries' directory first"
        )),
        None => Ok(()),
    }
}

/// The CUDA libraries in a `/proc/self/maps` text that come from a `stubs` directory.
#[cfg_attr(not(feature = "gpu"), allow(dead_code))]
fn stub_libraries(maps: &str) -> Vec<&str> {
    let mut stubs: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|path| {
            let mut parts = path.rsplit('/');
            let file = parts.next().unwrap_or_default();
            parts.next() == Some("stubs")
                && ["libcuda", "libcudart", "libnvrtc", "libcublas", "libcudnn"]
                    .iter()
                    .any(|lib| file.starts_with(lib))
        })
        .collect();
    stubs.dedup();
    stubs
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
}

#[cfg(test)]
mod tests {
    use super::stub_libraries;

    #[test]
    fn stub_libraries_are_found_by_their_directory() {
        let maps = "\
7f00-7f01 r--p 00000000 00:21 1 /usr/local/cuda/targets/x86_64-linux/lib/stubs/libnvrtc.so
7f01-7f02 r-xp 00001000 00:21 1 /usr/local/cuda/targets/x86_64-linux/lib/stubs/libnvrtc.so
7f02-7f03 r--p 00000000 00:21 2 /usr/local/cuda/targets/x86_64-linux/lib/libcublas.so.13
7f03-7f04 r--p 00000000 00:21 3 /usr/local/nvidia/lib64/libcuda.so.580.159.04
7f04-7f05 rw-p 00000000 00:00 0
7f05-7f06 r--p 00000000 00:21 4 /opt/stubs/libfoo.so
";
        assert_eq!(
            stub_libraries(maps),
            ["/usr/local/cuda/targets/x86_64-linux/lib/stubs/libnvrtc.so"]
        );
        assert!(stub_libraries("").is_empty());
    }
}
