//! slm-engine on the tiny test model: KV-cache contract, rewinds, stateless mode, input errors,
//! and logits parity with ONNX Runtime.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{argmax, max_diff, output, root, stateless_inputs, step, tiny_dir};
use slm_engine::names::{INPUT_IDS, LOGITS, POSITION_IDS, PRESENT_PREFIX};
use slm_engine::{DType, EngineError, Model, Session, Tensor};

// Keep in sync with tests/engine_script.py.
const PREFILL: [i64; 10] = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47];
const STEPS: [i64; 3] = [2, 198, 1];
const REWIND_AT: usize = 6;
const REWIND_IDS: [i64; 2] = [30, 31];
/// Max |ours - ONNX Runtime| on the tiny model's Q4_1 logits (see `logits_match_onnx_runtime`):
/// measured 1.2 on logits up to 50 (std 8). A weight read wrongly moves them by 5 or more.
const TOL_Q4_1: f32 = 2.5;

/// The tiny model in every weight layout.
const LAYOUTS: [&str; 4] = [
    "model.onnx",
    "model_int8.onnx",
    "model_f32.onnx",
    "model_q4.onnx",
];

fn load(file: &str) -> Arc<Model> {
    Arc::new(Model::load(&tiny_dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}")))
}

/// The script of the parity test, through the engine.
fn engine_script(model: &Arc<Model>) -> Vec<Vec<f32>> {
    let mut s = Session::new(model.clone());
    let mut out = vec![step(&mut s, &PREFILL, 0)];
    for (i, t) in STEPS.into_iter().enumerate() {
        out.push(step(&mut s, &[t], PREFILL.len() + i));
    }
    out.push(step(&mut s, &REWIND_IDS, REWIND_AT));
    assert_eq!(s.cached_len(), REWIND_AT + REWIND_IDS.len());
    out
}

#[test]
fn every_layout_loads_and_reports_its_shape() {
    for file in LAYOUTS {
        let m = load(file);
        let info = m.info();
        assert_eq!(
            (info.layers, info.kv_heads, info.head_dim, info.vocab),
            (2, 2, 16, 49152),
            "{file}"
        );
    }
}

#[test]
fn attention_is_fused_in_every_layout() {
    // One SlmAttention per layer; `logits_match_onnx_runtime` checks what it computes.
    for file in LAYOUTS {
        assert_eq!(load(file).fused_attentions(), 2, "{file}");
    }
}

#[test]
fn rotary_embeddings_are_fused_in_every_layout() {
    // q and k in each layer; `logits_match_onnx_runtime` checks what they compute, and the
    // op's unit test that the bits are the unfused graph's.
    for file in LAYOUTS {
        assert_eq!(load(file).fused_rotations(), 4, "{file}");
    }
}

#[test]
fn quantized_weights_stay_quantized() {
    // Default (Q4_1): 7 matrix products per layer on Q4_1 weights, the tied LM head int8 with
    // 8-bit activations. int8: all 7 and the head on int8 (f32 activations). The f32 reference
    // runs all 7 and the head on our one-order f32 kernel; q4 (symmetric, f32 scales that
    // float16 cannot hold) runs its 7 on 4-bit blocks with f32 scales, and so its int8 head with
    // 8-bit activations too. The embedding lookup reads the rows of the tied head's table (held
    // once).
    for (file, q4_1, q8_head, int8, f32s, gathers) in [
        ("model.onnx", 2 * 7, 1, 0, 0, 1),
        ("model_int8.onnx", 0, 0, 2 * 7 + 1, 0, 1),
        ("model_f32.onnx", 0, 0, 0, 2 * 7 + 1, 1),
        ("model_q4.onnx", 2 * 7, 1, 0, 0, 1),
    ] {
        let m = load(file);
        assert_eq!(
            (
                m.q4_1_matmuls(),
                m.q8_heads(),
                m.int8_matmuls(),
                m.f32_matmuls(),
                m.table_gathers()
            ),
            (q4_1, q8_head, int8, f32s, gathers),
            "{file}"
        );
    }
}

#[test]
fn logits_match_onnx_runtime() {
    // Tolerance: f32 and int8 kernels differ from ONNX Runtime's in summation order only; 2e-3
    // absolute on logits of magnitude ~10. The Q4_1 kernels also round activations to 8 bits per
    // block of 32 (ONNX Runtime keeps them f32), which moves these logits by up to TOL_Q4_1; its
    // effect on perplexity is bounded on the real model (tests/python/test_quality.py). Our
    // KV cache holds float16 keys and values (ONNX Runtime's f32): up to 0.007 more measured.
    let mut failures = vec![];
    for (file, tolerance) in [
        ("model_f32.onnx", 0.012),
        ("model_int8.onnx", 0.012),
        ("model.onnx", TOL_Q4_1),
    ] {
        let out = root().join(format!("target/test-models/ort-{file}.json"));
        let status = Command::new(root().join(".venv/bin/python"))
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ort_reference.py"))
            .args([tiny_dir().as_os_str(), file.as_ref(), out.as_os_str()])
            .status()
            .expect("run .venv/bin/python (scripts/setup makes it)");
        assert!(status.success(), "ONNX Runtime reference failed for {file}");
        let reference: Vec<Vec<f32>> = serde_json_lite(&std::fs::read_to_string(&out).unwrap());
        let ours = engine_script(&load(file));
        assert_eq!(ours.len(), reference.len());
        let diffs: Vec<f32> = ours
            .iter()
            .zip(&reference)
            .map(|(a, b)| max_diff(a, b))
            .collect();
        eprintln!("{file}: max |tract - ort| per step {diffs:?}");
        let same_top1 = ours
            .iter()
            .zip(&reference)
            .all(|(a, b)| argmax(a) == argmax(b));
        if diffs.iter().any(|d| *d >= tolerance) || !same_top1 {
            failures.push(format!("{file}: max |tract - ort| per step {diffs:?} (bound {tolerance}), same top-1: {same_top1}"));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// q4 (MatMulNBits, not faithful and not the default) runs in tract, but its logits are far from
/// ONNX Runtime's on the full decoder although a lone MatMulNBits node agrees (to the f16 rounding
/// of the scales): a tract-side issue to chase upstream. Here: it runs and gives finite logits.
#[test]
fn q4_layout_runs() {
    let logits = engine_script(&load("model_q4.onnx"));
    assert!(logits.iter().flatten().all(|v| v.is_finite()));
}

/// Parses a JSON array of arrays of numbers (keeps the engine's dev-dependencies empty).
fn serde_json_lite(text: &str) -> Vec<Vec<f32>> {
    text.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split("], [")
        .map(|row| {
            row.trim_matches(|c| c == '[' || c == ']')
                .split(", ")
                .map(|v| v.parse().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn prefill_equals_token_by_token_and_rewind_equals_fresh_run() {
    let m = load("model.onnx");
    let mut whole = Session::new(m.clone());
    let all_at_once = step(&mut whole, &PREFILL, 0);
    let mut one = Session::new(m.clone());
    let mut last = vec![];
    for (i, t) in PREFILL.iter().enumerate() {
        last = step(&mut one, &[*t], i);
    }
    assert!(max_diff(&all_at_once, &last) < 1e-3);

    // Rewind to position 4 and continue with other tokens == a fresh session on that prefix.
    let rewound = step(&mut one, &[7, 8], 4);
    let mut fresh = Session::new(m);
    let expected = step(
        &mut fresh,
        &[PREFILL[0], PREFILL[1], PREFILL[2], PREFILL[3], 7, 8],
        0,
    );
    assert!(max_diff(&rewound, &expected) < 1e-3);
    // Position 0 resets.
    let again = step(&mut one, &PREFILL, 0);
    assert!(max_diff(&again, &all_at_once) < 1e-5);
}

#[test]
fn a_long_prefill_runs_in_chunks_with_the_same_logits() {
    // 230 tokens (the tiny model's context is 256) through every layout: in one run of the plan,
    // in chunks of 64 (the last one partial) and of 7; then two decode steps on each cache.
    let vocab = load("model.onnx").info().vocab as i64;
    let ids: Vec<i64> = (0..230).map(|i| (i * 7919 + 13) % vocab).collect();
    for file in ["model.onnx", "model_int8.onnx", "model_f32.onnx"] {
        let m = load(file);
        let run = |chunk: usize| {
            let mut s = Session::new(m.clone());
            s.set_prefill_chunk(chunk);
            let mut out = vec![step(&mut s, &ids, 0)];
            assert_eq!(s.cached_len(), ids.len());
            for (i, t) in [5, 9].into_iter().enumerate() {
                out.push(step(&mut s, &[t], ids.len() + i));
            }
            out
        };
        let whole = run(usize::MAX);
        for chunk in [64, 7] {
            let chunked = run(chunk);
            for (a, b) in whole.iter().zip(&chunked) {
                let (a, b): (Vec<u32>, Vec<u32>) = (
                    a.iter().map(|x| x.to_bits()).collect(),
                    b.iter().map(|x| x.to_bits()).collect(),
                );
                assert!(a == b, "{file}: chunks of {chunk} changed the logits");
            }
        }
    }
}

#[test]
fn stateless_calls_match_stateful() {
    let m = load("model_f32.onnx");
    let inputs = stateless_inputs(m.info(), &PREFILL[..3]);
    let info = m.info().clone();
    let mut s = Session::new(m.clone());
    let out = s.run(inputs).unwrap();
    assert_eq!(
        out.len(),
        1 + 2 * info.layers,
        "stateless calls return every output"
    );
    let present = output(&out, &format!("{PRESENT_PREFIX}0.key")).unwrap();
    assert_eq!(present.dims, vec![1, info.kv_heads, 3, info.head_dim]);
    let logits = output(&out, LOGITS).unwrap().to_f32().unwrap();
    let mut stateful = Session::new(m);
    assert!(max_diff(&logits, &step(&mut stateful, &PREFILL[..3], 0)) < 1e-5);
}

/// The bits of a logits row, for exact comparisons.
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn the_kv_cache_stays_in_place_and_equals_the_concatenated_one_bit_for_bit() {
    // The session's cache lives in the attention ops (written in place); a stateless call
    // concatenates the cache it is given. Over a 64-step greedy generation both give the same
    // logits, bit for bit, and a snapshot taken midway still seeds the same continuation after
    // its session wrote past it (copy-on-write).
    for file in ["model.onnx", "model_int8.onnx", "model_f32.onnx"] {
        let m = load(file);
        assert!(m.kv_in_place(), "{file}: the KV cache is concatenated");
        let info = m.info().clone();
        let mut session = Session::new(m.clone());
        let mut stateless = Session::new(m.clone());
        let mut inputs = stateless_inputs(&info, &PREFILL);
        let mut ids: Vec<i64> = PREFILL.to_vec();
        let mut logits = step(&mut session, &PREFILL, 0);
        let mut history = vec![logits.clone()];
        let mut snapshot = None;
        for i in 0..64 {
            let out = stateless.run(inputs.clone()).unwrap();
            let expected = output(&out, LOGITS).unwrap().to_f32().unwrap();
            let last = &expected[expected.len() - info.vocab..];
            assert_eq!(bits(&logits), bits(last), "{file}: step {i}");
            let next = argmax(&logits) as i64;
            if i == 20 {
                snapshot = Some(session.snapshot());
            }
            let pos = ids.len();
            ids.push(next);
            inputs = vec![
                (INPUT_IDS.into(), Tensor::from_i64(vec![1, 1], &[next])),
                (
                    POSITION_IDS.into(),
                    Tensor::from_i64(vec![1, 1], &[pos as i64]),
                ),
            ];
            for (name, t) in out
                .into_iter()
                .filter(|(n, _)| n.starts_with(PRESENT_PREFIX))
            {
                inputs.push((name.replacen(PRESENT_PREFIX, "past_key_values.", 1), t));
            }
            logits = step(&mut session, &[next], pos);
            history.push(logits.clone());
        }
        // The snapshot covers PREFILL and 20 generated tokens; seed it 2 tokens short.
        let snapshot = snapshot.unwrap();
        let at = PREFILL.len() + 20 - 2;
        assert_eq!(snapshot.len(), PREFILL.len() + 20);
        let mut seeded = Session::new(m.clone());
        seeded.restore(&snapshot, at).unwrap();
        for pos in at..at + 5 {
            let got = step(&mut seeded, &[ids[pos]], pos);
            assert_eq!(
                bits(&got),
                bits(&history[pos + 1 - PREFILL.len()]),
                "{file}: {pos}"
            );
        }
        // The snapshot's own positions are unchanged by what `seeded` wrote after `at`.
        let mut again = Session::new(m);
        again.restore(&snapshot, snapshot.len()).unwrap();
        let pos = snapshot.len();
        let got = step(&mut again, &[ids[pos]], pos);
        assert_eq!(
            bits(&got),
            bits(&history[pos + 1 - PREFILL.len()]),
            "{file}: restored"
        );
    }
}

#[test]
fn stateless_past_tensors_must_be_whole() {
    // A session passes 0-wide past tensors to the plan; a caller's stateless call may not.
    let m = load("model.onnx");
    let info = m.info().clone();
    let mut inputs = stateless_inputs(&info, &PREFILL[..2]);
    for (name, t) in inputs.iter_mut() {
        if name.starts_with("past_key_values.") {
            *t = Tensor::from_f32(vec![1, info.kv_heads, 0, 0], &[]);
        }
    }
    let mut s = Session::new(m);
    match s.run(inputs) {
        Err(EngineError::InvalidInput(msg)) => assert!(msg.contains("past_key_values"), "{msg}"),
        other => panic!("expected an input error, got {other:?}"),
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let m = load("model.onnx");
    let mut s = Session::new(m);
    let cases: Vec<Vec<(String, Tensor)>> = vec![
        vec![],
        vec![(INPUT_IDS.into(), Tensor::from_f32(vec![1, 2], &[1.0, 2.0]))],
        vec![(INPUT_IDS.into(), Tensor::from_i64(vec![2], &[1, 2]))],
        vec![(INPUT_IDS.into(), Tensor::from_i64(vec![1, 0], &[]))],
        vec![("nonsense".into(), Tensor::from_i64(vec![1, 1], &[1]))],
        vec![
            (INPUT_IDS.into(), Tensor::from_i64(vec![1, 2], &[1, 2])),
            (POSITION_IDS.into(), Tensor::from_i64(vec![1, 2], &[5, 6])),
        ],
        vec![
            (INPUT_IDS.into(), Tensor::from_i64(vec![1, 2], &[1, 2])),
            (POSITION_IDS.into(), Tensor::from_i64(vec![1, 2], &[0, 0])),
        ],
        vec![(
            INPUT_IDS.into(),
            Tensor::from_i64(vec![1, 1], &[10_000_000]),
        )],
    ];
    for inputs in cases {
        let what = format!(
            "{:?}",
            inputs.iter().map(|(n, t)| (n, &t.dims)).collect::<Vec<_>>()
        );
        match s.run(inputs) {
            Err(EngineError::InvalidInput(_)) | Err(EngineError::Runtime(_)) => {}
            other => panic!("{what}: expected an error, got {other:?}"),
        }
    }
    assert!(Tensor::new(vec![2, 2], DType::F32, vec![0; 3]).is_err());
    // The session still works after errors.
    assert_eq!(step(&mut s, &[1, 2], 0).len(), 49152);
}

#[test]
fn missing_and_corrupt_models_are_load_errors() {
    let dir = std::env::temp_dir().join(format!("slm-engine-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("model.onnx");
    std::fs::write(&garbage, b"this is not an onnx file").unwrap();
    for path in [dir.join("absent.onnx"), garbage] {
        match Model::load(&path) {
            Err(EngineError::Load { message, .. }) => assert!(!message.is_empty()),
            other => panic!("{}: expected a load error, got {other:?}", path.display()),
        }
    }
    assert!(matches!(
        Model::from_bytes(b"\x08\x01garbage"),
        Err(EngineError::Load { .. })
    ));
    // A file cut short is a load error too.
    let bytes = std::fs::read(tiny_dir().join("model.onnx")).unwrap();
    let cut = dir.join("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(Model::load(&cut), Err(EngineError::Load { .. })));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn loading_from_bytes_equals_loading_the_file() {
    let from_file = load("model.onnx");
    let bytes = std::fs::read(tiny_dir().join("model.onnx")).unwrap();
    let from_bytes = Arc::new(Model::from_bytes(&bytes).unwrap());
    assert_eq!(from_bytes.int8_matmuls(), from_file.int8_matmuls());
    assert_eq!(from_bytes.q4_1_matmuls(), from_file.q4_1_matmuls());
    let a = step(&mut Session::new(from_file), &PREFILL, 0);
    let b = step(&mut Session::new(from_bytes), &PREFILL, 0);
    assert_eq!(a, b);
}
