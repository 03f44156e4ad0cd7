//! `slm bench`: time to first token, prefill and decode speed, peak memory, cold start and the
//! prefix cache's effect, measured through the real path (the generator component on wasi:nn),
//! median of R runs after a warm-up.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::json;

use crate::runtime::{
    one_line, GeneratorComponent, GuestError, HostState, Message, Options, Runtime, Sampling,
    Summary,
};
use wasmtime::Store;

/// The default benchmark text (the same text `scripts/bench-peers` feeds the peers).
const BENCH_TEXT: &str = include_str!("../../tests/fixtures/heldout.txt");

/// A system prompt of about 100 tokens, shared by the prefix-cache requests.
const SYSTEM_PROMPT: &str = "You are a helpful assistant for a small hardware store. You answer questions \
about tools, paint, garden supplies and plumbing parts. Keep answers short and practical, name the aisle \
when you know it, and never invent prices. If a question is about safety, such as power tools, ladders or \
chemicals, remind the customer to read the label and to wear protective gear. If you do not know, say so \
and suggest asking a member of staff at the front desk.";

/// Questions of about 28 tokens each, asked after the shared system prompt.
const QUESTIONS: [&str; 4] = [
    "I want to repaint my kitchen cabinets this weekend. Which kind of paint and brushes should I buy, and do I need a primer first?",
    "My garden hose keeps leaking at the tap connection even after I tightened it. What part should I replace, and where do I find it?",
    "Which drill bit should I use to hang a heavy mirror on a brick wall, and do I also need special plugs or screws for that?",
    "How do I choose between a cordless and a corded lawn mower for a small city garden with a slope and a few narrow paths?",
];

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
    /// How to start this program again, for the cold-start measurement.
    pub relaunch: Vec<String>,
}

