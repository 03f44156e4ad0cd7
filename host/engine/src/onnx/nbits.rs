//! Block-quantized weights: a `com.microsoft` `MatMulNBits` node (a scale and a zero point per
//! block along K) becomes an `SlmQMatMul(x)` node on packed weights that the kernels read as
//! they are: 4 bits in blocks of 32 ([`Q4Weights`], float16 or f32 scales: Q4_0, Q4_1, Q4_K) or
//! 8 bits in blocks of 16 or 32 with zero point 128 ([`Q8Blocks`]: Q8_0, Q5_0, Q6_K, Q3_K) or
//! with an offset per block (Q5_1, Q5_K, Q2_K). Packed
//! while the protobuf is decoded ([`NBitsStream`]), or after ([`rewrite`]) for what the stream
//! could not take.

use std::collections::HashMap;
use std::sync::Arc;

use half::f16;
use tract_onnx::pb;

use super::graph::{
    attr, external, init_f32, init_positions, outputs, prune, readers, set_weights_op, UINT8,
};
use super::proto::Initializers;
use crate::kernels::offsets::BlockOffsets;
use crate::kernels::q4_1::{Q4Weights, QBLOCK};
use crate::kernels::q5_blocks::Q5Blocks;
use crate::kernels::q8_blocks::{Q8Blocks, HALF};
use crate::kernels::quantize::Activations;
use crate::ops::{self, Packed};

/// Our own 4-bit block product (slm-convert writes it for Q4_K): `MatMulNBits`' inputs and
/// attributes with an f32 offset per block in place of the zero points, value = `scale * q +
/// offset`, because `-zero * scale` cannot give every Q4_K offset exactly.
pub const SLM_DOMAIN: &str = "ai.edge-slm";
pub const MATMUL_Q4_OFFSET: &str = "MatMulQ4Offset";
/// Its 8-bit twin (slm-convert writes it for Q5_1, Q5_K and Q2_K): blocks of 16 or 32 values
/// `q` (one byte each, 0..=127), value = `scale * q + offset`. Activations round as llama.cpp
/// rounds them for Q5_1 (Q8_1) in blocks of 32, for the K-quants (Q8_K) in blocks of 16.
pub const MATMUL_Q8_OFFSET: &str = "MatMulQ8Offset";

/// The bits of our offset op `node` is, if it is one.
fn offset_op_bits(node: &pb::NodeProto) -> Option<i64> {
    match (node.domain.as_str(), node.op_type.as_str()) {
        (SLM_DOMAIN, MATMUL_Q4_OFFSET) => Some(4),
        (SLM_DOMAIN, MATMUL_Q8_OFFSET) => Some(8),
        _ => None,
    }
}
/// Our own row lookup in int8 blocks (slm-convert writes it for a tied Q8_0 embedding):
/// `GatherBlocks(ids, B, scales)`, reading the initializers of the 8-bit `MatMulNBits` that is
/// the LM head; a row is `scale * (q - 128)` per block, in f32. It becomes an `SlmQGather` on
/// the head's packed weight, so the table is held once.
pub const GATHER_BLOCKS: &str = "GatherBlocks";

pub(crate) fn is_gather_blocks(node: &pb::NodeProto) -> bool {
    node.domain == SLM_DOMAIN && node.op_type == GATHER_BLOCKS && node.input.len() == 3
}

/// Rewrites each [`GATHER_BLOCKS`] whose table is the `B` of a packed product (`keys`: `B`'s name
/// to the product's weight key) into an `SlmQGather` on that weight.
fn rewrite_gathers(graph: &mut pb::GraphProto, keys: &HashMap<String, String>) {
    for node in graph.node.iter_mut().filter(|n| is_gather_blocks(n)) {
        if let Some(key) = keys.get(&node.input[1]) {
            set_weights_op(node, ops::QGATHER, 0, key);
        }
    }
}

/// How many nodes read each name, [`GATHER_BLOCKS`] lookups left out: the product that shares
/// their table is its only other reader.
fn readers_but_gathers(graph: &pb::GraphProto) -> HashMap<String, usize> {
    let mut readers = readers(graph);
    for n in graph.node.iter().filter(|n| is_gather_blocks(n)) {
        for i in &n.input[1..] {
            if let Some(r) = readers.get_mut(i) {
                *r -= 1;
            }
        }
    }
    readers
}

