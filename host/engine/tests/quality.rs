//! The default model through our engine, a whole prompt at once (the prefill kernels): perplexity
//! on held-out text within +3% of the f32 reference in ONNX Runtime (the faithfulness bound).
//! Token by token (the decode kernels), through `slm`: tests/python/test_quality.py.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{default_model_dir, output, root, stateless_inputs};
use slm_engine::names::LOGITS;
use slm_engine::{Model, Session};

const TOKENS: usize = 300;
const FAITHFUL: f64 = 1.03;

#[test]
fn whole_prompt_perplexity_is_faithful() {
    let model_dir = default_model_dir();
    // Not under target/test-models: that is a models directory for other tests.
    let work = root().join("target/quality-check");
    let status = Command::new(root().join(".venv/bin/python"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/quality_reference.py"))
        .arg(&model_dir)
        .arg(root().join("tests/fixtures/heldout.txt"))
        .arg(TOKENS.to_string())
        .arg(&work)
        .status()
        .expect("run .venv/bin/python (scripts/setup makes it)");
    assert!(status.success(), "the ONNX Runtime reference failed");
    let ids: Vec<i64> = parse_numbers(&std::fs::read_to_string(work.join("ids.json")).unwrap())
        .iter()
        .map(|&v| v as i64)
        .collect();
    let reference: f64 = std::fs::read_to_string(work.join("reference.json"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    // A stateless call (empty past_key_values) returns the logits of every position.
    let model = Arc::new(Model::load(&work.join("model.onnx")).unwrap());
    let info = model.info().clone();
    let n = ids.len();
    let out = Session::new(model)
        .run(stateless_inputs(&info, &ids))
        .unwrap();
    let logits = output(&out, LOGITS).unwrap().to_f32().unwrap();
    assert_eq!(logits.len(), n * info.vocab);

    // Row i predicts ids[i + 1].
    let nll: f64 = (0..n - 1)
        .map(|i| {
            let row = &logits[i * info.vocab..(i + 1) * info.vocab];
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let log_sum = row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln()
                + max;
            log_sum - row[ids[i + 1] as usize] as f64
        })
        .sum();
    let ours = (nll / (n - 1) as f64).exp();
    eprintln!(
        "whole-prompt perplexity: ours {ours:.3}, f32 reference {reference:.3} ({:+.2}%)",
        (ours / reference - 1.0) * 100.0
    );
    assert!(
        ours <= FAITHFUL * reference,
        "perplexity {ours} over {FAITHFUL} x {reference}"
    );
    assert!(
        reference < 60.0,
        "a sane model on English prose (measured 36)"
    );
}

/// The numbers in a small JSON text (keeps the engine's dev-dependencies empty).
fn parse_numbers(text: &str) -> Vec<f64> {
    text.split(|c: char| {
        !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e' || c == 'E' || c == '+')
    })
    .filter_map(|s| s.parse().ok())
    .collect()
}
