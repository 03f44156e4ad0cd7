//! Bench scenario: memory. The peak resident memory of this process and of a cold-start
//! `slm run` (next to the model file's size), where the model ended up and, on a GPU, the
//! device memory in use.

use slm_engine::Placement;

use super::BenchArgs;
use crate::runtime::Runtime;

/// Peak resident memory of this process, in MiB (Linux: VmHWM).
pub(crate) fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Resident memory, in MiB.
pub struct Memory {
    /// This process's peak (two instances, the prefix caches).
    pub peak_rss_mb: Option<f64>,
    /// The highest peak of the cold-start `slm run` processes.
    pub run_peak_rss_mb: Option<f64>,
    pub model_file_mb: Option<f64>,
}

impl Memory {
    /// A cold-start run's peak over the model file's size.
    pub fn run_over_model_file(&self) -> Option<f64> {
        self.run_peak_rss_mb
            .zip(self.model_file_mb)
            .map(|(r, f)| r / f)
    }
}

/// Where the model runs.
pub struct Device {
    /// Where the model ended up (`auto` falls back to the CPU when the GPU plan fails).
    pub placed: Placement,
    /// On a GPU, the device memory in use (the whole device: cuMemGetInfo).
    pub gpu_memory_used_mib: Option<u64>,
}

pub fn device(rt: &Runtime, a: &BenchArgs) -> Device {
    let placed = rt
        .registry
        .model(&a.model)
        .and_then(|m| m.placed().cloned())
        .unwrap_or(a.device.clone());
    let gpu_memory_used_mib = match placed {
        Placement::Gpu(_) => slm_engine::gpu_memory_mib().map(|(used, _)| used),
        Placement::Cpu => None,
    };
    Device {
        placed,
        gpu_memory_used_mib,
    }
}

/// The size of `model`'s file, in MiB.
pub fn model_file_mb(rt: &Runtime, model: &str) -> Option<f64> {
    rt.registry
        .model(model)
        .and_then(|m| std::fs::metadata(m.path()).ok())
        .map(|md| md.len() as f64 / (1024.0 * 1024.0))
}