/// A `MatMulNBits` of 4 bits in blocks of 32 or 8 bits in blocks of 16 or 32 (no `g_idx` or
/// bias), or a [`MATMUL_Q4_OFFSET`] or [`MATMUL_Q8_OFFSET`], read from its initializers: value(c, k) = scale * (q -
/// zero) or scale * q + offset per block.
pub(crate) struct NBits<'a> {
    pub(crate) k: usize,
    pub(crate) n: usize,
    bits: usize,
    block: usize,
    /// `[N][K/block][block * bits / 8]`; 4-bit values two per byte, low nibble first.
    raw: &'a [u8],
    scale: Vec<f32>,
    shift: Shift,
}

/// How a block's values are shifted.
enum Shift {
    /// `scale * (q - zero)`.
    Zero(Vec<f32>),
    /// `scale * q + offset`.
    Offset(Vec<f32>),
}

impl NBits<'_> {
    fn q(&self, c: usize, kk: usize) -> u8 {
        match self.bits {
            4 => self.raw[c * self.k / 2 + kk / 2] >> (4 * (kk % 2)) & 15,
            _ => self.raw[c * self.k + kk],
        }
    }

    /// The weight of output channel `c` at `kk`, in f32.
    pub(crate) fn value(&self, c: usize, kk: usize) -> f32 {
        let b = c * (self.k / self.block) + kk / self.block;
        let q = self.q(c, kk) as f32;
        match &self.shift {
            Shift::Zero(zero) => self.scale[b] * (q - zero[b]),
            Shift::Offset(offset) => self.scale[b] * q + offset[b],
        }
    }
}

/// `node` as a `MatMulNBits` that [`NBits`] reads, with the initializers `init` finds.
pub(crate) fn nbits<'a>(
    node: &pb::NodeProto,
    init: impl Fn(&str) -> Option<&'a pb::TensorProto>,
) -> Option<NBits<'a>> {
    let offset_bits = offset_op_bits(node);
    let with_offset = offset_bits.is_some();
    if !with_offset && (node.op_type != "MatMulNBits" || node.domain != "com.microsoft") {
        return None;
    }
    let int = |name: &str| attr(node, name).map(|a| a.i);
    let (k, n) = (
        usize::try_from(int("K")?).ok()?,
        usize::try_from(int("N")?).ok()?,
    );
    let (bits, block) = (int("bits")?, usize::try_from(int("block_size")?).ok()?);
    let supported = offset_bits.is_none_or(|b| b == bits)
        && match bits {
            4 => block == QBLOCK,
            8 => block == HALF || block == QBLOCK,
            _ => false,
        };
    let bits = bits as usize;
    if !supported || k % QBLOCK != 0 || node.input.len() < 3 {
        return None;
    }
    if node.input.iter().skip(4).any(|i| !i.is_empty()) {
        return None; // g_idx or bias
    }
    let kb = k / block;
    let b = init(&node.input[1])?;
    // Checked: K and N are the file's word; once they match the bytes, n * kb cannot overflow.
    let packed_len = n.checked_mul(kb)?.checked_mul(block * bits / 8)?;
    if b.data_type != UINT8 || external(b) || b.raw_data.len() != packed_len {
        return None;
    }
    let scale = init_f32(init(&node.input[2])?)?;
    if with_offset {
        let offset = init_f32(init(node.input.get(3)?)?)?;
        return (scale.len() == n * kb && offset.len() == n * kb).then_some(NBits {
            k,
            n,
            bits,
            block,
            raw: &b.raw_data,
            scale,
            shift: Shift::Offset(offset),
        });
    }
    let zero: Vec<f32> = match node.input.get(3).filter(|z| !z.is_empty()) {
        None => vec![(1 << (bits - 1)) as f32; n * kb],
        Some(z) => {
            let z = init(z)?;
            let per_byte = 8 / bits;
            let row_bytes = kb.div_ceil(per_byte);
            if let Some(f) = init_f32(z) {
                f
            } else if z.data_type == UINT8 && !external(z) && z.raw_data.len() == n * row_bytes {
                // Zero points packed as the values are, each row padded to whole bytes.
                let mask = ((1u16 << bits) - 1) as u8;
                (0..n * kb)
                    .map(|i| {
                        let byte = z.raw_data[(i / kb) * row_bytes + (i % kb) / per_byte];
                        (byte >> (bits * (i % kb % per_byte)) & mask) as f32
                    })
                    .collect()
            } else {
                return None;
            }
        }
    };
    (scale.len() == n * kb && zero.len() == n * kb).then_some(NBits {
        k,
        n,
        bits,
        block,
        raw: &b.raw_data,
        scale,
        shift: Shift::Zero(zero),
    })
}

