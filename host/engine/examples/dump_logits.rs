//! Debugging aid: runs a prefill through a model and writes the last-position logits as
//! little-endian f32 to a file, for comparison with another runtime.
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
    let ids: Vec<i64> = args[3..].iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
    let n = ids.len();
    let pos: Vec<i64> = (0..n as i64).collect();
    let mut s = Session::new(model);
    let out = s.run(vec![
        ("input_ids".into(), Tensor::from_i64(vec![1, n], &ids)),
        ("position_ids".into(), Tensor::from_i64(vec![1, n], &pos)),
    ])?;
    std::fs::write(&args[2], &out[0].1.data)?;
    Ok(())
}
