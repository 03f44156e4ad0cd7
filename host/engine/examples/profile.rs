//! Where the time goes: prefill and decode speed of the engine on one model, and the plan's
//! nodes ranked by time per decode token.
//!
//!   cargo run --release -p slm-engine --example profile -- MODEL_DIR|MODEL.onnx \
//!       [--prompt-tokens N] [--gen-tokens M] [--threads T] [--runs R] [--top K]
//!
//! Each run: a fresh session, an N-token prefill, then M greedy decode steps. Speeds are the
//! median over R runs (after one warm-up). A last, profiled run times every node of the plan;
//! the tables show ms per token by op kind (op name and output shape) and the costliest nodes.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slm_engine::{Model, Profile, Session};

#[path = "../tests/common/mod.rs"]
mod common;

use common::{argmax, step};

struct Args {
    model: PathBuf,
    prompt: usize,
    gen: usize,
    threads: usize,
    runs: usize,
    top: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        model: PathBuf::new(),
        prompt: 126,
        gen: 64,
        threads: 1,
        runs: 3,
        top: 20,
    };
    let mut it = std::env::args().skip(1);
    let mut model = None;
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> Result<usize, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} takes a number"))
        };
        match a.as_str() {
            "--prompt-tokens" => args.prompt = num(&a)?.max(1),
            "--gen-tokens" => args.gen = num(&a)?,
            "--threads" => args.threads = num(&a)?.max(1),
            "--runs" => args.runs = num(&a)?.max(1),
            "--top" => args.top = num(&a)?,
            _ if a.starts_with("--") => return Err(format!("unknown option {a}")),
            _ => model = Some(PathBuf::from(a)),
        }
    }
    let model = model.ok_or("usage: profile MODEL_DIR|MODEL.onnx [--prompt-tokens N] [--gen-tokens M] [--threads T] [--runs R] [--top K]")?;
    args.model = if model.is_dir() {
        model.join("model.onnx")
    } else {
        model
    };
    Ok(args)
}

/// Prefill time, per-token decode times, and the greedy tokens.
fn one_run(
    model: &Arc<Model>,
    prompt: &[i64],
    gen: usize,
    profile: bool,
) -> (Duration, Vec<Duration>, Profile, Profile) {
    let mut s = Session::new(model.clone());
    s.set_profiling(profile);
    let t = Instant::now();
    let mut next = argmax(&step(&mut s, prompt, 0)) as i64;
    let prefill = t.elapsed();
    let prefill_profile = s.take_profile().unwrap_or_default();
    let mut steps = vec![];
    for i in 0..gen {
        let t = Instant::now();
        next = argmax(&step(&mut s, &[next], prompt.len() + i)) as i64;
        steps.push(t.elapsed());
    }
    let decode_profile = s.take_profile().unwrap_or_default();
    (prefill, steps, prefill_profile, decode_profile)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn print_profile(title: &str, p: &Profile, tokens: usize, top: usize) {
    let per_tok = |d: Duration| d.as_secs_f64() * 1e3 / tokens as f64;
    let in_nodes: Duration = p.nodes.values().map(|n| n.total).sum();
    println!(
        "\n== {title}: {:.3} ms/token in execute, {:.3} ms/token in nodes ({} nodes)",
        per_tok(p.total),
        per_tok(in_nodes),
        p.nodes.len()
    );
    let mut kinds: HashMap<&str, (Duration, u64)> = HashMap::new();
    for n in p.nodes.values() {
        let e = kinds.entry(n.op.as_str()).or_default();
        e.0 += n.total;
        e.1 += 1;
    }
    let mut kinds: Vec<_> = kinds.into_iter().collect();
    kinds.sort_by(|a, b| b.1 .0.cmp(&a.1 .0));
    println!("  by op kind (op [output shape]): ms/token, share, nodes");
    for (op, (d, count)) in kinds.iter().take(top) {
        println!(
            "  {:>9.3} {:>5.1}% {:>4}  {op}",
            per_tok(*d),
            100.0 * d.as_secs_f64() / in_nodes.as_secs_f64(),
            count
        );
    }
    let mut nodes: Vec<_> = p.nodes.values().collect();
    nodes.sort_by(|a, b| b.total.cmp(&a.total));
    println!("  top nodes: ms/token");
    for n in nodes.iter().take(top.min(10)) {
        println!("  {:>9.3}  {} ({})", per_tok(n.total), n.name, n.op);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    slm_engine::set_threads(args.threads);
    let t = Instant::now();
    let model = Arc::new(Model::load(&args.model)?);
    let load = t.elapsed();
    let vocab = model.info().vocab.max(2) as i64;
    // A fixed, spread-out prompt (the speed does not depend on which tokens).
    let prompt: Vec<i64> = (0..args.prompt as i64)
        .map(|i| 1 + (i * 7919 + 13) % (vocab - 1))
        .collect();
    println!(
        "model {} | load {:.0} ms | threads {} | prompt {} | gen {} | runs {}",
        args.model.display(),
        load.as_secs_f64() * 1e3,
        args.threads,
        args.prompt,
        args.gen,
        args.runs
    );

    one_run(&model, &prompt, args.gen.min(4), false); // warm-up
    let (mut prefill_tps, mut decode_tps, mut decode_ms) = (vec![], vec![], vec![]);
    for r in 0..args.runs {
        let (prefill, steps, _, _) = one_run(&model, &prompt, args.gen, false);
        let p = args.prompt as f64 / prefill.as_secs_f64();
        let decode: Duration = steps.iter().sum();
        let d = if steps.is_empty() {
            0.0
        } else {
            steps.len() as f64 / decode.as_secs_f64()
        };
        println!(
            "run {r}: prefill {:.1} ms ({p:.1} tok/s), decode {d:.2} tok/s",
            prefill.as_secs_f64() * 1e3
        );
        prefill_tps.push(p);
        decode_tps.push(d);
        decode_ms.push(if d > 0.0 { 1e3 / d } else { 0.0 });
    }
    println!(
        "median: prefill {:.1} tok/s | decode {:.2} tok/s ({:.2} ms/token)",
        median(prefill_tps),
        median(decode_tps),
        median(decode_ms)
    );

    let (_, _, prefill_profile, decode_profile) = one_run(&model, &prompt, args.gen, true);
    print_profile(
        &format!("prefill ({} tokens, per prompt token)", args.prompt),
        &prefill_profile,
        args.prompt,
        args.top,
    );
    if args.gen > 0 {
        print_profile(
            &format!("decode ({} steps, per token)", args.gen),
            &decode_profile,
            args.gen,
            args.top,
        );
    }
    if let Some(mb) = peak_rss_mb() {
        println!("\npeak RSS {mb:.0} MB");
    }
    Ok(())
}
