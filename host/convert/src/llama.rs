//! The decoder graph of a llama-architecture model in the default layout (`q4_1`): the port of
//! scripts/slmconv/graph.py, node for node and name for name.
//!
//! Inputs `input_ids`, `position_ids` [batch, seq] and `past_key_values.{i}.key|value`
//! [batch, kv_heads, past, head_dim]; outputs `logits` [batch, 1, vocab] (last position only)
//! and `present.{i}.key|value`. Block matmuls keep the file's blocks ([`linear_blocks`]); the embedding is int8 with a
//! scale per token row, and (tied) the LM head too.

use slm_gguf::{Architecture, GgmlType, Gguf, ModelConfig, TensorInfo};
use tract_onnx::pb;

use crate::builder::{value_info, Attr, Builder, Dim, Elem};
use crate::quant::{affine8_blocks, int8_blocks, int8_rows, q4_blocks, transpose, Matrix};
use crate::ConvertError;

const OPSET: i64 = 17;
/// Finite: a fully masked row never turns into NaN.
const NEG_INF: f32 = -1e9;
const FLOAT: i64 = Elem::F32 as i64;

/// The weights, dequantized exactly, in Hugging Face layout.
struct Weights<'a> {
    file: &'a Gguf,
    config: &'a ModelConfig,
}

impl Weights<'_> {
    fn tensor(&self, name: &str) -> Result<&TensorInfo, ConvertError> {
        self.file
            .tensor(name)
            .ok_or_else(|| ConvertError::Missing(name.into()))
    }

    fn matrix(&self, name: &str) -> Result<Matrix, ConvertError> {
        let tensor = self.tensor(name)?;
        let (cols, rows) = (
            tensor.dims[0] as usize,
            tensor.dims.get(1).copied().unwrap_or(1) as usize,
        );
        Ok(self.in_row_order(
            name,
            Matrix {
                rows,
                cols,
                values: self.file.dequantize(tensor),
            },
        ))
    }

    /// Rows as Hugging Face orders them: llama.cpp permutes Q's and K's of llama models (whose
    /// RoPE it applies to interleaved pairs; other architectures' rotate halves, as ours does).
    fn in_row_order(&self, name: &str, matrix: Matrix) -> Matrix {
        if self.config.architecture != Architecture::Llama {
            return matrix;
        }
        match name.rsplit('.').nth(1) {
            Some("attn_q") => matrix.unpermute_rope(self.config.heads),
            Some("attn_k") => matrix.unpermute_rope(self.config.kv_heads),
            _ => matrix,
        }
    }

    /// A block matrix with each block's parameters as the file stores them (the types of
    /// [`crate::EXACT_MATRIX_TYPES`]), so that its values are held exactly.
    fn block_matrix(&self, name: &str) -> Result<BlockMatrix, ConvertError> {
        let tensor = self.tensor(name)?;
        let data = self.file.data(tensor);
        let w = self.matrix(name)?;
        // Per-block parameters are rows of cols / block values, reordered as the matrix is.
        let per_row = |values, block: usize| {
            let m = Matrix {
                rows: w.rows,
                cols: w.cols / block,
                values,
            };
            self.in_row_order(name, m).values
        };
        let params = if let Some((d, m)) = slm_gguf::q4_affine(tensor.kind, data) {
            BlockParams::Q4 {
                d: per_row(d, 32),
                m: per_row(m, 32),
                f16: tensor.kind != GgmlType::Q4K,
            }
        } else if let Some((block, s)) = slm_gguf::int8_scales(tensor.kind, data) {
            BlockParams::Int8 {
                s: per_row(s, block),
                block,
            }
        } else if let Some((block, s, o)) = slm_gguf::int8_affine(tensor.kind, data) {
            let (s, o) = (per_row(s, block), per_row(o, block));
            // K-quants' blocks of 32 (Q5_K) as two of 16: the engine takes blocks of 16 for
            // K-quants (Q8_K activations), blocks of 32 for Q5_1 (Q8_1).
            let halves = |v: Vec<f32>| v.iter().flat_map(|&x| [x, x]).collect();
            match tensor.kind {
                GgmlType::Q5K => BlockParams::Affine8 {
                    s: halves(s),
                    o: halves(o),
                    block: 16,
                },
                _ => BlockParams::Affine8 { s, o, block },
            }
        } else if matches!(tensor.kind, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            BlockParams::Dense
        } else {
            return Err(crate::inexact_type(name, tensor.kind));
        };
        Ok(BlockMatrix {
            name: name.into(),
            w,
            params,
        })
    }

    fn vector(&self, name: &str) -> Result<Vec<f32>, ConvertError> {
        Ok(self.matrix(name)?.values)
    }
}

