//! Fuzzing the wasi:nn layer (issue 16, "Fuzzing"): tensors of any shape, type and byte length,
//! token ids out of range, positions negative or huge, empty inputs, wrong tensor names, dims
//! whose product overflows. `NnTensor::into_engine` and `ExecContext::compute` give a typed
//! `NnError` (invalid-argument for the caller's tensors) or a result, never a panic; after an
//! error the context still computes a valid step exactly as a fresh context does.
//!
//! Deterministic: cases come from fixed seeds; a failure names the case and its inputs.

#[path = "../../engine/tests/fuzz_common/mod.rs"]
mod fuzz_common;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use fuzz_common::{Rng, Tally};
use slm_wasi_nn::names::{ATTENTION_MASK, CACHED_TOKENS, INPUT_IDS, LOGITS, POSITION_IDS};
use slm_wasi_nn::{DType, ErrorKind, ExecContext, NnError, NnTensor, PrefixCache};

const DTYPES: [DType; 7] = [
    DType::F16,
    DType::F32,
    DType::F64,
    DType::BF16,
    DType::U8,
    DType::I32,
    DType::I64,
];

/// The tiny test model, loaded once per test binary.
fn model() -> Arc<slm_engine::Model> {
    static MODEL: OnceLock<Arc<slm_engine::Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/test-models/tiny/model.onnx");
            let m = slm_wasi_nn::load_file(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (scripts/test builds it)", path.display()));
            Arc::new(m)
        })
        .clone()
}

