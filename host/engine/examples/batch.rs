//! Continuous batching, measured: S sessions decoding at once (each in its own thread, as
//! `slm serve` runs concurrent requests) against one alone, on the same model and prompts.
//!
//!   cargo run --release -p slm-engine --example batch -- MODEL_DIR|MODEL.onnx \
//!       [--streams S] [--prompt-tokens N] [--gen-tokens M] [--threads T] [--rounds R]
//!
//! Each round: one session alone, then S at once (distinct prompts of N tokens, M greedy decode
//! steps each, decoding once all have prefilled), interleaved. Prints decode tokens/s (aggregate over the streams), the packed runs'
//! mean width, and checks that every stream's tokens equal its run alone.
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use slm_engine::{Model, Session};

#[path = "../tests/common/mod.rs"]
mod common;

use common::{argmax, step};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

/// Prefill `prompt`, then (once every stream of `prefilled` has) `gen` greedy steps: the tokens
/// and the decode time in seconds.
fn stream(model: &Arc<Model>, prompt: &[i64], gen: usize, prefilled: &Barrier) -> (Vec<i64>, f64) {
    let mut s = Session::new(model.clone());
    let mut logits = step(&mut s, prompt, 0);
    // Twice: between the two, the profile round turns profiling on (decode steps only).
    prefilled.wait();
    prefilled.wait();
    let t = Instant::now();
    let mut tokens = vec![];
    for i in 0..gen {
        let next = argmax(&logits) as i64;
        tokens.push(next);
        logits = step(&mut s, &[next], prompt.len() + i);
    }
    (tokens, t.elapsed().as_secs_f64())
}

/// One more round of the streams with every node of the decode steps' packed runs timed: ms
/// per packed run by op kind.
fn profile_round(model: &Arc<Model>, prompts: &[Vec<i64>], gen: usize) {
    let prefilled = Arc::new(Barrier::new(prompts.len() + 1));
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (model, p, prefilled) = (model.clone(), p.clone(), prefilled.clone());
            std::thread::spawn(move || stream(&model, &p, gen, &prefilled))
        })
        .collect();
    prefilled.wait();
    model.set_batch_profiling(true);
    let before = model.batching_stats().packed_runs;
    prefilled.wait();
    handles.into_iter().for_each(|h| drop(h.join().unwrap()));
    let runs = (model.batching_stats().packed_runs - before).max(1) as f64;
    let p = model.take_batch_profile().expect("profiling is on");
    model.set_batch_profiling(false);
    let mut kinds: std::collections::HashMap<String, f64> = Default::default();
    for n in p.nodes.values() {
        // Shapes that vary with the context length count as one kind.
        let kind = if n.op.starts_with("SlmKvAttention") {
            "SlmKvAttention".to_string()
        } else {
            n.op.clone()
        };
        *kinds.entry(kind).or_default() += n.total.as_secs_f64() * 1e3 / runs;
    }
    let mut kinds: Vec<_> = kinds.into_iter().collect();
    kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    eprintln!(
        "profiled packed runs: {:.2} ms each in the plan",
        p.total.as_secs_f64() * 1e3 / runs
    );
    for (op, ms) in kinds.iter().take(12) {
        eprintln!("  {ms:>8.3} ms  {op}");
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let path = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: batch MODEL_DIR [options]"),
    );
    let path = if path.is_dir() {
        path.join("model.onnx")
    } else {
        path
    };
    let (streams, n, gen) = (
        arg("--streams", 8),
        arg("--prompt-tokens", 32),
        arg("--gen-tokens", 64),
    );
    let (threads, rounds) = (arg("--threads", 1), arg("--rounds", 3));
    slm_engine::set_threads(threads);
    let model = Arc::new(Model::load(&path).expect("model"));
    let prompts: Vec<Vec<i64>> = (0..streams as i64)
        .map(|s| {
            (0..n as i64)
                .map(|i| (i * 7919 + s * 104_729) % 40_000 + 100)
                .collect()
        })
        .collect();
    let one = Barrier::new(1);
    let alone_tokens: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| stream(&model, p, gen, &one).0)
        .collect();
    let (mut one, mut all) = (vec![], vec![]);
    for _ in 0..rounds {
        let (_, secs) = stream(&model, &prompts[0], gen, &Barrier::new(1));
        one.push(gen as f64 / secs);
        let before = model.batching_stats();
        let start = Arc::new(Barrier::new(streams));
        let prefilled = Arc::new(Barrier::new(streams));
        let t = Instant::now();
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (model, p) = (model.clone(), p.clone());
                let (start, prefilled) = (start.clone(), prefilled.clone());
                std::thread::spawn(move || {
                    start.wait();
                    stream(&model, &p, gen, &prefilled)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let wall = t.elapsed().as_secs_f64();
        let decode = results.iter().map(|r| r.1).fold(0.0, f64::max);
        all.push((streams * gen) as f64 / decode);
        let after = model.batching_stats();
        let runs = after.packed_runs - before.packed_runs;
        let steps = after.packed_steps - before.packed_steps;
        let busy = after.packed_seconds - before.packed_seconds;
        eprintln!(
            "{streams} streams: {wall:.2} s, {runs} packed runs of {:.2} steps on average, \
             {:.1} ms each",
            steps as f64 / runs.max(1) as f64,
            busy * 1e3 / runs.max(1) as f64
        );
        for (i, r) in results.iter().enumerate() {
            assert_eq!(
                r.0, alone_tokens[i],
                "stream {i} differs from its run alone"
            );
        }
    }
    if std::env::args().any(|a| a == "--profile") {
        profile_round(&model, &prompts, gen);
    }
    let (one, all) = (median(one), median(all));
    println!(
        "{threads} thread(s), {n}-token prompts, {gen} tokens: one stream {one:.1} tok/s, \
         {streams} streams {all:.1} tok/s in all ({:.2}x); every stream's tokens equal its run alone",
        all / one
    );
}