/// A matrix of blocks along its rows: its values and each block's parameters.
struct BlockMatrix {
    /// The GGUF tensor's name, for errors.
    name: String,
    w: Matrix,
    params: BlockParams,
}

/// Per block, row-major: `value = d * q + m` (4 bits, blocks of 32; `f16` when `d` and `m` are
/// float16 values, as in Q4_0 and Q4_1), `s * q` (int8, blocks of 32 for Q8_0 and Q5_0, 16 for
/// Q6_K and Q3_K: the engine rounds activations as llama.cpp does for each) or `s * q + o` (q in
/// 0..32, blocks of 32 for Q5_1 and Q5_K, 16 for Q2_K); or no blocks: float weights (F32, F16,
/// BF16), held as f32.
enum BlockParams {
    Q4 {
        d: Vec<f32>,
        m: Vec<f32>,
        f16: bool,
    },
    Int8 {
        s: Vec<f32>,
        block: usize,
    },
    Affine8 {
        s: Vec<f32>,
        o: Vec<f32>,
        block: usize,
    },
    Dense,
}

impl BlockMatrix {
    /// Rows `start..start + rows`: one of the projections a fused matrix stacks (phi3's qkv and
    /// gate/up). Blocks lie within rows, so they stay whole and exact.
    fn rows(&self, start: usize, rows: usize) -> BlockMatrix {
        let cols = self.w.cols;
        let cut = |v: &[f32], block: usize| {
            v[start * cols / block..(start + rows) * cols / block].to_vec()
        };
        BlockMatrix {
            name: self.name.clone(),
            w: Matrix {
                rows,
                cols,
                values: self.w.values[start * cols..(start + rows) * cols].to_vec(),
            },
            params: match &self.params {
                BlockParams::Q4 { d, m, f16 } => BlockParams::Q4 {
                    d: cut(d, 32),
                    m: cut(m, 32),
                    f16: *f16,
                },
                BlockParams::Int8 { s, block } => BlockParams::Int8 {
                    s: cut(s, *block),
                    block: *block,
                },
                BlockParams::Affine8 { s, o, block } => BlockParams::Affine8 {
                    s: cut(s, *block),
                    o: cut(o, *block),
                    block: *block,
                },
                BlockParams::Dense => BlockParams::Dense,
            },
        }
    }
}

/// The domain of our own ops, [`MATMUL_Q4_OFFSET`] and [`GATHER_BLOCKS`].
pub const SLM_DOMAIN: &str = "ai.edge-slm";
/// Rows of int8 blocks: inputs `ids`, the values + 128 `[N, K/block, block]` and the scales
/// `[N * K/block]` of the tied LM head's 8-bit `MatMulNBits` (the same initializers), attributes
/// as its; row = `scale * (q - 128)` per block, f32 `[.., K]`.
pub const GATHER_BLOCKS: &str = "GatherBlocks";

/// The embedding table, as the tied LM head reads it.
enum Table {
    /// int8 rows, dequantized to f32 by the graph (`[V, H]`).
    Rows(String),
    /// int8 blocks of `block` values: the initializers of values and scales.
    Blocks { q: String, s: String, block: usize },
}
/// `MatMulNBits`' 4-bit blocks of 32 with an f32 offset per block instead of a zero point:
/// inputs `x`, the nibbles `[N, K/32, 16]` (low nibble first), `scale` and `offset` `[N * K/32]`;
/// value = `scale * q + offset`. A zero point cannot carry a Q4_K offset exactly
/// (`-zero * scale` rounds), this can.
pub const MATMUL_Q4_OFFSET: &str = "MatMulQ4Offset";
/// Its 8-bit twin: values `q` in 0..=127 (a byte each, `[N, K/block, block]`), blocks of 32
/// (Q5_1: the engine rounds activations as llama.cpp's Q8_1) or 16 (Q5_K, Q2_K: as Q8_K).
pub const MATMUL_Q8_OFFSET: &str = "MatMulQ8Offset";