#[derive(Clone, Copy)]
struct Sample {
    ttft_ms: f64,
    prefill_tps: f64,
    decode_tps: f64,
    prompt_tokens: u32,
    completion_tokens: u32,
    cached_tokens: u32,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn guest(e: GuestError) -> anyhow::Error {
    anyhow!("the generator refused the benchmark request: {e:?}")
}

fn greedy(model: &str, max_tokens: u32) -> Options {
    Options {
        model: Some(model.to_string()),
        max_tokens: Some(max_tokens),
        stop: vec![],
        sampling: Sampling {
            temperature: Some(0.0),
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: None,
            seed: None,
        },
    }
}

enum Prompt<'a> {
    Raw(&'a str),
    Chat(&'a [Message]),
}

/// One request in a fresh instance, all text drained; its summary.
fn request(rt: &Runtime, prompt: Prompt, opts: &Options) -> Result<Summary> {
    request_on(&mut rt.instantiate()?, prompt, opts)
}

/// One request in `inst`, all text drained; its summary.
fn request_on(
    inst: &mut (Store<HostState>, GeneratorComponent),
    prompt: Prompt,
    opts: &Options,
) -> Result<Summary> {
    let (store, g) = inst;
    let api = g.edge_slm_generator();
    let started = match prompt {
        Prompt::Raw(text) => api.call_complete(&mut *store, text, opts),
        Prompt::Chat(messages) => api.call_chat(&mut *store, messages, opts),
    };
    let completion = started
        .map_err(|e| anyhow!("the generator component failed: {}", one_line(&e)))?
        .map_err(guest)?;
    let c = api.completion();
    loop {
        match c
            .call_next(&mut *store, completion)
            .map_err(|e| anyhow!("{}", one_line(&e)))?
        {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => return Err(guest(e)),
        }
    }
    let summary = c
        .call_summary(&mut *store, completion)
        .map_err(|e| anyhow!("{}", one_line(&e)))?;
    let _ = completion.resource_drop(&mut *store);
    Ok(summary)
}

fn sample(s: &Summary) -> Sample {
    let u = &s.usage;
    let t = &s.timings;
    Sample {
        ttft_ms: t.time_to_first_token_ms,
        prefill_tps: if t.prefill_ms > 0.0 {
            u.prompt_tokens as f64 * 1e3 / t.prefill_ms
        } else {
            f64::NAN
        },
        decode_tps: if u.completion_tokens > 1 && t.decode_ms > 0.0 {
            (u.completion_tokens - 1) as f64 * 1e3 / t.decode_ms
        } else {
            f64::NAN
        },
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        cached_tokens: u.cached_tokens,
    }
}

/// A prompt of `n` tokens cut from `text` (repeated as needed); its text and its token count.
fn prompt_of(rt: &Runtime, model: &str, text: &str, n: usize) -> Result<(String, usize)> {
    let (mut store, g) = rt.instantiate()?;
    let api = g.edge_slm_generator();
    let tokenize = |store: &mut _, t: &str| -> Result<Vec<u32>> {
        api.call_tokenize(store, Some(model), t)
            .map_err(|e| anyhow!("{}", one_line(&e)))?
            .map_err(guest)
    };
    let mut ids = tokenize(&mut store, text)?;
    if ids.is_empty() {
        bail!("the benchmark prompt text is empty");
    }
    while ids.len() < n {
        ids.extend_from_within(..);
    }
    ids.truncate(n);
    let prompt = api
        .call_detokenize(&mut store, Some(model), &ids)
        .map_err(|e| anyhow!("{}", one_line(&e)))?
        .map_err(guest)?;
    let count = tokenize(&mut store, &prompt)?.len();
    Ok((prompt, count))
}

/// Peak resident memory of this process, in MiB (Linux: VmHWM).
pub(crate) fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The prompt of the cold-start runs.
const COLD_START_PROMPT: &str = "Hello";

/// What a cold-start run measured.
struct ColdStart {
    /// From process start to the first byte of the answer.
    ms: f64,
    /// Its own model load, which the start-up overlaps (its `-v` log).
    load_ms: Option<f64>,
    /// Its peak resident memory (its `-v` log).
    peak_rss_mb: Option<f64>,
}

/// A new `slm run` process, answering `prompt` with one token.
fn cold_start(relaunch: &[String], prompt: &str) -> Result<ColdStart> {
    let (exe, args) = relaunch.split_first().context("no program to relaunch")?;
    let t = Instant::now();
    let mut child = Command::new(exe)
        .args(args)
        .args([
            "-v",
            "run",
            "--raw",
            "--max-tokens",
            "1",
            "--temperature",
            "0",
            prompt,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start slm for the cold-start run")?;
    let mut first = [0u8; 1];
    let got = child
        .stdout
        .as_mut()
        .map(|o| o.read(&mut first))
        .transpose()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let out = child.wait_with_output()?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || got != Some(1) {
        bail!("the cold-start run failed: {}", log.trim());
    }
    Ok(ColdStart {
        ms,
        load_ms: logged_load_ms(&log),
        peak_rss_mb: logged_peak_rss_mb(&log),
    })
}

/// The model load time in an `slm -v` log: "loaded PATH on DEVICE in N ms".
fn logged_load_ms(log: &str) -> Option<f64> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("loaded ") && l.ends_with(" ms"))?;
    let (_, tail) = line.rsplit_once(" in ")?;
    tail.strip_suffix(" ms")?.trim().parse().ok()
}

/// The peak RSS in an `slm -v run` log: "peak RSS N MiB".
fn logged_peak_rss_mb(log: &str) -> Option<f64> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("peak RSS ") && l.ends_with(" MiB"))?;
    let (_, tail) = line.rsplit_once("peak RSS ")?;
    tail.strip_suffix(" MiB")?.trim().parse().ok()
}

