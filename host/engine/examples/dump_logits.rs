//! Debugging aid: runs a prefill through a model and writes the logits it returns as
//! little-endian f32 to a file, for comparison with another runtime. The prefill is stateless
//! (an empty `past_key_values.*` is passed), so a model exported with logits for every position
//! gives them all (e.g. for a whole-prompt perplexity); the default export gives the last.
//!
//!   cargo run --release -p slm-engine --example dump_logits -- MODEL.onnx OUT.bin ID...
use std::sync::Arc;

use slm_engine::{Model, Session, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err("usage: dump_logits MODEL.onnx OUT.bin ID...".into());
    }
    let model = Arc::new(Model::load(args[1].as_ref())?);
    let ids: Vec<i64> = args[3..]
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let n = ids.len();
    let pos: Vec<i64> = (0..n as i64).collect();
    let info = model.info().clone();
    let mut inputs = vec![
        ("input_ids".to_string(), Tensor::from_i64(vec![1, n], &ids)),
        (
            "position_ids".to_string(),
            Tensor::from_i64(vec![1, n], &pos),
        ),
    ];
    for layer in 0..info.layers {
        for kind in ["key", "value"] {
            inputs.push((
                format!("past_key_values.{layer}.{kind}"),
                Tensor::from_f32(vec![1, info.kv_heads, 0, info.head_dim], &[]),
            ));
        }
    }
    let out = Session::new(model).run(inputs)?;
    let logits = out
        .into_iter()
        .find(|(name, _)| name == "logits")
        .ok_or("no logits output")?
        .1;
    std::fs::write(&args[2], &logits.data)?;
    Ok(())
}
