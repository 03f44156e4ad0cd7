//! The attention rewrite: an ONNX export spells attention out as `MatMul(Softmax(MatMul(q,
//! Transpose(k)) * scale + mask), v)`; each such chain becomes one `SlmAttention(q, k, v, mask)`
//! node, which tract builds as the fused op ([`crate::ops::attention::Attention`]).

use std::collections::{HashMap, HashSet};

use tract_onnx::pb;

use super::graph::{attr, init_f32, input, outputs, producers, prune, readers, set_op};
use crate::ops;

/// What [`find`] reads of the graph.
struct Chains<'g> {
    graph: &'g pb::GraphProto,
    producer: HashMap<String, usize>,
    readers: HashMap<String, usize>,
    outputs: HashSet<String>,
}

impl<'g> Chains<'g> {
    /// The value of a scalar float initializer.
    fn scalar(&self, name: &str) -> Option<f32> {
        let t = self.graph.initializer.iter().find(|t| t.name == name)?;
        match init_f32(t)?.as_slice() {
            [v] => Some(*v),
            _ => None,
        }
    }

    /// The `op` node that produces `name`, when the chain is its only reader.
    fn node(&self, name: &str, op: &str) -> Option<&'g pb::NodeProto> {
        let n = &self.graph.node[*self.producer.get(name)?];
        // An intermediate that something else reads, or that the model returns, must stay.
        (n.op_type == op
            && n.domain.is_empty()
            && self.readers.get(name) == Some(&1)
            && !self.outputs.contains(name))
        .then_some(n)
    }

    /// The inputs `[q, k, v, mask]` and the scale of the chain that ends in the MatMul `pv`.
    fn find(&self, pv: &pb::NodeProto) -> Option<(Vec<String>, f32)> {
        if pv.input.len() != 2 {
            return None;
        }
        let softmax = self.node(&pv.input[0], "Softmax")?;
        if !matches!(attr(softmax, "axis").map(|a| a.i), Some(-1) | Some(3)) {
            return None;
        }
        let add = self.node(input(softmax, 0)?, "Add")?;
        let (mul, mask) = [(0, 1), (1, 0)].iter().find_map(|&(a, b)| {
            Some((
                self.node(input(add, a)?, "Mul")?,
                input(add, b)?.to_string(),
            ))
        })?;
        let (scores, scale) = [(0, 1), (1, 0)].iter().find_map(|&(a, b)| {
            Some((
                self.node(input(mul, a)?, "MatMul")?,
                self.scalar(input(mul, b)?)?,
            ))
        })?;
        let kt = self.node(input(scores, 1)?, "Transpose")?;
        if attr(kt, "perm").map(|a| a.ints.as_slice()) != Some(&[0, 1, 3, 2]) {
            return None;
        }
        Some((
            vec![
                input(scores, 0)?.to_string(),
                input(kt, 0)?.to_string(),
                pv.input[1].clone(),
                mask,
            ],
            scale,
        ))
    }
}

/// Replaces every `MatMul(Softmax(MatMul(q, Transpose(k, [0,1,3,2])) * c + mask, axis=-1), v)`
/// (c a scalar initializer, the operands of `*` and `+` in either order) by
/// `SlmAttention(q, k, v, mask)`. Chains that differ in any way are left to tract.
/// Returns how many were rewritten.
pub(crate) fn rewrite(proto: &mut pb::ModelProto) -> usize {
    let Some(graph) = proto.graph.as_mut() else {
        return 0;
    };
    let chains = Chains {
        graph,
        producer: producers(graph),
        readers: readers(graph),
        outputs: outputs(graph),
    };
    let found: Vec<(usize, Vec<String>, f32)> = graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type == "MatMul" && n.domain.is_empty())
        .filter_map(|(i, n)| chains.find(n).map(|(inputs, scale)| (i, inputs, scale)))
        .collect();
    for (i, inputs, scale) in &found {
        let scale = pb::AttributeProto {
            name: ops::SCALE.into(),
            r#type: pb::attribute_proto::AttributeType::Float as i32,
            f: *scale,
            ..Default::default()
        };
        set_op(
            &mut graph.node[*i],
            ops::ATTENTION,
            inputs.clone(),
            vec![scale],
        );
    }
    if !found.is_empty() {
        prune(graph);
    }
    found.len()
}
