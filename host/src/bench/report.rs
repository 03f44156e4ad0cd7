//! Bench report: one JSON object (`--json`) or a few aligned lines of text, on stdout.

use serde_json::json;

use super::cold::{ColdStarts, COLD_START_PROMPT};
use super::memory::{Device, Memory};
use super::prefix::PrefixCache;
use super::speed::Speed;
use super::BenchArgs;

pub fn print(
    a: &BenchArgs,
    speed: &Speed,
    device: &Device,
    memory: &Memory,
    prefix: &PrefixCache,
    cold: &ColdStarts,
) {
    let path = if a.portable {
        "portable (wasi:nn inside wasm)"
    } else {
        "native (host wasi:nn)"
    };
    if a.json {
        println!(
            "{}",
            json!({
                "model": a.model,
                "path": path,
                "threads": a.threads,
                "device": device.placed.to_string(),
                "gpu_memory_used_mib": device.gpu_memory_used_mib,
                "runs": a.runs,
                "prompt_tokens": speed.prompt_tokens,
                "gen_tokens": speed.gen_tokens,
                "ttft_ms": speed.ttft_ms,
                "ttft_fresh_instance_ms": speed.ttft_fresh_instance_ms,
                "prefill_tps": speed.prefill_tps,
                "decode_tps": speed.decode_tps,
                "constrained_decode_tps": speed.constrained_decode_tps,
                "constrained_decode_over_free": speed.constrained_decode_tps / speed.decode_tps,
                "peak_rss_mb": memory.peak_rss_mb,
                "run_peak_rss_mb": memory.run_peak_rss_mb,
                "model_file_mb": memory.model_file_mb,
                "run_peak_rss_over_model_file": memory.run_over_model_file(),
                "model_load_ms": speed.model_load_ms,
                "first_request_ms": speed.first_request_ms,
                "cold_start_ms": cold.ms,
                "cold_start_prompt": COLD_START_PROMPT,
                "cold_start_over_model_load": cold.over_load,
                "prefix_cache": {
                    "prompt_tokens": prefix.prompt_tokens,
                    "cached_tokens": prefix.cached_tokens,
                    "ttft_uncached_ms": prefix.uncached_ms,
                    "ttft_cached_ms": prefix.cached_ms,
                    "speedup": prefix.uncached_ms / prefix.cached_ms,
                    "ttft_uncached_fresh_instance_ms": prefix.fresh_uncached_ms,
                    "ttft_cached_fresh_instance_ms": prefix.fresh_cached_ms,
                    "speedup_fresh_instance": prefix.fresh_uncached_ms / prefix.fresh_cached_ms,
                },
            })
        );
        return;
    }
    let opt = |v: Option<f64>, unit: &str| {
        v.map(|v| format!("{v:.0} {unit}"))
            .unwrap_or_else(|| "n/a".into())
    };
    println!(
        "{} ({path}) on {}, {} threads, prompt {} tokens, {} generated, median of {} runs",
        a.model, device.placed, a.threads, speed.prompt_tokens, a.gen_tokens, a.runs
    );
    if let Some(used) = device.gpu_memory_used_mib {
        println!("  GPU memory used      {used} MiB (whole device)");
    }
    println!(
        "  time to first token  {:.0} ms ({:.0} ms in a fresh instance: its start and tokenizer parse)",
        speed.ttft_ms, speed.ttft_fresh_instance_ms
    );
    println!("  prefill              {:.1} tokens/s", speed.prefill_tps);
    println!("  decode               {:.1} tokens/s", speed.decode_tps);
    println!(
        "  constrained decoding {:.1} tokens/s (x{:.2}: a format's token mask at every step)",
        speed.constrained_decode_tps,
        speed.constrained_decode_tps / speed.decode_tps
    );
    println!(
        "  peak RSS             {} (this process: two instances, prefix caches)",
        opt(memory.peak_rss_mb, "MiB")
    );
    println!(
        "  peak RSS of slm run  {} (a cold-start run; model file {})",
        opt(memory.run_peak_rss_mb, "MiB"),
        opt(memory.model_file_mb, "MiB")
    );
    println!("  model load           {}", opt(speed.model_load_ms, "ms"));
    println!(
        "  cold start           {} (new process to first token of {COLD_START_PROMPT:?}, compiled code cached; {} the model load)",
        opt(cold.ms, "ms"),
        cold.over_load.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "n/a".into())
    );
    let p = prefix;
    println!(
        "  prefix cache         time to first token {:.0} ms -> {:.0} ms with {:.0} of {} prompt tokens cached ({:.1}x)",
        p.uncached_ms, p.cached_ms, p.cached_tokens, p.prompt_tokens, p.uncached_ms / p.cached_ms
    );
    println!(
        "                       with a fresh instance per request: {:.0} ms -> {:.0} ms ({:.1}x)",
        p.fresh_uncached_ms,
        p.fresh_cached_ms,
        p.fresh_uncached_ms / p.fresh_cached_ms
    );
}
