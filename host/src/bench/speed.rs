//! Bench scenario: time to first token, prefill and decode speed of a prompt of N tokens, after a
//! warm-up that loads the model. The runs reuse one warm instance, as `slm serve` does (its
//! tokenizer parsed once), with the prefix cache emptied before each; the time to first token
//! in a fresh instance (the guest's start and tokenizer parse included: Spin, `wasmtime serve`,
//! `slm serve --instance-reuse 1`) is measured beside them.

use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use super::{greedy, guest, request, request_on, BenchArgs, Sample};
use crate::completion::Prompt;
use crate::runtime::{werr, Format, Options, Runtime};
use crate::stats::median;

/// The default benchmark text (the same text `scripts/bench-peers` feeds the peers).
const BENCH_TEXT: &str = include_str!("../../../tests/fixtures/heldout.txt");

pub struct Speed {
    /// The prompt's length in tokens.
    pub prompt_tokens: usize,
    /// The fewest tokens a run generated.
    pub gen_tokens: u32,
    /// The warm-up request (model load included).
    pub first_request_ms: f64,
    pub model_load_ms: Option<f64>,
    /// Medians of the runs.
    pub ttft_ms: f64,
    /// Time to first token of the same prompt in a fresh instance.
    pub ttft_fresh_instance_ms: f64,
    pub prefill_tps: f64,
    pub decode_tps: f64,
    /// Decode speed under constrained decoding (the median of runs interleaved with the free
    /// ones): a format that allows every text token, so the tokens are the same and only the
    /// token mask's cost differs.
    pub constrained_decode_tps: f64,
}

pub fn measure(rt: &Runtime, a: &BenchArgs) -> Result<Speed> {
    let text = match &a.prompt_file {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?
        }
        None => BENCH_TEXT.to_string(),
    };
    let (prompt, prompt_tokens) = prompt_of(rt, &a.model, &text, a.prompt_tokens)?;
    let opts = greedy(&a.model, a.gen_tokens);
    let constrained = Options {
        format: Some(Format::Regex(r"(.|\n)*".into())),
        ..opts.clone()
    };

    // Warm-up: loads the model, and the instance the timed runs reuse parses its tokenizer.
    let t = Instant::now();
    let mut warm = rt.instantiate()?;
    request_on(&mut warm, Prompt::Raw(&prompt), &greedy(&a.model, 2))?;
    let first_request_ms = t.elapsed().as_secs_f64() * 1e3;
    let model_load_ms = rt.registry.load_ms(&a.model);

    let mut samples = Vec::new();
    let mut constrained_samples = Vec::new();
    let mut fresh_ttft = Vec::new();
    for i in 0..a.runs {
        rt.registry.clear_prefix_caches(); // measure computing the prompt, not reusing it
        let s = request_on(&mut warm, Prompt::Raw(&prompt), &opts)?;
        rt.registry.clear_prefix_caches();
        let fresh = request(rt, Prompt::Raw(&prompt), &greedy(&a.model, 1))?;
        if !a.json {
            eprintln!(
                "run {}: ttft {:.0} ms ({:.0} ms in a fresh instance), prefill {:.1} tok/s, \
                 decode {:.1} tok/s ({} tokens)",
                i + 1,
                s.ttft_ms,
                fresh.ttft_ms,
                s.prefill_tps,
                s.decode_tps,
                s.completion_tokens
            );
        }
        samples.push(s);
        fresh_ttft.push(fresh.ttft_ms);
        rt.registry.clear_prefix_caches();
        let c = request_on(&mut warm, Prompt::Raw(&prompt), &constrained)?;
        if !a.json {
            eprintln!("       constrained decoding: {:.1} tok/s", c.decode_tps);
        }
        constrained_samples.push(c.decode_tps);
    }
    let pick = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    Ok(Speed {
        prompt_tokens,
        gen_tokens: samples
            .iter()
            .map(|s| s.completion_tokens)
            .min()
            .unwrap_or(0),
        first_request_ms,
        model_load_ms,
        ttft_ms: pick(|s| s.ttft_ms),
        ttft_fresh_instance_ms: median(fresh_ttft),
        prefill_tps: pick(|s| s.prefill_tps),
        decode_tps: pick(|s| s.decode_tps),
        constrained_decode_tps: median(constrained_samples),
    })
}

/// A prompt of `n` tokens cut from `text` (repeated as needed); its text and its token count.
fn prompt_of(rt: &Runtime, model: &str, text: &str, n: usize) -> Result<(String, usize)> {
    let (mut store, g) = rt.instantiate()?;
    let api = g.edge_slm_generator();
    let tokenize = |store: &mut _, t: &str| -> Result<Vec<u32>> {
        api.call_tokenize(store, Some(model), t)
            .map_err(werr)?
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
        .map_err(werr)?
        .map_err(guest)?;
    let count = tokenize(&mut store, &prompt)?.len();
    Ok((prompt, count))
}
