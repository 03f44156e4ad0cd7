//! The wasi:nn side: graphs by model name (cached per instance) and a [`Session`] per
//! completion over one execution context.
//!
//! Each step sends `input_ids` and `position_ids` ([1, S] i64, little-endian) and reads
//! `logits` (f32; the last position's row). The tensor names are the wasi:nn contract's
//! (ARCHITECTURE.md; the engine's `slm_engine::names`, which this wasm guest does not link).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::bindings::wasi::nn::errors::{Error as NnError, ErrorCode};
use crate::bindings::wasi::nn::graph::{self, Graph};
use crate::bindings::wasi::nn::inference::GraphExecutionContext;
use crate::bindings::wasi::nn::tensor::{Tensor, TensorType};
use crate::error::{Error, Result};
use crate::generate::Session;

/// Token ids of the new positions.
const INPUT_IDS: &str = "input_ids";
/// Their positions; a start below the context's cached length rewinds its KV cache.
const POSITION_IDS: &str = "position_ids";
/// The last position's logits.
const LOGITS: &str = "logits";
/// The native host's extension: how many of a prefill's tokens its prefix cache supplied.
const CACHED_TOKENS: &str = "cached_tokens";

thread_local! {
    static GRAPHS: RefCell<HashMap<String, Rc<Graph>>> = RefCell::new(HashMap::new());
}

fn nn_error(what: &str, e: NnError) -> Error {
    let code = e.code();
    let data = e.data();
    let msg = format!(
        "{what}: {code:?}{}{data}",
        if data.is_empty() { "" } else { ": " }
    );
    match code {
        ErrorCode::NotFound => Error::model(msg),
        _ => Error::backend(msg),
    }
}

fn graph(name: &str) -> Result<Rc<Graph>> {
    if let Some(g) = GRAPHS.with(|g| g.borrow().get(name).cloned()) {
        return Ok(g);
    }
    let g = Rc::new(
        graph::load_by_name(name).map_err(|e| nn_error(&format!("loading graph {name:?}"), e))?,
    );
    GRAPHS.with(|m| m.borrow_mut().insert(name.to_string(), g.clone()));
    Ok(g)
}

pub struct NnSession {
    ctx: GraphExecutionContext,
    /// `cached_tokens` of the last step, when the host reports it.
    cached: u32,
    /// Keeps the graph alive as long as the context.
    _graph: Rc<Graph>,
}

impl NnSession {
    pub fn new(model: &str) -> Result<Self> {
        let g = graph(model)?;
        let ctx = g
            .init_execution_context()
            .map_err(|e| nn_error("creating an execution context", e))?;
        Ok(NnSession {
            ctx,
            cached: 0,
            _graph: g,
        })
    }
}

fn i64_tensor(values: impl Iterator<Item = i64>, len: usize) -> Tensor {
    let mut data = Vec::with_capacity(len * 8);
    for v in values {
        data.extend_from_slice(&v.to_le_bytes());
    }
    Tensor::new(&[1, len as u32], TensorType::I64, &data)
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // subnormal
            let v = f as f32 / 1024.0 * 2f32.powi(-14);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 112) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

/// The last row of a logits tensor ([..., vocab]) as f32 (only that row is converted).
fn last_row(t: &Tensor) -> Result<Vec<f32>> {
    let dims = t.dimensions();
    let vocab = *dims
        .last()
        .ok_or_else(|| Error::backend("logits tensor has no dimensions"))? as usize;
    let data = t.data();
    let width = match t.ty() {
        TensorType::Fp32 => 4,
        TensorType::Fp16 | TensorType::Bf16 => 2,
        TensorType::Fp64 => 8,
        other => {
            return Err(Error::backend(format!(
                "logits have type {other:?}; expected a float type"
            )))
        }
    };
    let values = data.len() / width;
    if vocab == 0 || data.len() % width != 0 || values < vocab || values % vocab != 0 {
        return Err(Error::backend(format!(
            "logits of shape {dims:?} hold {} bytes of {width}-byte values",
            data.len()
        )));
    }
    let row = &data[(values - vocab) * width..];
    Ok(match t.ty() {
        TensorType::Fp32 => {
            // An indexed loop, which compiles to a vector copy (a collected iterator of chunks
            // went value by value: 2% of a Gemma 3 decode step).
            let mut out = vec![0f32; vocab];
            for (o, b) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            out
        }
        TensorType::Fp16 => row
            .chunks_exact(2)
            .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        TensorType::Bf16 => row
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        _ => row
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
    })
}

impl Session for NnSession {
    fn cached_tokens(&self) -> u32 {
        self.cached
    }

    fn step(&mut self, ids: &[u32], start_pos: u32) -> Result<Vec<f32>> {
        let n = ids.len();
        let input_ids = i64_tensor(ids.iter().map(|&i| i as i64), n);
        let positions = i64_tensor((0..n).map(|i| start_pos as i64 + i as i64), n);
        let outputs = self
            .ctx
            .compute(vec![
                (INPUT_IDS.to_string(), input_ids),
                (POSITION_IDS.to_string(), positions),
            ])
            .map_err(|e| nn_error("compute", e))?;
        // Hosts with a prefix cache (slm) say how many of these tokens they did not recompute.
        self.cached = outputs
            .iter()
            .find(|(name, _)| name == CACHED_TOKENS)
            .and_then(|(_, t)| {
                t.data()
                    .get(..8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            })
            .map(|v| v.clamp(0, n as i64) as u32)
            .unwrap_or(0);
        let logits = outputs
            .iter()
            .find(|(name, _)| name == LOGITS)
            .or_else(|| outputs.first())
            .ok_or_else(|| Error::backend("compute returned no outputs"))?;
        last_row(&logits.1)
    }
}