/// What [`nbits`] reads `node` as: a packed 4-bit weight, or an 8-bit weight's [`Q8Plan`], which
/// packs the bytes it is then given (in place: the stream hands over the file's bytes).
enum Weight {
    Packed(Packed),
    Q8(Q8Plan),
}

/// The packed weight of `node`, when [`nbits`] reads it: 8-bit blocks by [`Q8Plan`] (from a
/// copy of the initializer's bytes); 4-bit as [`weight_of`] says.
fn packed_weight<'a>(
    node: &pb::NodeProto,
    init: impl Fn(&str) -> Option<&'a pb::TensorProto>,
) -> Option<Packed> {
    match weight_of(node, &init)? {
        Weight::Packed(w) => Some(w),
        Weight::Q8(plan) => Some(plan.pack(init(&node.input[1])?.raw_data.clone())),
    }
}

/// [`Weight`] of `node`: 8-bit blocks planned by [`Q8Plan::new`]; 4-bit blocks as `d * q + m`,
/// `d` the scale and `m` the offset, held as float16 where that is exact
/// (Q4_0, Q4_1), else as f32 (Q4_K). A `MatMulNBits`' offset is `-zero * scale`, which a
/// float16 export's zero point (`-m / d`) gives to within f32 rounding: rounded back to the
/// float16 `m` when all are that close (that is how a Q4_1 file's offsets come back exactly),
/// else kept as computed.
fn weight_of<'a>(
    node: &pb::NodeProto,
    init: impl Fn(&str) -> Option<&'a pb::TensorProto>,
) -> Option<Weight> {
    let w = nbits(node, init)?;
    if w.bits == 8 {
        return Q8Plan::new(w).map(Weight::Q8);
    }
    let (m, close): (Vec<f32>, f32) = match &w.shift {
        Shift::Offset(offset) => (offset.clone(), 0.0),
        Shift::Zero(zero) => (
            w.scale.iter().zip(zero).map(|(&s, &z)| -z * s).collect(),
            1e-5,
        ),
    };
    let as_f16 = |v: &[f32], close: f32| -> Option<Vec<f16>> {
        v.iter()
            .map(|&v| {
                let h = f16::from_f32(v);
                ((h.to_f32() - v).abs() <= close * v.abs()).then_some(h)
            })
            .collect()
    };
    // Activations rounded as llama.cpp rounds them for the GGUF type: Q4_0 (zero point 8) takes
    // Q8_0, Q4_1 Q8_1, Q4_K (our offset op) Q8_K; other 4-bit layouts keep f32 scales.
    let q4_0 = matches!(&w.shift, Shift::Zero(z) if z.iter().all(|&z| z == 8.0));
    match (as_f16(&w.scale, 0.0), as_f16(&m, close)) {
        (Some(d), Some(m)) => {
            let how = if q4_0 {
                Activations::Q8_0
            } else {
                Activations::Q8_1
            };
            // wasm32 has no float16 conversion instruction, and converting 4 scales and 4
            // offsets per block in the kernel took a fifth of its time: there the scales are
            // held as f32, the same values (4 more bytes per block of 32).
            if cfg!(target_arch = "wasm32") {
                let (d, m): (Vec<f32>, Vec<f32>) = (
                    d.iter().map(|h| h.to_f32()).collect(),
                    m.iter().map(|h| h.to_f32()).collect(),
                );
                let packed = Q4Weights::from_nbits(w.k, w.n, w.raw, &d, &m).ok()?;
                return Some(Weight::Packed(Packed::Q4F32(Arc::new(
                    packed.with_activations(how),
                ))));
            }
            let packed = Q4Weights::from_nbits(w.k, w.n, w.raw, &d, &m).ok()?;
            Some(Weight::Packed(Packed::Q4_1(Arc::new(
                packed.with_activations(how),
            ))))
        }
        _ => {
            let how = match w.shift {
                Shift::Offset(_) => Activations::Q8K,
                Shift::Zero(_) => Activations::F32Scale,
            };
            let packed = Q4Weights::from_nbits(w.k, w.n, w.raw, &w.scale, &m).ok()?;
            Some(Weight::Packed(Packed::Q4F32(Arc::new(
                packed.with_activations(how),
            ))))
        }
    }
}

