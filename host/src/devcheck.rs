//! `slm logits` (hidden, for scripts/gpu-check and the same-logits tests): greedy decoding
//! straight on the engine, no generator in the way, so two devices or builds can be compared
//! logit for logit (`--portable`: the engine compiled to wasm, dist/slm-nn.wasm). Prints one JSON line:
//! where the model ran, the greedy tokens, time to first token (prefill of the whole prompt,
//! median), decode speed, and the session contract checked on this device: a rewind
//! (`Session::truncate` through `position_ids`) and a prefix-cache restore (`KvSnapshot`) must
//! give the logits of a fresh prefill.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::json;
use slm_engine::{Model, Placement, Session, Tensor};

use crate::cli::{Global, LogitsArgs};
use crate::commands::NN_FILE;
use crate::nn_guest::{GuestContext, NnGuest};
use crate::registry::ModelRegistry;
use crate::runtime::find_component;
use crate::stats::median;

fn row(ids: &[i64]) -> Tensor {
    Tensor::from_i64(vec![1, ids.len()], ids)
}

/// Runs `ids` from position `start`; the last position's logits.
fn step(s: &mut Session, ids: &[i64], start: usize) -> Result<Vec<f32>> {
    let pos: Vec<i64> = (start as i64..(start + ids.len()) as i64).collect();
    let out = s
        .run(vec![
            ("input_ids".into(), row(ids)),
            ("position_ids".into(), row(&pos)),
        ])
        .map_err(|e| anyhow!("{e}"))?;
    let logits = out
        .into_iter()
        .find(|(n, _)| n == "logits")
        .context("no logits")?
        .1;
    logits.to_f32().context("logits are not f32")
}

/// The index of the largest value: the first of equal ones; NaN never wins, and 0 when no value is
/// above minus infinity.
fn argmax(v: &[f32]) -> i64 {
    let top = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    v.iter()
        .position(|&x| x == top && x > f32::NEG_INFINITY)
        .unwrap_or(0) as i64
}

fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
}

/// Where `slm logits` runs the steps: the engine in this process, or the in-wasm wasi:nn.
enum Runner {
    Native(Arc<Model>),
    Wasm { guest: NnGuest, model: String },
}

/// One sequence with its KV cache, on a [`Runner`].
enum Sequence {
    Native(Session),
    Wasm(GuestContext),
}

impl Runner {
    fn sequence(&mut self) -> Result<Sequence> {
        Ok(match self {
            Runner::Native(m) => Sequence::Native(Session::new(m.clone())),
            Runner::Wasm { guest, model } => Sequence::Wasm(guest.context(model)?),
        })
    }

    fn step(&mut self, s: &mut Sequence, ids: &[i64], start: usize) -> Result<Vec<f32>> {
        match (self, s) {
            (Runner::Native(_), Sequence::Native(s)) => step(s, ids, start),
            (Runner::Wasm { guest, .. }, Sequence::Wasm(c)) => guest.step(c, ids, start),
            _ => unreachable!("a sequence runs where it was made"),
        }
    }

    fn close(&mut self, s: Sequence) -> Result<()> {
        match (self, s) {
            (Runner::Wasm { guest, .. }, Sequence::Wasm(c)) => guest.drop_context(c),
            _ => Ok(()),
        }
    }
}

