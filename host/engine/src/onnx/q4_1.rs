//! Q4_1 weights: a `com.microsoft` `MatMulNBits` node (4 bits, blocks of 32 along K, a scale
//! and a zero point per block) whose scales and offsets are float16 values, as a Q4_1 GGUF
//! stores them, becomes an `SlmQMatMul(x)` node on [`Q4Weights`] (kept 4-bit, packed for the
//! kernels). Packed while the protobuf is decoded ([`Q4Stream`]), or after ([`rewrite`]) for
//! what the stream could not take.

use std::collections::HashMap;
use std::sync::Arc;

use half::f16;
use tract_onnx::pb;

use super::graph::{
    attr, external, init_f32, init_positions, outputs, prune, readers, set_weights_op, UINT8,
};
use super::proto::Initializers;
use crate::kernels::q4_1::{Q4Weights, QBLOCK};
use crate::ops::{self, Packed};

/// A 4-bit `MatMulNBits` (blocks of 32, no `g_idx` or bias) read from its initializers:
/// value(c, k) = scale * (q - zero) per block.
pub(crate) struct NBits<'a> {
    pub(crate) k: usize,
    pub(crate) n: usize,
    /// `[N][K/32][16]`, two values per byte, low nibble first.
    raw: &'a [u8],
    scale: Vec<f32>,
    zero: Vec<f32>,
}

impl NBits<'_> {
    fn q(&self, c: usize, kk: usize) -> u8 {
        self.raw[c * self.k / 2 + kk / 2] >> (4 * (kk % 2)) & 15
    }

    /// The weight of output channel `c` at `kk`, in f32.
    pub(crate) fn value(&self, c: usize, kk: usize) -> f32 {
        let b = c * (self.k / QBLOCK) + kk / QBLOCK;
        self.scale[b] * (self.q(c, kk) as f32 - self.zero[b])
    }
}