/// How an 8-bit `MatMulNBits` whose zero points are all 128 (int8 blocks, `scale * (q - 128)`)
/// or a [`MATMUL_Q8_OFFSET`] whose values are all below 128 (`scale * q + offset`) is packed:
/// everything but its bytes, which were checked and are given to [`Q8Plan::pack`].
struct Q8Plan {
    k: usize,
    n: usize,
    /// Bytes stored as `q + 128` (else two's complement).
    biased: bool,
    /// One scale per `per` values (16 or 32: the file's blocks).
    scale: Vec<f32>,
    per: usize,
    /// Offsets per block, checked against K and N.
    offsets: Option<BlockOffsets>,
    activations: Activations,
}

impl Q8Plan {
    fn new(w: NBits) -> Option<Q8Plan> {
        let biased = match &w.shift {
            Shift::Zero(zero) if zero.iter().all(|&z| z == 128.0) => true,
            Shift::Offset(_) if w.raw.iter().all(|&q| q < 128) => false,
            _ => return None,
        };
        Q8Blocks::check(w.k, w.n, w.raw, &w.scale, w.block, biased).ok()?;
        // Blocks of 32 are Q8_0 and Q5_0 (llama.cpp rounds their activations as Q8_0), blocks
        // of 16 Q6_K (as Q8_K).
        // With offsets, blocks of 32 are Q5_1 (Q8_1), of 16 Q5_K and Q2_K (Q8_K).
        let activations = match (w.block, &w.shift) {
            (HALF, _) => Activations::Q8K,
            (_, Shift::Offset(_)) => Activations::Q8_1,
            _ => Activations::Q8_0,
        };
        let offsets = match w.shift {
            Shift::Offset(offset) => Some(BlockOffsets::new(w.k, w.n, w.block, &offset).ok()?),
            Shift::Zero(_) => None,
        };
        Some(Q8Plan {
            k: w.k,
            n: w.n,
            biased,
            scale: w.scale,
            per: w.block,
            offsets,
            activations,
        })
    }

    /// The packed weight, from the bytes [`Q8Plan::new`] checked (`raw`, taken over).
    fn pack(self, raw: Vec<u8>) -> Packed {
        // Values that span 32 integers (the 5- and 3-bit types) in 5 bits: the same products.
        if let Some(five) = Q5Blocks::pack(self.k, self.n, &raw, &self.scale, self.per, self.biased)
        {
            drop(raw);
            let five = match self.offsets {
                Some(o) => five.with_block_offsets(o),
                None => five,
            };
            return Packed::Q5Blocks(Arc::new(five.with_activations(self.activations)));
        }
        let packed =
            Q8Blocks::from_checked(self.k, self.n, raw, &self.scale, self.per, self.biased);
        let packed = match self.offsets {
            Some(o) => packed.with_block_offsets(o),
            None => packed,
        };
        Packed::Q8Blocks(Arc::new(packed.with_activations(self.activations)))
    }
}

/// A `MatMulNBits` or one of our offset products.
fn is_block_matmul(node: &pb::NodeProto) -> bool {
    (node.domain == "com.microsoft" && node.op_type == "MatMulNBits")
        || offset_op_bits(node).is_some()
}

/// Replaces the `MatMulNBits` nodes that [`packed_weight`] packs by `SlmQMatMul` on
/// [`Q4Weights`], their weights by key in `weights`. Zero points: float (`m = -zp * d`), packed
/// 4-bit, or absent (8).
pub(crate) fn rewrite(graph: &mut pb::GraphProto, weights: &mut HashMap<String, Packed>) {
    // Readers of each initializer: one that only its MatMulNBits reads is freed as soon as that
    // node's weight is packed, so the load never holds a layer's weights twice over.
    let readers = readers(graph);
    let outputs = outputs(graph);
    let inits = init_positions(graph);
    let mut rewritten = false;
    let mut keys = HashMap::new();
    for i in 0..graph.node.len() {
        let init = |name: &str| inits.get(name).map(|&t| &graph.initializer[t]);
        let Some(w) = packed_weight(&graph.node[i], init) else {
            continue;
        };
        let node = &mut graph.node[i];
        let freed: Vec<String> = node.input[1..]
            .iter()
            .filter(|n| readers.get(*n) == Some(&1) && !outputs.contains(*n))
            .cloned()
            .collect();
        let key = format!("{}#nbits#{i}", node.input[1]);
        keys.insert(node.input[1].clone(), key.clone());
        set_weights_op(node, ops::QMATMUL, 0, &key);
        weights.insert(key, w);
        for t in graph
            .initializer
            .iter_mut()
            .filter(|t| freed.contains(&t.name))
        {
            *t = pb::TensorProto {
                name: std::mem::take(&mut t.name),
                ..Default::default()
            };
        }
        rewritten = true;
    }
    if rewritten {
        rewrite_gathers(graph, &keys);
        prune(graph);
    }
}