/// `x [.., in] @ w.T` with `w`'s blocks: `MatMulNBits` (4 bits in blocks of 32 with float zero
/// points, from which the engine recovers float16 offsets exactly, or 8 bits in blocks of 16
/// with the default zero point, 128), [`MATMUL_Q4_OFFSET`] for f32 offsets,
/// [`MATMUL_Q8_OFFSET`] for 5- and 2-bit values with offsets, or a float `MatMul`.
fn linear_blocks(
    b: &mut Builder,
    x: &str,
    bm: &BlockMatrix,
    hint: &str,
) -> Result<String, ConvertError> {
    let w = &bm.w;
    let (op, bits, block, inputs) = match &bm.params {
        BlockParams::Q4 { d, m, f16 } => {
            let (packed, scales) = q4_blocks(w, d, m);
            let q = b.constant(
                &format!("{hint}_q4"),
                Elem::U8,
                &[w.rows, w.cols / 32, 16],
                packed,
            );
            let s = b.f32s(&format!("{hint}_s"), &[scales.len()], &scales);
            if *f16 {
                let zeros: Vec<f32> = scales.iter().zip(m).map(|(d, m)| -m / d).collect();
                let z = b.f32s(&format!("{hint}_zp"), &[zeros.len()], &zeros);
                (("com.microsoft", "MatMulNBits"), 4, 32, vec![q, s, z])
            } else {
                let o = b.f32s(&format!("{hint}_m"), &[m.len()], m);
                ((SLM_DOMAIN, MATMUL_Q4_OFFSET), 4, 32, vec![q, s, o])
            }
        }
        BlockParams::Int8 { s, block } => {
            let (values, scales) = int8_blocks(w, s, *block).ok_or_else(|| {
                ConvertError::Unsupported(format!(
                    "tensor '{}' has a value that is not its block's scale times an integer in -127..=127",
                    bm.name
                ))
            })?;
            let (q, s) = int8_block_inputs(b, hint, w, *block, values, &scales);
            (
                ("com.microsoft", "MatMulNBits"),
                8,
                *block as i64,
                vec![q, s],
            )
        }
        BlockParams::Affine8 { s, o, block } => {
            let (values, s, o) = affine8_blocks(w, s, o, *block).ok_or_else(|| {
                ConvertError::Unsupported(format!(
                    "tensor '{}' has a value that is not its block's scale times an integer in 0..32 plus its offset",
                    bm.name
                ))
            })?;
            let (q, s) = int8_block_inputs(b, hint, w, *block, values, &s);
            let o = b.f32s(&format!("{hint}_m"), &[o.len()], &o);
            (
                (SLM_DOMAIN, MATMUL_Q8_OFFSET),
                8,
                *block as i64,
                vec![q, s, o],
            )
        }
        BlockParams::Dense => {
            let wt = b.f32s(
                &format!("{hint}_w"),
                &[w.cols, w.rows],
                &transpose(&w.values, w.rows, w.cols),
            );
            return Ok(b.op("MatMul", &[x, &wt], Some(hint), vec![]));
        }
    };
    let out = b.name(hint);
    let attrs = vec![
        ("K", Attr::Int(w.cols as i64)),
        ("N", Attr::Int(w.rows as i64)),
        ("bits", Attr::Int(bits)),
        ("block_size", Attr::Int(block)),
    ];
    let mut ins: Vec<&str> = vec![x];
    ins.extend(inputs.iter().map(String::as_str));
    b.node(op.1, op.0, &ins, &[&out], attrs);
    Ok(out)
}

/// The initializers of an 8-bit block product: the values, a byte each (`[N, K/block, block]`),
/// and a scale per block.
fn int8_block_inputs(
    b: &mut Builder,
    hint: &str,
    w: &Matrix,
    block: usize,
    values: Vec<u8>,
    scales: &[f32],
) -> (String, String) {
    let q = b.constant(
        &format!("{hint}_q8"),
        Elem::U8,
        &[w.rows, w.cols / block, block],
        values,
    );
    let s = b.f32s(&format!("{hint}_s"), &[scales.len()], scales);
    (q, s)
}

/// int8 -> float32 as Cast * scale (not DequantizeLinear: see graph.py).
fn dequant(b: &mut Builder, q: &str, scale: &str, hint: &str) -> String {
    let cast = b.op("Cast", &[q], None, vec![("to", Attr::Int(FLOAT))]);
    b.op("Mul", &[&cast, scale], Some(&format!("{hint}_dq")), vec![])
}

/// `x @ w.T` with `w` int8, one scale per output channel.
fn linear_int8(b: &mut Builder, x: &str, w: &Matrix, hint: &str) -> String {
    let (q, scales) = int8_rows(w);
    let q = b.constant(
        &format!("{hint}_q"),
        Elem::I8,
        &[w.cols, w.rows],
        transpose(&q, w.rows, w.cols)
            .iter()
            .map(|&v| v as u8)
            .collect(),
    );
    let s = b.f32s(&format!("{hint}_s"), &[1, scales.len()], &scales);
    let wq = dequant(b, &q, &s, hint);
    b.op("MatMul", &[x, &wq], Some(hint), vec![])
}