pub fn bench(rt: &Runtime, a: &BenchArgs) -> Result<()> {
    if a.runs == 0 || a.prompt_tokens == 0 || a.gen_tokens == 0 {
        bail!("--runs, --prompt-tokens and --gen-tokens must be at least 1");
    }
    let text = match &a.prompt_file {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?
        }
        None => BENCH_TEXT.to_string(),
    };
    let (prompt, prompt_tokens) = prompt_of(rt, &a.model, &text, a.prompt_tokens)?;
    let opts = greedy(&a.model, a.gen_tokens);
    let say = |msg: String| {
        if !a.json {
            eprintln!("{msg}");
        }
    };

    // Warm-up: loads the model; the timed runs each use a fresh instance, as `slm serve` does.
    let t = Instant::now();
    request(rt, Prompt::Raw(&prompt), &greedy(&a.model, 2))?;
    let first_request_ms = t.elapsed().as_secs_f64() * 1e3;
    let model_load_ms = rt.registry.load_ms(&a.model);

    let mut samples = Vec::new();
    for i in 0..a.runs {
        rt.registry.clear_prefix_caches(); // measure computing the prompt, not reusing it
        let s = sample(&request(rt, Prompt::Raw(&prompt), &opts)?);
        say(format!(
            "run {}: ttft {:.0} ms, prefill {:.1} tok/s, decode {:.1} tok/s ({} tokens)",
            i + 1,
            s.ttft_ms,
            s.prefill_tps,
            s.decode_tps,
            s.completion_tokens
        ));
        samples.push(s);
    }
    let pick = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    let (ttft_ms, prefill_tps, decode_tps) = (
        pick(|s| s.ttft_ms),
        pick(|s| s.prefill_tps),
        pick(|s| s.decode_tps),
    );
    let peak_rss_mb = peak_rss_mb();
    // Where the model ended up (`auto` falls back to the CPU when the GPU plan fails) and, on a
    // GPU, the device memory in use (the whole device: cuMemGetInfo).
    let placed = rt
        .registry
        .model(&a.model)
        .and_then(|m| m.placed().cloned())
        .unwrap_or(a.device.clone());
    let gpu_mem = match placed {
        slm_engine::Placement::Gpu(_) => slm_engine::gpu_memory_mib().map(|(used, _)| used),
        slm_engine::Placement::Cpu => None,
    };

    // Prefix cache: the same ~100-token system prompt, a new ~28-token question each time.
    let chat = |q: &str| {
        vec![
            Message {
                role: "system".into(),
                content: SYSTEM_PROMPT.into(),
            },
            Message {
                role: "user".into(),
                content: q.into(),
            },
        ]
    };
    // Twice: in a fresh instance per request (what `slm serve` does: the time includes the
    // guest's start, its tokenizer parse), and in one instance that has its tokenizer (a chat
    // session; the prefix cache's own effect).
    let one = greedy(&a.model, 1);
    let mut inst = rt.instantiate()?;
    request_on(&mut inst, Prompt::Raw("Hello"), &one)?;
    let (mut uncached, mut cached, mut uncached_fresh, mut cached_fresh) =
        (vec![], vec![], vec![], vec![]);
    let (mut reused, mut prefix_prompt) = (vec![], 0);
    for i in 0..a.runs {
        let q = chat(QUESTIONS[i % QUESTIONS.len()]);
        let other = chat(QUESTIONS[(i + 1) % QUESTIONS.len()]); // another user, same system prompt
        rt.registry.clear_prefix_caches();
        uncached_fresh.push(sample(&request(rt, Prompt::Chat(&q), &one)?).ttft_ms);
        rt.registry.clear_prefix_caches();
        uncached.push(sample(&request_on(&mut inst, Prompt::Chat(&q), &one)?).ttft_ms);
        rt.registry.clear_prefix_caches();
        request_on(&mut inst, Prompt::Chat(&other), &one)?;
        let warm = sample(&request_on(&mut inst, Prompt::Chat(&q), &one)?);
        cached.push(warm.ttft_ms);
        reused.push(warm.cached_tokens as f64);
        prefix_prompt = warm.prompt_tokens;
        rt.registry.clear_prefix_caches();
        request(rt, Prompt::Chat(&other), &one)?;
        cached_fresh.push(sample(&request(rt, Prompt::Chat(&q), &one)?).ttft_ms);
    }
    drop(inst);
    let (prefix_uncached_ms, prefix_cached_ms) = (median(uncached), median(cached));
    let (fresh_uncached_ms, fresh_cached_ms) = (median(uncached_fresh), median(cached_fresh));
    let prefix_cached_tokens = median(reused);
    rt.registry.clear_prefix_caches();

    // Cold start is the start-up path (process, compiled code, model load, guest start), so
    // its prompt is one word: the prompt's own prefill is `ttft_ms` above.
    // Its ratio to the model load is taken within each run (that process's own load, under the
    // same conditions: this machine's speed drifts by tens of percent between runs).
    let (mut colds, mut cold_ratios, mut cold_rss) = (Vec::new(), Vec::new(), Vec::new());
    if !a.relaunch.is_empty() {
        for _ in 0..a.runs {
            let c = cold_start(&a.relaunch, COLD_START_PROMPT)?;
            colds.push(c.ms);
            cold_ratios.extend(c.load_ms.map(|l| c.ms / l));
            cold_rss.extend(c.peak_rss_mb);
        }
    }
    let run_peak_rss_mb = cold_rss.iter().copied().reduce(f64::max);
    let model_file_mb = rt
        .registry
        .model(&a.model)
        .and_then(|m| std::fs::metadata(m.path()).ok())
        .map(|md| md.len() as f64 / (1024.0 * 1024.0));
    let cold_start = median(colds);
    let cold_over_load = Some(median(cold_ratios)).filter(|r| r.is_finite());

    let report = json!({
        "model": a.model,
        "path": if a.portable { "portable (wasi:nn inside wasm)" } else { "native (host wasi:nn)" },
        "threads": a.threads,
        "device": placed.to_string(),
        "gpu_memory_used_mib": gpu_mem,
        "runs": a.runs,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": samples.iter().map(|s| s.completion_tokens).min().unwrap_or(0),
        "ttft_ms": ttft_ms,
        "prefill_tps": prefill_tps,
        "decode_tps": decode_tps,
        "peak_rss_mb": peak_rss_mb,
        "run_peak_rss_mb": run_peak_rss_mb,
        "model_file_mb": model_file_mb,
        "run_peak_rss_over_model_file": run_peak_rss_mb.zip(model_file_mb).map(|(r, f)| r / f),
        "model_load_ms": model_load_ms,
        "first_request_ms": first_request_ms,
        "cold_start_ms": if cold_start.is_nan() { None } else { Some(cold_start) },
        "cold_start_prompt": COLD_START_PROMPT,
        "cold_start_over_model_load": cold_over_load,
        "prefix_cache": {
            "prompt_tokens": prefix_prompt,
            "cached_tokens": prefix_cached_tokens,
            "ttft_uncached_ms": prefix_uncached_ms,
            "ttft_cached_ms": prefix_cached_ms,
            "speedup": prefix_uncached_ms / prefix_cached_ms,
            "ttft_uncached_fresh_instance_ms": fresh_uncached_ms,
            "ttft_cached_fresh_instance_ms": fresh_cached_ms,
            "speedup_fresh_instance": fresh_uncached_ms / fresh_cached_ms,
        },
    });
    if !a.json {
        let opt = |v: Option<f64>, unit: &str| {
            v.map(|v| format!("{v:.0} {unit}"))
                .unwrap_or_else(|| "n/a".into())
        };
        println!(
            "{} ({}) on {placed}, {} threads, prompt {} tokens, {} generated, median of {} runs",
            a.model,
            report["path"].as_str().unwrap_or(""),
            a.threads,
            prompt_tokens,
            a.gen_tokens,
            a.runs
        );
        if let Some(used) = gpu_mem {
            println!("  GPU memory used      {used} MiB (whole device)");
        }
        println!("  time to first token  {ttft_ms:.0} ms");
        println!("  prefill              {prefill_tps:.1} tokens/s");
        println!("  decode               {decode_tps:.1} tokens/s");
        println!(
            "  peak RSS             {} (this process: two instances, prefix caches)",
            opt(peak_rss_mb, "MiB")
        );
        println!(
            "  peak RSS of slm run  {} (a cold-start run; model file {})",
            opt(run_peak_rss_mb, "MiB"),
            opt(model_file_mb, "MiB")
        );
        println!("  model load           {}", opt(model_load_ms, "ms"));
        println!(
            "  cold start           {} (new process to first token of {COLD_START_PROMPT:?}, compiled code cached; {} the model load)",
            opt(report["cold_start_ms"].as_f64(), "ms"),
            cold_over_load.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "n/a".into())
        );
        println!(
            "  prefix cache         time to first token {prefix_uncached_ms:.0} ms -> {prefix_cached_ms:.0} ms with {prefix_cached_tokens:.0} of {prefix_prompt} prompt tokens cached ({:.1}x)",
            prefix_uncached_ms / prefix_cached_ms
        );
        println!(
            "                       with a fresh instance per request: {fresh_uncached_ms:.0} ms -> {fresh_cached_ms:.0} ms ({:.1}x)",
            fresh_uncached_ms / fresh_cached_ms
        );
    } else {
        println!("{report}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{logged_load_ms, logged_peak_rss_mb};

    #[test]
    fn load_time_is_read_from_the_verbose_log() {
        let log = "\u{1b}[2m2026-11-27T06:16:33Z\u{1b}[0m \u{1b}[34mDEBUG\u{1b}[0m compile cache hit: x.cwasm\n\
                   \u{1b}[2m2026-11-27T06:16:33Z\u{1b}[0m \u{1b}[34mDEBUG\u{1b}[0m loaded models/m/model.onnx on CPU in 585 ms\n\
                   [prompt 1 tokens (0 cached), completion 1 tokens, time to first token 593 ms]";
        assert_eq!(logged_load_ms(log), Some(585.0));
        assert_eq!(logged_load_ms("no model here"), None);
        assert_eq!(
            logged_peak_rss_mb("x\n\u{1b}[34mDEBUG\u{1b}[0m peak RSS 154.2 MiB\n"),
            Some(154.2)
        );
    }
}