/// Packs Q4_1 `MatMulNBits` weights while the protobuf is decoded: a node's 4-bit values, scales
/// and zero points are held until the last of them arrives, then packed and dropped, so the
/// decoded protobuf never holds more than one product's weights (the load's peak memory is the
/// packed model, not the file). Nodes it cannot pack keep their initializers, for [`rewrite`].
#[derive(Default)]
pub struct NBitsStream {
    /// Candidate nodes and their initializer inputs (found once the nodes are decoded).
    candidates: Option<Vec<Candidate>>,
    /// Initializer name -> candidate.
    index: HashMap<String, usize>,
    /// Packed weights, by the output name of their node.
    packed: HashMap<String, Packed>,
}

struct Candidate {
    node: pb::NodeProto,
    needed: usize,
    held: Vec<pb::TensorProto>,
}

impl Initializers for NBitsStream {
    fn take(&mut self, graph: &mut pb::GraphProto, t: pb::TensorProto) {
        let candidates = self.candidates.get_or_insert_with(|| {
            let readers = readers_but_gathers(graph);
            let mut found = vec![];
            for n in graph
                .node
                .iter()
                .filter(|n| is_block_matmul(n) && !n.output.is_empty())
            {
                let inits: Vec<&String> = n
                    .input
                    .iter()
                    .skip(1)
                    .take(3)
                    .filter(|i| !i.is_empty())
                    .collect();
                if inits.len() >= 2 && inits.iter().all(|i| readers.get(*i) == Some(&1)) {
                    for i in inits.iter() {
                        self.index.insert((*i).clone(), found.len());
                    }
                    found.push(Candidate {
                        node: n.clone(),
                        needed: inits.len(),
                        held: vec![],
                    });
                }
            }
            found
        });
        let Some(&c) = self.index.get(&t.name) else {
            graph.initializer.push(t);
            return;
        };
        let cand = &mut candidates[c];
        cand.held.push(t);
        if cand.held.len() < cand.needed {
            return;
        }
        let weight = {
            let inits: HashMap<&str, &pb::TensorProto> =
                cand.held.iter().map(|t| (t.name.as_str(), t)).collect();
            weight_of(&cand.node, |name| inits.get(name).copied())
        };
        let packed = match weight {
            Some(Weight::Packed(w)) => Some(w),
            // The bytes decoded from the file become the packed weight's: a 262k-row table
            // is not held twice (once as read, once packed).
            Some(Weight::Q8(plan)) => {
                let bytes = cand.held.iter_mut().find(|t| t.name == cand.node.input[1]);
                let raw = std::mem::take(&mut bytes.expect("the weight read it").raw_data);
                // The plan holds the scales and offsets: their tensors go before packing (for
                // Gemma 3's table, 21 MB less at the load's peak).
                cand.held.clear();
                Some(plan.pack(raw))
            }
            None => None,
        };
        match packed {
            Some(w) => {
                self.packed.insert(cand.node.output[0].clone(), w);
                cand.held.clear();
            }
            None => graph.initializer.append(&mut cand.held),
        }
    }
}