/// `node` as a 4-bit `MatMulNBits` whose initializers `init` finds, if it is one.
pub(crate) fn nbits<'a>(
    node: &pb::NodeProto,
    init: impl Fn(&str) -> Option<&'a pb::TensorProto>,
) -> Option<NBits<'a>> {
    if node.op_type != "MatMulNBits" || node.domain != "com.microsoft" {
        return None;
    }
    let int = |name: &str| attr(node, name).map(|a| a.i);
    let (k, n) = (
        usize::try_from(int("K")?).ok()?,
        usize::try_from(int("N")?).ok()?,
    );
    if int("bits") != Some(4)
        || int("block_size") != Some(QBLOCK as i64)
        || k % QBLOCK != 0
        || node.input.len() < 3
    {
        return None;
    }
    if node.input.iter().skip(4).any(|i| !i.is_empty()) {
        return None; // g_idx or bias
    }
    let kb = k / QBLOCK;
    let b = init(&node.input[1])?;
    // Checked: K and N are the file's word; once they match the bytes, n * kb cannot overflow.
    let packed_len = n.checked_mul(kb)?.checked_mul(QBLOCK / 2)?;
    if b.data_type != UINT8 || external(b) || b.raw_data.len() != packed_len {
        return None;
    }
    let scale = init_f32(init(&node.input[2])?)?;
    let zero: Vec<f32> = match node.input.get(3).filter(|z| !z.is_empty()) {
        None => vec![8.0; n * kb],
        Some(z) => {
            let z = init(z)?;
            if let Some(f) = init_f32(z) {
                f
            } else if z.data_type == UINT8 && !external(z) && z.raw_data.len() == n * kb.div_ceil(2)
            {
                // Two 4-bit zero points per byte, low nibble first, each row padded to whole bytes.
                (0..n * kb)
                    .map(|i| {
                        (z.raw_data[(i / kb) * kb.div_ceil(2) + (i % kb) / 2] >> (4 * (i % kb % 2))
                            & 15) as f32
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
        raw: &b.raw_data,
        scale,
        zero,
    })
}

/// The packed weight of `node`, when it is a 4-bit `MatMulNBits` whose scales and offsets
/// (`m = -zero * scale`) float16 holds exactly.
fn q4_1_weight<'a>(
    node: &pb::NodeProto,
    init: impl Fn(&str) -> Option<&'a pb::TensorProto>,
) -> Option<Q4Weights> {
    let w = nbits(node, init)?;
    // Held as float16: only when that is exact (to f32 rounding), as for a Q4_1 export.
    let exact_f16 = |v: f32| {
        let h = f16::from_f32(v);
        ((h.to_f32() - v).abs() <= 1e-5 * v.abs()).then_some(h)
    };
    let d: Vec<f16> = w
        .scale
        .iter()
        .map(|&s| exact_f16(s))
        .collect::<Option<_>>()?;
    let m: Vec<f16> = w
        .scale
        .iter()
        .zip(&w.zero)
        .map(|(&s, &z)| exact_f16(-z * s))
        .collect::<Option<_>>()?;
    Q4Weights::from_nbits(w.k, w.n, w.raw, &d, &m).ok()
}

/// Replaces the `MatMulNBits` nodes that [`q4_1_weight`] packs by `SlmQMatMul` on
/// [`Q4Weights`], their weights by key in `weights`. Zero points: float (`m = -zp * d`), packed
/// 4-bit, or absent (8).
pub(crate) fn rewrite(graph: &mut pb::GraphProto, weights: &mut HashMap<String, Packed>) {
    // Readers of each initializer: one that only its MatMulNBits reads is freed as soon as that
    // node's weight is packed, so the load never holds a layer's weights twice over.
    let readers = readers(graph);
    let outputs = outputs(graph);
    let inits = init_positions(graph);
    let mut rewritten = false;
    for i in 0..graph.node.len() {
        let init = |name: &str| inits.get(name).map(|&t| &graph.initializer[t]);
        let Some(w) = q4_1_weight(&graph.node[i], init) else {
            continue;
        };
        let node = &mut graph.node[i];
        let freed: Vec<String> = node.input[1..]
            .iter()
            .filter(|n| readers.get(*n) == Some(&1) && !outputs.contains(*n))
            .cloned()
            .collect();
        let key = format!("{}#q4_1#{i}", node.input[1]);
        set_weights_op(node, ops::QMATMUL, 0, &key);
        weights.insert(key, Packed::Q4_1(Arc::new(w)));
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
        prune(graph);
    }
}

/// Packs Q4_1 `MatMulNBits` weights while the protobuf is decoded: a node's 4-bit values, scales
/// and zero points are held until the last of them arrives, then packed and dropped, so the
/// decoded protobuf never holds more than one product's weights (the load's peak memory is the
/// packed model, not the file). Nodes it cannot pack keep their initializers, for [`rewrite`].
#[derive(Default)]
pub struct Q4Stream {
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

impl Initializers for Q4Stream {
    fn take(&mut self, graph: &mut pb::GraphProto, t: pb::TensorProto) {
        let candidates = self.candidates.get_or_insert_with(|| {
            let readers = readers(graph);
            let mut found = vec![];
            for n in graph.node.iter().filter(|n| {
                n.op_type == "MatMulNBits" && n.domain == "com.microsoft" && !n.output.is_empty()
            }) {
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
        let inits: HashMap<&str, &pb::TensorProto> =
            cand.held.iter().map(|t| (t.name.as_str(), t)).collect();
        match q4_1_weight(&cand.node, |name| inits.get(name).copied()) {
            Some(w) => {
                self.packed
                    .insert(cand.node.output[0].clone(), Packed::Q4_1(Arc::new(w)));
                cand.held.clear();
            }
            None => graph.initializer.append(&mut cand.held),
        }
    }
}

impl Q4Stream {
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
        for node in graph.node.iter_mut() {
            if node.op_type != "MatMulNBits" || node.output.is_empty() {
                continue;
            }
            if let Some(w) = packed.remove(&node.output[0]) {
                let key = format!("{}#q4_1", node.output[0]);
                set_weights_op(node, ops::QMATMUL, 0, &key);
                weights.insert(key, w);
            }
        }
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

    /// `y = MatMulNBits(x)` with K = 64, N = 3, scales `scale`, float zero points.
    fn nbits_model(scale: f32) -> Vec<u8> {
        let (k, n) = (64usize, 3usize);
        let node = pb::NodeProto {
            op_type: "MatMulNBits".into(),
            domain: "com.microsoft".into(),
            input: vec!["x".into(), "b".into(), "s".into(), "zp".into()],
            output: vec!["y".into()],
            attribute: [("K", k), ("N", n), ("bits", 4), ("block_size", 32)]
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
        let mut stream = Q4Stream::default();
        let mut proto = read_bytes(&nbits_model(0.5), &mut stream).unwrap();
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
        // A scale that float16 does not hold exactly: left to tract, every initializer kept.
        let mut stream = Q4Stream::default();
        let mut proto = read_bytes(&nbits_model(0.1), &mut stream).unwrap();
        assert!(stream.finish(&mut proto).is_empty());
        let graph = proto.graph.as_ref().unwrap();
        assert_eq!(graph.initializer.len(), 4);
        assert_eq!(graph.node[0].op_type, "MatMulNBits");
    }
}