fn i64_tensor(values: &[i64]) -> NnTensor {
    NnTensor {
        dimensions: vec![1, values.len() as u32],
        ty: DType::I64,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// A stateful step: `ids` at positions `start..` (wrapping past i64::MAX: a wrong call).
fn step_inputs(ids: &[i64], start: i64) -> Vec<(String, NnTensor)> {
    let pos: Vec<i64> = (0..ids.len() as i64)
        .map(|i| start.wrapping_add(i))
        .collect();
    vec![
        (INPUT_IDS.into(), i64_tensor(ids)),
        (POSITION_IDS.into(), i64_tensor(&pos)),
    ]
}

/// The logits of a step's outputs (`cached_tokens` may come with them).
fn logits(outputs: &[(String, NnTensor)]) -> Vec<u8> {
    for (name, _) in outputs {
        assert!(
            name == LOGITS || name == CACHED_TOKENS,
            "unexpected output {name}"
        );
    }
    let (_, t) = outputs.iter().find(|(n, _)| n == LOGITS).expect("logits");
    assert_eq!(t.ty, DType::F32);
    assert_eq!(t.dimensions.len(), 3);
    assert_eq!(
        t.data.len(),
        4 * t.dimensions.iter().product::<u32>() as usize
    );
    t.data.clone()
}

/// Dimensions: usually small, sometimes huge, sometimes chosen so that their product overflows
/// (and wraps to a small number, which an unchecked product would accept).
fn dims(rng: &mut Rng) -> Vec<u32> {
    match rng.below(10) {
        0 => vec![65536; 4],
        1 => vec![u32::MAX; 1 + rng.below(4)],
        2 => vec![1 << 31, 2, 1 << 31, 2],
        _ => {
            let rank = rng.below(5);
            (0..rank)
                .map(|_| *rng.pick(&[0, 1, 1, 1, 2, 3, 4, 7, 64, 4096, 65536, u32::MAX]))
                .collect()
        }
    }
}

/// The byte length `dims` of `ty` need, if it fits in memory.
fn needed(dims: &[u32], ty: DType) -> Option<usize> {
    let n = dims
        .iter()
        .try_fold(1u128, |a, &d| a.checked_mul(d as u128))?;
    usize::try_from(n * ty.size() as u128).ok()
}

/// Element values that probe the checks: token ids in and out of the vocabulary, positions
/// negative and near the end of i64.
fn value(rng: &mut Rng) -> i64 {
    *rng.pick(&[
        0,
        1,
        2,
        5,
        49151,
        49152,
        -1,
        i64::MIN,
        i64::MAX,
        i64::MAX - 1,
        1 << 32,
        -(1 << 31),
    ])
}

/// A tensor that may be anything: any type, shape and byte length.
fn tensor(rng: &mut Rng) -> NnTensor {
    let ty = *rng.pick(&DTYPES);
    let dimensions = dims(rng);
    let len = match needed(&dimensions, ty) {
        Some(n) if n <= 1 << 16 && rng.chance(70) => n,
        _ => rng.below(64),
    };
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        if matches!(ty, DType::I64) && rng.chance(80) {
            data.extend(value(rng).to_le_bytes());
        } else if matches!(ty, DType::I32) && rng.chance(80) {
            data.extend((value(rng) as i32).to_le_bytes());
        } else {
            data.push(rng.next() as u8);
        }
    }
    data.truncate(len);
    NnTensor {
        dimensions,
        ty,
        data,
    }
}

/// A call that looks like a stateful step but is wrong in one or two ways.
fn near_step(rng: &mut Rng) -> Vec<(String, NnTensor)> {
    let n = 1 + rng.below(4);
    let ids: Vec<i64> = (0..n)
        .map(|_| {
            if rng.chance(70) {
                rng.below(49152) as i64
            } else {
                value(rng)
            }
        })
        .collect();
    let start = if rng.chance(50) {
        rng.below(3) as i64
    } else {
        value(rng)
    };
    let mut inputs = step_inputs(&ids, start);
    match rng.below(8) {
        0 => inputs.truncate(1),
        1 => inputs[1].1.data.truncate(8),
        2 => inputs[0].1.dimensions = vec![n as u32],
        3 => inputs[1].1.dimensions = vec![1, 1, n as u32],
        4 => inputs[0].1.ty = DType::I32,
        5 => inputs.push((ATTENTION_MASK.into(), i64_tensor(&vec![1; n]))),
        6 => inputs.swap(0, 1),
        _ => {
            // Non-consecutive positions.
            let pos: Vec<i64> = (0..n).map(|_| value(rng)).collect();
            inputs[1].1 = i64_tensor(&pos);
        }
    }
    inputs
}

/// A call with any names and any tensors.
fn junk(rng: &mut Rng) -> Vec<(String, NnTensor)> {
    let names = [
        INPUT_IDS,
        INPUT_IDS,
        POSITION_IDS,
        ATTENTION_MASK,
        "past_key_values.0.key",
        "past_key_values.1.value",
        "past_key_values.9.key",
        LOGITS,
        "present.0.key",
        CACHED_TOKENS,
        "",
        "input_ids ",
        "\u{0}",
    ];
    (0..rng.below(5))
        .map(|_| (rng.pick(&names).to_string(), tensor(rng)))
        .collect()
}

/// A stateless call (every input of the model, `past_key_values.*` included) that is right but
/// for one or two things: shapes, types, lengths that disagree, positions anywhere.
fn stateless(rng: &mut Rng, model: &slm_engine::Model) -> Vec<(String, NnTensor)> {
    let s = 1 + rng.below(3);
    let mut inputs = stateless_inputs(model, s, rng.below(3) as u32);
    for _ in 0..1 + rng.below(2) {
        let i = rng.below(inputs.len());
        let t = &mut inputs[i].1;
        match rng.below(7) {
            0 => {
                let d = rng.below(t.dimensions.len());
                t.dimensions[d] = *rng.pick(&[0, 2, 3, 17, 300]);
                let n = needed(&t.dimensions, t.ty).unwrap();
                t.data.resize(n, 0);
            }
            1 => {
                t.dimensions.push(1);
            }
            2 => {
                let n = t.dimensions.len();
                t.dimensions = vec![t.dimensions.iter().product(), 1][..n.min(2)].to_vec();
            }
            3 => {
                // The same bytes as another type of that size.
                t.ty = match t.ty {
                    DType::F32 => DType::I32,
                    _ => DType::F64,
                };
            }
            4 => {
                let values: Vec<i64> = (0..s).map(|_| value(rng)).collect();
                *t = i64_tensor(&values);
            }
            5 => {
                inputs.remove(i);
            }
            _ => {
                let name = inputs[i].0.clone();
                let copy = inputs[i].1.clone();
                inputs.push((name, copy));
            }
        }
    }
    inputs
}

/// A valid stateless call: every input of `model`, `s` new tokens after `past` cached ones.
fn stateless_inputs(model: &slm_engine::Model, s: usize, past: u32) -> Vec<(String, NnTensor)> {
    let info = model.info();
    let f32s = |dims: Vec<u32>| {
        let n = dims.iter().product::<u32>() as usize;
        NnTensor {
            dimensions: dims,
            ty: DType::F32,
            data: (0..n)
                .flat_map(|i| ((i % 7) as f32 * 0.1).to_le_bytes())
                .collect(),
        }
    };
    model
        .input_names()
        .iter()
        .map(|name| {
            let t = match name.as_str() {
                INPUT_IDS => i64_tensor(&(0..s).map(|i| i as i64 + 1).collect::<Vec<_>>()),
                POSITION_IDS => i64_tensor(
                    &(0..s)
                        .map(|i| (past as usize + i) as i64)
                        .collect::<Vec<_>>(),
                ),
                ATTENTION_MASK => i64_tensor(&vec![1; past as usize + s]),
                _ => f32s(vec![1, info.kv_heads as u32, past, info.head_dim as u32]),
            };
            (name.clone(), t)
        })
        .collect()
}

fn describe(inputs: &[(String, NnTensor)]) -> String {
    let parts: Vec<String> = inputs
        .iter()
        .map(|(n, t)| {
            let head = &t.data[..t.data.len().min(24)];
            format!(
                "{n:?}: {:?} {:?} {} bytes {head:?}",
                t.ty,
                t.dimensions,
                t.data.len()
            )
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

#[test]
fn tensor_conversion_checks_every_shape() {
    let started = Instant::now();
    let mut rng = Rng(0x7465_6e73);
    let mut tally = Tally::new();
    for case in 0..2000 {
        let t = tensor(&mut rng);
        let what = format!(
            "case {case}: {:?} {:?} {} bytes",
            t.ty,
            t.dimensions,
            t.data.len()
        );
        let want = needed(&t.dimensions, t.ty);
        let len = t.data.len();
        tally.run(
            || what.clone(),
            || match t.clone().into_engine() {
                Ok(e) => {
                    assert_eq!(want, Some(len), "{what}: accepted a wrong byte length");
                    assert_eq!(e.data.len(), len);
                    true
                }
                Err(e) => {
                    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{what}: {e}");
                    assert_ne!(want, Some(len), "{what}: refused a right byte length: {e}");
                    false
                }
            },
        );
    }
    tally.check("tensor conversion", started, |_| true);
}

/// Dims whose product overflows usize: the byte count must not wrap (regression: [65536; 4] of
/// i64 with no bytes was accepted, 65536^4 * 8 wrapping to 0).
#[test]
fn overflowing_dims_are_invalid_arguments() {
    for (dims, ty) in [
        (vec![65536; 4], DType::I64),
        (vec![65536; 4], DType::U8),
        (vec![1 << 31, 2, 1 << 31, 2, 1 << 31], DType::F32),
        (vec![u32::MAX; 3], DType::I32),
    ] {
        let t = NnTensor {
            dimensions: dims.clone(),
            ty,
            data: vec![],
        };
        let e = t.into_engine().expect_err(&format!("{dims:?}"));
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{dims:?}: {e}");
    }
}

/// Runs `inputs` on `ctx`, then checks it still computes a valid prefill as a fresh context
/// does. Returns whether `inputs` succeeded.
fn check_call(
    ctx: &mut ExecContext,
    inputs: Vec<(String, NnTensor)>,
    fresh: &[u8],
    what: &str,
) -> bool {
    let ok = match ctx.compute(inputs) {
        Ok(outputs) => {
            for (name, t) in &outputs {
                assert!(
                    needed(&t.dimensions, t.ty) == Some(t.data.len()),
                    "{what}: output {name} is malformed"
                );
            }
            true
        }
        Err(NnError { kind, message }) => {
            // Stateless calls included: the session checks their shapes against the model's
            // inputs before tract runs (tract's own check would be an engine error).
            assert_eq!(kind, ErrorKind::InvalidArgument, "{what}: {message}");
            assert!(
                !message.contains("panicked") && !message.contains("engine failed"),
                "{what}: the engine panicked (caught): {message}"
            );
            false
        }
    };
    let again = ctx
        .compute(step_inputs(&PROMPT, 0))
        .unwrap_or_else(|e| panic!("{what}: a valid step after it failed: {e}"));
    assert!(
        logits(&again) == fresh,
        "{what}: the next step's logits differ from a fresh run"
    );
    ok
}

const PROMPT: [i64; 3] = [1, 2, 3];

fn wrong_calls(seed: u64, cases: usize, prefix: bool, test: &str) {
    let started = Instant::now();
    let model = model();
    let fresh = logits(
        &ExecContext::new(model.clone(), None)
            .compute(step_inputs(&PROMPT, 0))
            .unwrap(),
    );
    let cache = prefix.then(|| Arc::new(PrefixCache::new(64 << 20)));
    let mut rng = Rng(seed);
    let mut tally = Tally::new();
    let mut ctx = ExecContext::new(model.clone(), cache.clone());
    for case in 0..cases {
        // Sometimes from a context that holds tokens already.
        if rng.chance(30) {
            let n = 1 + rng.below(4);
            let ids: Vec<i64> = (0..n).map(|_| rng.below(49152) as i64).collect();
            ctx.compute(step_inputs(&ids, 0)).expect("a valid prefill");
        }
        let inputs = match rng.below(3) {
            0 => near_step(&mut rng),
            1 => stateless(&mut rng, &model),
            _ => junk(&mut rng),
        };
        let what = format!("{test} case {case}: {}", describe(&inputs));
        tally.run(
            || what.clone(),
            || check_call(&mut ctx, inputs, &fresh, &what),
        );
        if rng.chance(10) {
            ctx = ExecContext::new(model.clone(), cache.clone());
        }
    }
    tally.check(test, started, |_| true);
}

#[test]
fn wrong_calls_are_typed_errors_and_the_context_recovers() {
    wrong_calls(0x6374_7831, 500, false, "wrong calls");
}

#[test]
fn wrong_calls_with_a_prefix_cache() {
    wrong_calls(0x6374_7832, 250, true, "wrong calls (prefix cache)");
}

/// The boundary cases one by one, each on a fresh context: what the random cases may miss.
#[test]
fn named_wrong_calls() {
    let model = model();
    let fresh = logits(
        &ExecContext::new(model.clone(), None)
            .compute(step_inputs(&PROMPT, 0))
            .unwrap(),
    );
    let empty = |ty| NnTensor {
        dimensions: vec![1, 0],
        ty,
        data: vec![],
    };
    let cases: Vec<(&str, Vec<(String, NnTensor)>)> = vec![
        ("no inputs", vec![]),
        (
            "empty input_ids",
            vec![(INPUT_IDS.into(), empty(DType::I64))],
        ),
        ("token id -1", step_inputs(&[-1], 0)),
        ("token id = vocab", step_inputs(&[49152], 0)),
        ("token id i64::MAX", step_inputs(&[i64::MAX], 0)),
        ("token id i64::MIN", step_inputs(&[i64::MIN], 0)),
        ("negative position", step_inputs(&[1, 2], -1)),
        ("position i64::MIN", step_inputs(&[1, 2], i64::MIN)),
        (
            "positions wrapping past i64::MAX",
            step_inputs(&[1, 2], i64::MAX),
        ),
        ("position ahead of the cache", step_inputs(&[1], 5)),
        (
            "f32 input_ids",
            vec![(
                INPUT_IDS.into(),
                NnTensor {
                    dimensions: vec![1, 1],
                    ty: DType::F32,
                    data: 1f32.to_le_bytes().to_vec(),
                },
            )],
        ),
        (
            "bf16 past",
            vec![(
                "past_key_values.0.key".into(),
                NnTensor {
                    dimensions: vec![1, 2, 0, 16],
                    ty: DType::BF16,
                    data: vec![],
                },
            )],
        ),
        (
            "unknown name",
            vec![("inputs_ids".into(), i64_tensor(&[1]))],
        ),
        ("an output's name", vec![(LOGITS.into(), i64_tensor(&[1]))]),
        ("empty name", vec![(String::new(), i64_tensor(&[1]))]),
        (
            "huge dims",
            vec![(
                INPUT_IDS.into(),
                NnTensor {
                    dimensions: vec![65536; 4],
                    ty: DType::I64,
                    data: vec![],
                },
            )],
        ),
    ];
    let mut tally = Tally::new();
    for (name, inputs) in cases {
        let mut ctx = ExecContext::new(model.clone(), None);
        let what = format!("{name}: {}", describe(&inputs));
        tally.run(
            || what.clone(),
            || {
                let ok = check_call(&mut ctx, inputs, &fresh, &what);
                assert!(!ok, "{what}: accepted");
                ok
            },
        );
    }
    tally.check("named wrong calls", Instant::now(), |_| true);
}

/// Stateless calls whose tensors disagree with the model's inputs or with each other
/// (regression: tract found these mid-run and they came back as runtime-error, an engine
/// failure, though they are the caller's).
#[test]
fn stateless_shape_errors_are_invalid_arguments() {
    let model = model();
    let valid = stateless_inputs(&model, 2, 1);
    let mut ctx = ExecContext::new(model.clone(), None);
    let outputs = ctx.compute(valid.clone()).expect("a valid stateless call");
    assert!(outputs.iter().any(|(n, _)| n == LOGITS));
    let edit = |name: &str, f: &dyn Fn(&mut NnTensor)| {
        let mut inputs = valid.clone();
        let (_, t) = inputs.iter_mut().find(|(n, _)| n == name).unwrap();
        f(t);
        inputs
    };
    let cases = [
        (
            "head_dim 17",
            edit("past_key_values.0.key", &|t| {
                t.dimensions[3] = 17;
                t.data.resize(4 * 2 * 17, 0);
            }),
        ),
        (
            "past lengths that differ",
            edit("past_key_values.1.value", &|t| {
                t.dimensions[2] = 2;
                t.data.resize(4 * 2 * 2 * 16, 0);
            }),
        ),
        (
            "f64 past",
            edit("past_key_values.0.value", &|t| {
                t.ty = DType::F64;
                t.dimensions[3] = 8;
            }),
        ),
        (
            "rank 3 past",
            edit("past_key_values.0.key", &|t| {
                t.dimensions.remove(0);
            }),
        ),
        (
            "batch 2 positions",
            edit(POSITION_IDS, &|t| t.dimensions = vec![2, 1]),
        ),
    ];
    for (name, inputs) in cases {
        let e = ctx.compute(inputs).expect_err(name);
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{name}: {e}");
    }
}