impl NBitsStream {
    /// Rewrites the packed nodes of the decoded `proto` into `SlmQMatMul` and returns their
    /// weights (for [`ops::with_weights`]); initializers still held go back to the graph.
    pub fn finish(self, proto: &mut pb::ModelProto) -> HashMap<String, Packed> {
        let mut weights = HashMap::new();
        let Some(graph) = proto.graph.as_mut() else {
            return weights;
        };
        for mut c in self.candidates.unwrap_or_default() {
            graph.initializer.append(&mut c.held);
        }
        let mut packed = self.packed;
        let mut keys = HashMap::new();
        for node in graph.node.iter_mut() {
            if !is_block_matmul(node) || node.output.is_empty() {
                continue;
            }
            if let Some(w) = packed.remove(&node.output[0]) {
                let key = format!("{}#nbits", node.output[0]);
                keys.insert(node.input[1].clone(), key.clone());
                set_weights_op(node, ops::QMATMUL, 0, &key);
                weights.insert(key, w);
            }
        }
        rewrite_gathers(graph, &keys);
        weights
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::onnx::graph::FLOAT;
    use crate::onnx::proto::read_bytes;

    fn f32_tensor(name: &str, v: &[f32]) -> pb::TensorProto {
        let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        pb::TensorProto {
            name: name.into(),
            dims: vec![v.len() as i64],
            data_type: FLOAT,
            raw_data: raw,
            ..Default::default()
        }
    }

    /// `y = MatMulNBits(x)` with K = 64, N = 3, scales `scale`, float zero points 8, blocks of
    /// `block`.
    fn nbits_model(scale: f32, block: usize) -> Vec<u8> {
        let (k, n) = (64usize, 3usize);
        let node = pb::NodeProto {
            op_type: "MatMulNBits".into(),
            domain: "com.microsoft".into(),
            input: vec!["x".into(), "b".into(), "s".into(), "zp".into()],
            output: vec!["y".into()],
            attribute: [("K", k), ("N", n), ("bits", 4), ("block_size", block)]
                .iter()
                .map(|(name, v)| pb::AttributeProto {
                    name: (*name).into(),
                    i: *v as i64,
                    r#type: 2,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let b = pb::TensorProto {
            name: "b".into(),
            dims: vec![n as i64, 2, 16],
            data_type: UINT8,
            raw_data: (0..n * k / 2).map(|i| (i * 37 % 256) as u8).collect(),
            ..Default::default()
        };
        let graph = pb::GraphProto {
            node: vec![node],
            initializer: vec![
                b,
                f32_tensor("s", &[scale; 6]),
                f32_tensor("zp", &[8.0; 6]),
                f32_tensor("other", &[1.0; 4]),
            ],
            ..Default::default()
        };
        pb::ModelProto {
            graph: Some(graph),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn q4_1_weights_are_packed_while_decoding() {
        let mut stream = NBitsStream::default();
        let mut proto = read_bytes(&nbits_model(0.5, 32), &mut stream).unwrap();
        // Only the tensor that no packed node reads was kept in the protobuf.
        let kept: Vec<&str> = proto
            .graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(kept, ["other"]);
        let weights = stream.finish(&mut proto);
        assert_eq!(weights.len(), 1);
        let node = &proto.graph.as_ref().unwrap().node[0];
        assert_eq!((node.op_type.as_str(), node.input.len()), (ops::QMATMUL, 1));
    }

    #[test]
    fn weights_it_cannot_pack_stay_in_the_protobuf() {
        // Blocks of 16: left to tract, every initializer kept.
        let mut stream = NBitsStream::default();
        let mut proto = read_bytes(&nbits_model(0.5, 16), &mut stream).unwrap();
        assert!(stream.finish(&mut proto).is_empty());
        let graph = proto.graph.as_ref().unwrap();
        assert_eq!(graph.initializer.len(), 4);
        assert_eq!(graph.node[0].op_type, "MatMulNBits");
    }

    /// Scales and offsets that float16 holds are packed as float16; others (a Q4_K block's
    /// `d * sc`) as f32, never rounded.
    #[test]
    fn scales_are_kept_exactly() {
        let packed = |scale: f32| {
            let mut stream = NBitsStream::default();
            let mut proto = read_bytes(&nbits_model(scale, 32), &mut stream).unwrap();
            let w = stream.finish(&mut proto).into_values().next().unwrap();
            format!("{w:?}")
        };
        // Float16 scales where they are exact (held as f32 in wasm32, whose kernel does not
        // convert them).
        let f16 = if cfg!(target_arch = "wasm32") {
            "f32"
        } else {
            "f16"
        };
        assert_eq!(packed(0.5), format!("Q4Weights<{f16}> {{ k: 64, n: 3 }}"));
        assert_eq!(packed(0.1), "Q4Weights<f32> { k: 64, n: 3 }");
    }
}