fn rms_norm(b: &mut Builder, x: &str, w: &[f32], eps: f32, hint: &str) -> String {
    let sq = b.op("Mul", &[x, x], None, vec![]);
    let mean = b.op(
        "ReduceMean",
        &[&sq],
        None,
        vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))],
    );
    let eps = b.f32("c", eps);
    let add = b.op("Add", &[&mean, &eps], None, vec![]);
    let sqrt = b.op("Sqrt", &[&add], None, vec![]);
    let inv = b.op("Reciprocal", &[&sqrt], None, vec![]);
    let scaled = b.op("Mul", &[x, &inv], None, vec![]);
    let weight = b.f32s(hint, &[w.len()], w);
    b.op("Mul", &[&scaled, &weight], Some(hint), vec![])
}

/// GELU, tanh approximation (Gemma's MLP), as llama.cpp's CPU backend computes it: the input
/// rounded to float16, `0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))` in f32 in its order,
/// the result rounded to float16 (ggml looks GELU up in a float16 table), and `x` itself from 10
/// up. Spelled out: ONNX's `Gelu` op is opset 20, past ours.
fn gelu_tanh(b: &mut Builder, x: &str) -> String {
    let to_f16 = |b: &mut Builder, t: &str| {
        let h = b.op(
            "Cast",
            &[t],
            None,
            vec![("to", Attr::Int(Elem::F16 as i64))],
        );
        b.op("Cast", &[&h], None, vec![("to", Attr::Int(FLOAT))])
    };
    let xh = to_f16(b, x);
    let c = b.f32("c", (2.0 / std::f64::consts::PI).sqrt() as f32);
    let cx = b.op("Mul", &[&c, &xh], None, vec![]);
    let a = b.f32("c", 0.044715);
    let ax = b.op("Mul", &[&a, &xh], None, vec![]);
    let axx = b.op("Mul", &[&ax, &xh], None, vec![]);
    let one = b.f32("c", 1.0);
    let poly = b.op("Add", &[&one, &axx], None, vec![]);
    let arg = b.op("Mul", &[&cx, &poly], None, vec![]);
    let t = b.op("Tanh", &[&arg], None, vec![]);
    let one = b.f32("c", 1.0);
    let t1 = b.op("Add", &[&one, &t], None, vec![]);
    let half = b.f32("c", 0.5);
    let hx = b.op("Mul", &[&half, &xh], None, vec![]);
    let y = b.op("Mul", &[&hx, &t1], None, vec![]);
    let y = to_f16(b, &y);
    let ten = b.f32("c", 10.0);
    let large = b.op("GreaterOrEqual", &[x, &ten], None, vec![]);
    b.op("Where", &[&large, x, &y], None, vec![])
}

fn rotate_half(b: &mut Builder, x: &str, half: usize) -> String {
    let (zero, h, minus_one) = (b.list(&[0]), b.list(&[half as i64]), b.list(&[-1]));
    let x1 = b.op("Slice", &[x, &zero, &h, &minus_one], None, vec![]);
    let (h, big, minus_one) = (b.list(&[half as i64]), b.list(&[i64::MAX]), b.list(&[-1]));
    let x2 = b.op("Slice", &[x, &h, &big, &minus_one], None, vec![]);
    let neg = b.op("Neg", &[&x2], None, vec![]);
    b.op("Concat", &[&neg, &x1], None, vec![("axis", Attr::Int(-1))])
}

