//! Continuous batching on the tiny test model: sessions stepping at the same time run packed,
//! and each gets the logits it gets alone, bit for bit, in every weight layout.

mod common;

use std::sync::{Arc, Barrier};
use std::thread;

use common::{argmax, step, tiny_dir};
use slm_engine::{Model, Session, INTERLEAVED_PREFILL};

/// A session's script: a prompt, then greedy steps; one rewinds and continues.
struct Script {
    prompt: Vec<i64>,
    steps: usize,
    /// After this many steps, go back to this position and feed these tokens.
    rewind: Option<(usize, usize, Vec<i64>)>,
}

fn scripts() -> Vec<Script> {
    let prompt = |n: usize, seed: i64| -> Vec<i64> {
        (0..n as i64)
            .map(|i| (i * 7919 + seed * 104_729) % 49_000 + 1)
            .collect()
    };
    vec![
        Script {
            prompt: prompt(1, 1),
            steps: 14,
            rewind: None,
        },
        Script {
            prompt: prompt(9, 2),
            steps: 12,
            rewind: Some((5, 4, vec![17, 18])),
        },
        // Longer than a packed run gives a prompt beside decoding sessions: interleaved.
        Script {
            prompt: prompt(3 * INTERLEAVED_PREFILL + 5, 3),
            steps: 8,
            rewind: None,
        },
        Script {
            prompt: prompt(30, 4),
            steps: 10,
            rewind: None,
        },
        Script {
            prompt: prompt(2, 5),
            steps: 16,
            rewind: None,
        },
    ]
}

/// Runs `script`; the bits of every step's logits.
fn run(model: &Arc<Model>, script: &Script) -> Vec<Vec<u32>> {
    let mut s = Session::new(model.clone());
    let mut logits = step(&mut s, &script.prompt, 0);
    let mut out = vec![bits(&logits)];
    let mut pos = script.prompt.len();
    for i in 0..script.steps {
        if let Some((at, to, ids)) = &script.rewind {
            if *at == i {
                logits = step(&mut s, ids, *to);
                out.push(bits(&logits));
                pos = to + ids.len();
                continue;
            }
        }
        let next = argmax(&logits) as i64;
        logits = step(&mut s, &[next], pos);
        out.push(bits(&logits));
        pos += 1;
    }
    assert_eq!(s.cached_len(), pos);
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn concurrent_sessions_run_packed_with_the_logits_they_get_alone() {
    for file in [
        "model.onnx",
        "model_int8.onnx",
        "model_f32.onnx",
        "model_q4.onnx",
    ] {
        let model = Arc::new(Model::load(&tiny_dir().join(file)).unwrap());
        assert!(model.packs_sequences(), "{file}");
        let scripts = Arc::new(scripts());
        let alone: Vec<_> = scripts.iter().map(|s| run(&model, s)).collect();
        assert_eq!(
            model.batching_stats().packed_runs,
            0,
            "{file}: one session at a time"
        );

        let start = Arc::new(Barrier::new(scripts.len()));
        let together: Vec<_> = (0..scripts.len())
            .map(|i| {
                let (model, scripts, start) = (model.clone(), scripts.clone(), start.clone());
                thread::spawn(move || {
                    start.wait();
                    run(&model, &scripts[i])
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let stats = model.batching_stats();
        assert!(
            stats.packed_runs > 0 && stats.packed_steps >= 2 * stats.packed_runs,
            "{file}: {stats:?}"
        );
        for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(a.len(), t.len());
            for (step, (a, t)) in a.iter().zip(t).enumerate() {
                assert!(
                    a == t,
                    "{file}: session {i} step {step} differs when packed"
                );
            }
        }
        eprintln!("{file}: {stats:?}");
    }
}
