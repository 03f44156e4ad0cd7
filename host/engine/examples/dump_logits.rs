//! Debugging aid: runs a prefill through a model and writes the logits it returns as
//! little-endian f32 to a file, for comparison with another runtime. The prefill is stateless
//! (an empty `past_key_values.*` is passed), so a model exported with logits for every position
//! gives them all (e.g. for a whole-prompt perplexity); the default export gives the last.
//!
//!   cargo run --release -p slm-engine --example dump_logits -- MODEL.onnx OUT.bin ID...
use std::sync::Arc;

use slm_engine::names::LOGITS;
use slm_engine::{Model, Session};

#[path = "../tests/common/mod.rs"]
mod common;

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
    let inputs = common::stateless_inputs(model.info(), &ids);
    let out = Session::new(model).run(inputs)?;
    let logits = common::output(&out, LOGITS).ok_or("no logits output")?;
    std::fs::write(&args[2], &logits.data)?;
    Ok(())
}