pub fn build(
    file: &Gguf,
    config: &ModelConfig,
    layout: crate::TableLayout,
    progress: crate::Progress,
) -> Result<pb::ModelProto, ConvertError> {
    let steps = crate::progress_steps(config);
    let weights = Weights { file, config };
    let (nh, nkv, hd) = (config.heads, config.kv_heads, config.head_dim);
    let rep = nh / nkv;
    let eps = config.rms_eps;
    let gemma = config.architecture == Architecture::Gemma3;
    let mut b = Builder::default();

    let mut inputs = vec![
        value_info(
            "input_ids",
            Elem::I64,
            &[Dim::Named("batch"), Dim::Named("seq")],
        ),
        value_info(
            "position_ids",
            Elem::I64,
            &[Dim::Named("batch"), Dim::Named("seq")],
        ),
    ];
    let mut outputs = vec![value_info(
        "logits",
        Elem::F32,
        &[Dim::Named("batch"), Dim::Fixed(1), Dim::Fixed(config.vocab)],
    )];
    for i in 0..config.layers {
        for kv in ["key", "value"] {
            let past = [
                Dim::Named("batch"),
                Dim::Fixed(nkv),
                Dim::Named("past"),
                Dim::Fixed(hd),
            ];
            inputs.push(value_info(
                &format!("past_key_values.{i}.{kv}"),
                Elem::F32,
                &past,
            ));
            let total = [
                Dim::Named("batch"),
                Dim::Fixed(nkv),
                Dim::Named("total"),
                Dim::Fixed(hd),
            ];
            outputs.push(value_info(&format!("present.{i}.{kv}"), Elem::F32, &total));
        }
    }

    // Embedding: a tied table in int8 blocks (Q8_0; Q5_0, Q6_K) is held exactly, once: the LM
    // head's 8-bit MatMulNBits and a GatherBlocks lookup read the same initializers. Other
    // tables become int8 rows with a scale each, the tied LM head their dequantized transpose.
    let embed = weights.matrix("token_embd.weight")?;
    let embed_tensor = weights.tensor("token_embd.weight")?;
    let exact_table = match config.tied_embeddings && layout == crate::TableLayout::Exact {
        true => slm_gguf::int8_scales(embed_tensor.kind, file.data(embed_tensor))
            .and_then(|(block, s)| int8_blocks(&embed, &s, block).map(|(q, s)| (block, q, s))),
        false => None,
    };
    let (mut x, table) = match &exact_table {
        Some((block, values, scales)) => {
            let q = b.constant(
                "embed_q8",
                Elem::U8,
                &[embed.rows, embed.cols / block, *block],
                values.clone(),
            );
            let s = b.f32s("embed_s", &[scales.len()], scales);
            let x = b.name("embeds");
            b.node(
                GATHER_BLOCKS,
                SLM_DOMAIN,
                &["input_ids", &q, &s],
                &[&x],
                vec![
                    ("K", Attr::Int(embed.cols as i64)),
                    ("N", Attr::Int(embed.rows as i64)),
                    ("bits", Attr::Int(8)),
                    ("block_size", Attr::Int(*block as i64)),
                ],
            );
            (
                x,
                Table::Blocks {
                    q,
                    s,
                    block: *block,
                },
            )
        }
        None => {
            let (q, scales) = int8_rows(&embed);
            let table_q = b.constant(
                "embed_q",
                Elem::I8,
                &[embed.rows, embed.cols],
                q.iter().map(|&v| v as u8).collect(),
            );
            let table_s = b.f32s("embed_s", &[scales.len()], &scales);
            let gathered = b.op(
                "Gather",
                &[&table_q, "input_ids"],
                None,
                vec![("axis", Attr::Int(0))],
            );
            let rows = b.op("Cast", &[&gathered], None, vec![("to", Attr::Int(FLOAT))]);
            let row_scales = b.op(
                "Gather",
                &[&table_s, "input_ids"],
                None,
                vec![("axis", Attr::Int(0))],
            );
            let last_axis = b.list(&[-1]);
            let row_scale = b.op("Unsqueeze", &[&row_scales, &last_axis], None, vec![]);
            let x = b.op("Mul", &[&rows, &row_scale], Some("embeds"), vec![]);
            let last_axis = b.list(&[-1]);
            let column = b.op("Unsqueeze", &[&table_s, &last_axis], None, vec![]);
            let table = dequant(&mut b, &table_q, &column, "embed");
            (x, Table::Rows(table))
        }
    };
    if gemma {
        // Gemma scales its embeddings by sqrt(hidden) (in f32, as llama.cpp).
        let gain = b.f32("embed_gain", (config.hidden as f32).sqrt());
        x = b.op("Mul", &[&x, &gain], Some("embeds_scaled"), vec![]);
    }

    // Causal mask over [past + seq], tiled for the grouped query heads.
    let shape = b.op("Shape", &["input_ids"], None, vec![]);
    let one = b.i64(1);
    let seq = b.op(
        "Gather",
        &[&shape, &one],
        None,
        vec![("axis", Attr::Int(0))],
    );
    let shape = b.op("Shape", &["past_key_values.0.key"], None, vec![]);
    let two = b.i64(2);
    let past = b.op(
        "Gather",
        &[&shape, &two],
        None,
        vec![("axis", Attr::Int(0))],
    );
    let total = b.op("Add", &[&past, &seq], None, vec![]);
    let step = b.i64(1);
    let range = b.op("Range", &[&past, &total, &step], None, vec![]);
    let axis = b.list(&[1]);
    let q_pos = b.op("Unsqueeze", &[&range, &axis], None, vec![]);
    let (zero, step) = (b.i64(0), b.i64(1));
    let range = b.op("Range", &[&zero, &total, &step], None, vec![]);
    let axis = b.list(&[0]);
    let k_pos = b.op("Unsqueeze", &[&range, &axis], None, vec![]);
    let visible = b.op("LessOrEqual", &[&k_pos, &q_pos], None, vec![]);
    let (open, closed) = (b.f32("c", 0.0), b.f32("c", NEG_INF));
    let mask = b.op(
        "Where",
        &[&visible, &open, &closed],
        Some("causal_mask"),
        vec![],
    );
    let repeats = b.list(&[rep as i64, 1]);
    let grouped_mask = b.op("Tile", &[&mask, &repeats], Some("grouped_mask"), vec![]);
    // Sliding-window layers (Gemma 3) see the last `window` positions: key > query - window.
    let window_mask = config.sliding.as_ref().map(|sliding| {
        let window = b.i64(sliding.window as i64);
        let oldest = b.op("Sub", &[&q_pos, &window], None, vec![]);
        let recent = b.op("Greater", &[&k_pos, &oldest], None, vec![]);
        let seen = b.op("And", &[&visible, &recent], None, vec![]);
        let (open, closed) = (b.f32("c", 0.0), b.f32("c", NEG_INF));
        let mask = b.op(
            "Where",
            &[&seen, &open, &closed],
            Some("window_mask"),
            vec![],
        );
        let repeats = b.list(&[rep as i64, 1]);
        b.op(
            "Tile",
            &[&mask, &repeats],
            Some("grouped_window_mask"),
            vec![],
        )
    });

    // Rotary embedding (rotate-half), shared by every layer: cos/sin [batch, 1, seq, head_dim];
    // sliding-window layers have their own base.
    let positions = b.op(
        "Cast",
        &["position_ids"],
        None,
        vec![("to", Attr::Int(FLOAT))],
    );
    let last_axis = b.list(&[-1]);
    let pos = b.op("Unsqueeze", &[&positions, &last_axis], None, vec![]);
    let rope_tables = |b: &mut Builder, base: f32, suffix: &str| {
        let theta = base as f64;
        let inv_freq: Vec<f32> = (0..hd / 2)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / hd as f64)) as f32)
            .collect();
        let inv_freq = b.f32s(&format!("inv_freq{suffix}"), &[inv_freq.len()], &inv_freq);
        let freqs = b.op("Mul", &[&pos, &inv_freq], None, vec![]);
        let emb = b.op(
            "Concat",
            &[&freqs, &freqs],
            None,
            vec![("axis", Attr::Int(-1))],
        );
        let cos = b.op("Cos", &[&emb], None, vec![]);
        let axis = b.list(&[1]);
        let cos = b.op(
            "Unsqueeze",
            &[&cos, &axis],
            Some(&format!("rope_cos{suffix}")),
            vec![],
        );
        let sin = b.op("Sin", &[&emb], None, vec![]);
        let axis = b.list(&[1]);
        let sin = b.op(
            "Unsqueeze",
            &[&sin, &axis],
            Some(&format!("rope_sin{suffix}")),
            vec![],
        );
        (cos, sin)
    };
    let global_rope = rope_tables(&mut b, config.rope_base, "");
    let window_rope = config
        .sliding
        .as_ref()
        .map(|sliding| rope_tables(&mut b, sliding.rope_base, "_local"));

    let scale = b.f32("attn_scale", (1.0 / (hd as f64).sqrt()) as f32);
    // Qwen2's q, k and v projections have biases.
    let bias = |b: &mut Builder, x: &str, name: &str| -> Result<String, ConvertError> {
        if config.architecture != Architecture::Qwen2 {
            return Ok(x.to_string());
        }
        let values = weights.vector(name)?;
        let hint = name.trim_end_matches(".bias").replace('.', "_");
        let bias = b.f32s(&format!("{hint}_bias"), &[values.len()], &values);
        Ok(b.op("Add", &[x, &bias], None, vec![]))
    };
    progress(1, steps);
    for i in 0..config.layers {
        if i > 0 {
            progress(1 + i, steps);
        }
        let blk = |n: &str| format!("blk.{i}.{n}.weight");
        let h = rms_norm(
            &mut b,
            &x,
            &weights.vector(&blk("attn_norm"))?,
            eps,
            &format!("l{i}_attn_norm"),
        );

        let heads = |b: &mut Builder, t: &str, n: usize| {
            let shape = b.list(&[0, 0, n as i64, hd as i64]);
            let r = b.op("Reshape", &[t, &shape], None, vec![]);
            b.op(
                "Transpose",
                &[&r],
                None,
                vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
            )
        };
        // Gemma 3 normalizes each head's q and k (RMSNorm over the head's width), and each
        // block's output before the residual add.
        let head_norm = |b: &mut Builder, t: &str, norm: &str| -> Result<String, ConvertError> {
            if !gemma {
                return Ok(t.to_string());
            }
            let w = weights.vector(&blk(norm))?;
            Ok(rms_norm(b, t, &w, eps, &format!("l{i}_{norm}")))
        };
        let post_norm = |b: &mut Builder, t: String, norm: &str| -> Result<String, ConvertError> {
            if !gemma {
                return Ok(t);
            }
            let w = weights.vector(&blk(norm))?;
            Ok(rms_norm(b, &t, &w, eps, &format!("l{i}_{norm}")))
        };
        // Gemma 3's sliding-window layers: their own mask and RoPE base.
        let (mask, (cos, sin)) = match (&window_mask, &window_rope) {
            (Some(mask), Some(rope)) if !config.is_global(i) => (mask, rope),
            _ => (&grouped_mask, &global_rope),
        };
        let rope = |b: &mut Builder, t: &str| {
            let a = b.op("Mul", &[t, cos], None, vec![]);
            let rotated = rotate_half(b, t, hd / 2);
            let c = b.op("Mul", &[&rotated, sin], None, vec![]);
            b.op("Add", &[&a, &c], None, vec![])
        };

        // Phi-3 stacks q, k and v in one matrix.
        let (q_w, k_w, v_w) = match file.tensor(&blk("attn_qkv")) {
            Some(_) => {
                let qkv = weights.block_matrix(&blk("attn_qkv"))?;
                let (q, kv) = (nh * hd, nkv * hd);
                (qkv.rows(0, q), qkv.rows(q, kv), qkv.rows(q + kv, kv))
            }
            None => (
                weights.block_matrix(&blk("attn_q"))?,
                weights.block_matrix(&blk("attn_k"))?,
                weights.block_matrix(&blk("attn_v"))?,
            ),
        };
        let q = linear_blocks(&mut b, &h, &q_w, &format!("l{i}_q"))?;
        let q = bias(&mut b, &q, &format!("blk.{i}.attn_q.bias"))?;
        let q = heads(&mut b, &q, nh);
        let q = head_norm(&mut b, &q, "attn_q_norm")?;
        let q = rope(&mut b, &q);
        let k = linear_blocks(&mut b, &h, &k_w, &format!("l{i}_k"))?;
        let k = bias(&mut b, &k, &format!("blk.{i}.attn_k.bias"))?;
        let k = heads(&mut b, &k, nkv);
        let k = head_norm(&mut b, &k, "attn_k_norm")?;
        let k = rope(&mut b, &k);
        let v = linear_blocks(&mut b, &h, &v_w, &format!("l{i}_v"))?;
        let v = bias(&mut b, &v, &format!("blk.{i}.attn_v.bias"))?;
        let v = heads(&mut b, &v, nkv);
        let (k_all, v_all) = (format!("present.{i}.key"), format!("present.{i}.value"));
        b.node(
            "Concat",
            "",
            &[&format!("past_key_values.{i}.key"), &k],
            &[&k_all],
            vec![("axis", Attr::Int(2))],
        );
        b.node(
            "Concat",
            "",
            &[&format!("past_key_values.{i}.value"), &v],
            &[&v_all],
            vec![("axis", Attr::Int(2))],
        );

        // Grouped-query attention without repeating K/V: a KV head's query heads stacked along
        // the sequence axis, [b, kv, rep*seq, hd] @ [b, kv, hd, total].
        let shape = b.list(&[0, nkv as i64, -1, hd as i64]);
        let qg = b.op("Reshape", &[&q, &shape], None, vec![]);
        let kt = b.op(
            "Transpose",
            &[&k_all],
            None,
            vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))],
        );
        let scores = b.op("MatMul", &[&qg, &kt], None, vec![]);
        let scaled = b.op("Mul", &[&scores, &scale], None, vec![]);
        let masked = b.op("Add", &[&scaled, mask], None, vec![]);
        let probs = b.op("Softmax", &[&masked], None, vec![("axis", Attr::Int(-1))]);
        let ctx = b.op("MatMul", &[&probs, &v_all], None, vec![]);
        let shape = b.list(&[0, nh as i64, -1, hd as i64]);
        let ctx = b.op("Reshape", &[&ctx, &shape], None, vec![]);
        let ctx = b.op(
            "Transpose",
            &[&ctx],
            None,
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        );
        let shape = b.list(&[0, 0, (nh * hd) as i64]);
        let ctx = b.op("Reshape", &[&ctx, &shape], None, vec![]);
        let o = linear_blocks(
            &mut b,
            &ctx,
            &weights.block_matrix(&blk("attn_output"))?,
            &format!("l{i}_o"),
        )?;
        let o = post_norm(&mut b, o, "post_attention_norm")?;
        x = b.op("Add", &[&x, &o], Some(&format!("l{i}_attn_out")), vec![]);

        let h = rms_norm(
            &mut b,
            &x,
            &weights.vector(&blk("ffn_norm"))?,
            eps,
            &format!("l{i}_ffn_norm"),
        );
        // Phi-3 stacks gate and up in `ffn_up`, gate first.
        let (gate_w, up_w) = match file.tensor(&blk("ffn_gate")) {
            Some(_) => (
                weights.block_matrix(&blk("ffn_gate"))?,
                weights.block_matrix(&blk("ffn_up"))?,
            ),
            None => {
                let fused = weights.block_matrix(&blk("ffn_up"))?;
                (
                    fused.rows(0, config.ffn),
                    fused.rows(config.ffn, config.ffn),
                )
            }
        };
        let gate = linear_blocks(&mut b, &h, &gate_w, &format!("l{i}_gate"))?;
        let up = linear_blocks(&mut b, &h, &up_w, &format!("l{i}_up"))?;
        let act = if gemma {
            gelu_tanh(&mut b, &gate)
        } else {
            let sigmoid = b.op("Sigmoid", &[&gate], None, vec![]);
            b.op("Mul", &[&gate, &sigmoid], None, vec![])
        };
        let act = b.op("Mul", &[&act, &up], None, vec![]);
        let down = linear_blocks(
            &mut b,
            &act,
            &weights.block_matrix(&blk("ffn_down"))?,
            &format!("l{i}_down"),
        )?;
        let down = post_norm(&mut b, down, "post_ffw_norm")?;
        x = b.op("Add", &[&x, &down], Some(&format!("l{i}_out")), vec![]);
    }

    // Only the last position reaches the norm and the vocabulary-wide head.
    let (start, end, axis) = (b.list(&[-1]), b.list(&[i64::MAX]), b.list(&[1]));
    let last = b.op(
        "Slice",
        &[&x, &start, &end, &axis],
        Some("last_hidden"),
        vec![],
    );
    let last = rms_norm(
        &mut b,
        &last,
        &weights.vector("output_norm.weight")?,
        eps,
        "final_norm",
    );
    if config.tied_embeddings {
        match &table {
            Table::Rows(table) => {
                let head = b.op(
                    "Transpose",
                    &[table],
                    Some("lm_head_t"),
                    vec![("perm", Attr::Ints(vec![1, 0]))],
                );
                b.node("MatMul", "", &[&last, &head], &["logits"], vec![]);
            }
            Table::Blocks { q, s, block } => b.node(
                "MatMulNBits",
                "com.microsoft",
                &[&last, q, s],
                &["logits"],
                vec![
                    ("K", Attr::Int(config.hidden as i64)),
                    ("N", Attr::Int(config.vocab as i64)),
                    ("bits", Attr::Int(8)),
                    ("block_size", Attr::Int(*block as i64)),
                ],
            ),
        }
    } else {
        // An untied head keeps the file's blocks, as the layers' matrices (slmconv's layout
        // rounds it to int8 rows).
        let head = match layout {
            crate::TableLayout::Exact => linear_blocks(
                &mut b,
                &last,
                &weights.block_matrix("output.weight")?,
                "lm_head",
            )?,
            crate::TableLayout::Int8Rows => {
                linear_int8(&mut b, &last, &weights.matrix("output.weight")?, "lm_head")
            }
        };
        b.node("Identity", "", &[&head], &["logits"], vec![]);
    }

    let graph = pb::GraphProto {
        node: b.nodes,
        name: "llama_decoder".into(),
        initializer: b.initializers,
        input: inputs,
        output: outputs,
        ..Default::default()
    };
    let mut opset_import = vec![
        pb::OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        },
        pb::OperatorSetIdProto {
            domain: "com.microsoft".into(),
            version: 1,
        },
    ];
    // Only where used: a Q4_0 or Q4_1 model's graph stays the one slmconv writes, byte for byte.
    if graph.node.iter().any(|n| n.domain == SLM_DOMAIN) {
        opset_import.push(pb::OperatorSetIdProto {
            domain: SLM_DOMAIN.into(),
            version: 1,
        });
    }
    Ok(pb::ModelProto {
        ir_version: 8,
        opset_import,
        producer_name: "edge-slm slmconv".into(),
        graph: Some(graph),
        ..Default::default()
    })
}