pub fn logits(registry: ModelRegistry, a: &LogitsArgs, global: &Global) -> Result<()> {
    let ids: Vec<i64> =
        serde_json::from_str(&a.ids).context("--ids: expected a JSON array of token ids")?;
    if ids.len() < 2 {
        bail!("--ids: give at least 2 token ids");
    }
    if a.portable && a.plain {
        bail!("--portable and --plain: give one of them");
    }
    let registry = Arc::new(registry);
    let name = a
        .model
        .clone()
        .or_else(|| registry.default_model())
        .ok_or_else(|| anyhow!("no models found in {}", registry.dir().display()))?;
    let lazy = registry
        .model(&name)
        .ok_or_else(|| anyhow!("model {name:?} not found in {}", registry.dir().display()))?;
    let t = Instant::now();
    let (mut runner, placed): (Runner, String) = if a.portable {
        let file = find_component(global.component.as_deref(), NN_FILE)?;
        let mut guest = NnGuest::new(&file, registry.clone())?;
        // Loaded (and packed) here, so that load_ms counts it as the native path's does.
        let ctx = guest.context(&name)?;
        guest.drop_context(ctx)?;
        (
            Runner::Wasm {
                guest,
                model: name.clone(),
            },
            "wasm32 (slm-nn.wasm)".into(),
        )
    } else if a.plain {
        // The model's own file: a GGUF's is its converted directory's, not under the models dir.
        (
            Runner::Native(Arc::new(
                Model::load_plain(lazy.path()).map_err(|e| anyhow!("{e}"))?,
            )),
            "CPU (plain f32 plan)".into(),
        )
    } else {
        let m = lazy.get().map_err(|e| anyhow!("{e}"))?;
        (
            Runner::Native(m),
            lazy.placed().cloned().unwrap_or(Placement::Cpu).to_string(),
        )
    };
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let on_gpu = !a.plain && !a.portable && matches!(lazy.placed(), Some(Placement::Gpu(_)));
    let n = ids.len();
    let follow: Option<Vec<i64>> = match &a.follow {
        Some(f) => {
            Some(serde_json::from_str(f).context("--follow: expected a JSON array of token ids")?)
        }
        None => None,
    };
    if follow.as_ref().is_some_and(|f| f.len() < a.steps) {
        bail!("--follow: give at least --steps ({}) tokens", a.steps);
    }

    // Time to first token: a fresh sequence's prefill of the whole prompt (the first one warms up).
    let mut ttfts = Vec::new();
    for i in 0..=a.runs.max(1) {
        let mut s = runner.sequence()?;
        let t = Instant::now();
        runner.step(&mut s, &ids, 0)?;
        if i > 0 {
            ttfts.push(t.elapsed().as_secs_f64() * 1e3);
        }
        runner.close(s)?;
    }

    // Greedy decoding, every step's logits kept.
    let mut s = runner.sequence()?;
    let first = runner.step(&mut s, &ids, 0)?;
    let mut rows = vec![first.clone()];
    let mut tokens = vec![argmax(&first)];
    let t = Instant::now();
    for i in 0..a.steps {
        let feed = follow.as_ref().map_or(tokens[i], |f| f[i]);
        let next = runner.step(&mut s, &[feed], n + i)?;
        tokens.push(argmax(&next));
        rows.push(next);
    }
    let decode_s = t.elapsed().as_secs_f64();
    let gpu_mem = if on_gpu {
        slm_engine::gpu_memory_mib().map(|(used, _)| used)
    } else {
        None
    };

    // The contract on this device: rewind to the middle of the prompt and recompute its end;
    // seed a new session from a snapshot of the prompt and recompute its last token (the engine's
    // API: natively only).
    let half = n / 2;
    let rewound = runner.step(&mut s, &ids[half..], half)?;
    let restored = match &mut s {
        Sequence::Native(native) => {
            let snapshot = native.snapshot();
            let Runner::Native(model) = &runner else {
                unreachable!("a native sequence runs natively")
            };
            let mut s2 = Session::new(model.clone());
            s2.restore(&snapshot, n - 1).map_err(|e| anyhow!("{e}"))?;
            Some(step(&mut s2, &ids[n - 1..], n - 1)?)
        }
        Sequence::Wasm(_) => None,
    };
    runner.close(s)?;

    if let Some(out) = &a.out {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(out)
                .with_context(|| format!("cannot write {}", out.display()))?,
        );
        for r in &rows {
            for x in r {
                f.write_all(&x.to_le_bytes())?;
            }
        }
        f.flush()?;
    }
    let report = json!({
        "model": name,
        "device": placed,
        "prompt_tokens": n,
        "steps": a.steps,
        "vocab": first.len(),
        "tokens": tokens,
        "load_ms": load_ms,
        "ttft_ms": median(ttfts),
        "decode_tps": if decode_s > 0.0 { a.steps as f64 / decode_s } else { 0.0 },
        "rewind_max_abs_diff": max_diff(&rewound, &first),
        "snapshot_max_abs_diff": restored.map(|r| max_diff(&r, &first)),
        "gpu_memory_used_mib": gpu_mem,
    });
    println!("{report}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::argmax;

    #[test]
    fn argmax_takes_the_first_largest_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, 0.5, f32::NAN]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[]), 0);
    }
}
