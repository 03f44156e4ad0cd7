//! The same-answer check's probe (tests/python/test_determinism.py): a stateful prefill of the
//! prompt, then greedy decoding, every step's logits written to a file as little-endian f32
//! ((1 + STEPS) rows of the vocabulary). Built natively and for wasm32-wasip2, the files must
//! be equal byte for byte.
//!
//!   greedy_logits MODEL.onnx OUT.bin STEPS THREADS ID...
use std::io::Write;
use std::sync::Arc;

use slm_engine::{Model, Session};

#[path = "../tests/common/mod.rs"]
mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        return Err("usage: greedy_logits MODEL.onnx OUT.bin STEPS THREADS ID...".into());
    }
    let steps: usize = args[3].parse()?;
    slm_engine::set_threads(args[4].parse()?);
    let ids: Vec<i64> = args[5..]
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let model = Arc::new(Model::load(args[1].as_ref())?);
    let mut session = Session::new(model);
    let mut out = std::io::BufWriter::new(std::fs::File::create(&args[2])?);
    let mut logits = common::step(&mut session, &ids, 0);
    for i in 0..=steps {
        for x in &logits {
            out.write_all(&x.to_le_bytes())?;
        }
        if i < steps {
            let next = common::argmax(&logits) as i64;
            logits = common::step(&mut session, &[next], ids.len() + i);
        }
    }
    out.flush()?;
    Ok(())
}
