//! `slm bench`: time to first token, prefill and decode speed, peak memory, cold start and the
//! prefix cache's effect, measured through the real path (the generator component on wasi:nn),
//! median of R runs after a warm-up. One module per scenario; this one runs them in order and
//! holds what they share (the requests they send, what a request measured).

mod cold;
mod memory;
mod prefix;
mod report;
mod speed;

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

use crate::cli::GenArgs;
use crate::completion::{self, Discard, Failure, Instance, Prompt};
use crate::runtime::{one_line, werr, GuestError, Options, Runtime, Summary};

pub(crate) use memory::peak_rss_mb;

pub struct BenchArgs {
    pub model: String,
    pub prompt_tokens: usize,
    pub gen_tokens: u32,
    pub runs: usize,
    pub prompt_file: Option<PathBuf>,
    pub json: bool,
    pub threads: usize,
    pub portable: bool,
    /// Where the model runs (`--device`).
    pub device: slm_engine::Placement,
    /// How to start this program again, for the cold-start measurement: the program and its
    /// global options.
    pub relaunch: Vec<String>,
    /// The `run` options that pick the same model (`--model` as given, if it was).
    pub relaunch_model: Vec<String>,
}

pub fn bench(rt: &Runtime, a: &BenchArgs) -> Result<()> {
    if a.runs == 0 || a.prompt_tokens == 0 || a.gen_tokens == 0 {
        bail!("--runs, --prompt-tokens and --gen-tokens must be at least 1");
    }
    let speed = speed::measure(rt, a)?;
    // This process's peak: after the speed runs, before the prefix-cache ones.
    let peak_rss_mb = peak_rss_mb();
    let device = memory::device(rt, a);
    let prefix = prefix::measure(rt, a)?;
    let cold = cold::measure(a)?;
    let memory = memory::Memory {
        peak_rss_mb,
        run_peak_rss_mb: cold.peak_rss_mb,
        model_file_mb: memory::model_file_mb(rt, &a.model),
    };
    report::print(a, &speed, &device, &memory, &prefix, &cold);
    Ok(())
}

/// What one request measured.
#[derive(Clone, Copy)]
struct Sample {
    ttft_ms: f64,
    prefill_tps: f64,
    decode_tps: f64,
    prompt_tokens: u32,
    completion_tokens: u32,
    cached_tokens: u32,
}

impl Sample {
    fn of(s: &Summary) -> Sample {
        Sample {
            ttft_ms: s.timings.time_to_first_token_ms,
            prefill_tps: completion::prefill_tps(s).unwrap_or(f64::NAN),
            decode_tps: completion::decode_tps(s).unwrap_or(f64::NAN),
            prompt_tokens: s.usage.prompt_tokens,
            completion_tokens: s.usage.completion_tokens,
            cached_tokens: s.usage.cached_tokens,
        }
    }
}

/// The benchmark's requests: greedy, at most `max_tokens` tokens (what `slm run --temperature 0
/// --max-tokens M` sends).
fn greedy(model: &str, max_tokens: u32) -> Options {
    GenArgs {
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..GenArgs::default()
    }
    .options(model.to_string())
}

/// One request in a fresh instance, all text drained; what it measured.
fn request(rt: &Runtime, prompt: Prompt, opts: &Options) -> Result<Sample> {
    request_on(&mut rt.instantiate()?, prompt, opts)
}

/// One request in `inst`, all text drained; what it measured.
fn request_on(inst: &mut Instance, prompt: Prompt, opts: &Options) -> Result<Sample> {
    let summary = completion::complete(inst, prompt, opts, &mut Discard).map_err(|f| match f {
        Failure::StartTrap(e) => anyhow!("the generator component failed: {}", one_line(&e)),
        Failure::Trap(e) => werr(e),
        Failure::Guest(e) => guest(e),
        Failure::Sink(e) => e,
    })?;
    Ok(Sample::of(&summary))
}

fn guest(e: GuestError) -> anyhow::Error {
    anyhow!("the generator refused the benchmark request: {e:?}")
}
