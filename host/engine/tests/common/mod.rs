//! What the engine's integration tests share (and its examples, through `#[path]`): where the
//! models are, a step of a session, the inputs of a stateless prefill, comparisons of logits.

#![allow(dead_code)] // each test crate uses a part

use std::path::{Path, PathBuf};

use slm_engine::names::{past_key_values, INPUT_IDS, LOGITS, POSITION_IDS};
use slm_engine::{ModelInfo, Session, Tensor};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tiny test model's directory (scripts/test builds it).
pub fn tiny_dir() -> PathBuf {
    model_dir("target/test-models/tiny", "scripts/test builds it")
}

/// The default model's directory (scripts/setup converts it).
pub fn default_model_dir() -> PathBuf {
    model_dir(
        "models/smollm2-135m-instruct",
        "run scripts/setup first: it converts the default model",
    )
}

/// `path` under the root, which must hold a model.onnx (else a failure saying `how` to make it).
fn model_dir(path: &str, how: &str) -> PathBuf {
    let dir = root().join(path);
    assert!(
        dir.join("model.onnx").is_file(),
        "{} has no model.onnx: {how}",
        dir.display()
    );
    dir
}

/// A stateful step: `ids` at positions `start..`; the last position's logits.
pub fn step(s: &mut Session, ids: &[i64], start: usize) -> Vec<f32> {
    let n = ids.len();
    let pos: Vec<i64> = (start as i64..(start + n) as i64).collect();
    let out = s
        .run(vec![
            (INPUT_IDS.into(), Tensor::from_i64(vec![1, n], ids)),
            (POSITION_IDS.into(), Tensor::from_i64(vec![1, n], &pos)),
        ])
        .expect("engine step");
    assert_eq!(out.len(), 1, "stateful calls return only logits");
    assert_eq!(out[0].0, LOGITS);
    assert_eq!(out[0].1.dims[..2], [1, 1]);
    out[0].1.to_f32().expect("f32 logits")
}

/// The inputs of a stateless prefill of `ids` from position 0: an empty `past_key_values.*`, so
/// that a model exported with logits for every position returns them all.
pub fn stateless_inputs(info: &ModelInfo, ids: &[i64]) -> Vec<(String, Tensor)> {
    let n = ids.len();
    let pos: Vec<i64> = (0..n as i64).collect();
    let mut inputs = vec![
        (INPUT_IDS.to_string(), Tensor::from_i64(vec![1, n], ids)),
        (POSITION_IDS.to_string(), Tensor::from_i64(vec![1, n], &pos)),
    ];
    for layer in 0..info.layers {
        for kind in ["key", "value"] {
            inputs.push((
                past_key_values(layer, kind),
                Tensor::from_f32(vec![1, info.kv_heads, 0, info.head_dim], &[]),
            ));
        }
    }
    inputs
}

/// The output `name` of a stateless call.
pub fn output<'a>(out: &'a [(String, Tensor)], name: &str) -> Option<&'a Tensor> {
    out.iter().find(|(n, _)| n == name).map(|(_, t)| t)
}

/// The index of the largest value (the first of equals).
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(0, |b, (i, x)| if *x > v[b] { i } else { b })
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
