//! The in-place KV cache rewrite: an export appends each step's keys and values to the cache with
//! `present = Concat(past, new)`, a copy of the whole cache per layer and step (40% of a decode
//! step at a 2,000-token context). Where every layer's fused attention reads such a pair of
//! `Concat`s, the three nodes become one `SlmKvAttention(q, past_k, k, past_v, v, mask)` with the
//! `present.*` tensors as its second and third outputs: the op keeps the cache in its own state,
//! written in place ([`crate::ops::kv_attention`]).
//!
//! The model's inputs and outputs keep their names. Their last axis (the head width) becomes the
//! symbol [`KV_WIDTH`]: a session passes `past_key_values.*` of width 0 (it carries only the
//! cached length, for the causal mask) and gets empty `present.*` back; a stateless call passes
//! the cache whole and gets it whole, as before.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb;

use super::graph::{input, outputs, producers, readers};
use crate::{names, ops};

/// The symbol of the KV tensors' last axis in the rewritten model.
pub(crate) const KV_WIDTH: &str = "slm_kv_width";

/// The nodes of one layer's rewrite: the attention node and its two `Concat`s.
struct Layer {
    attention: usize,
    concats: [usize; 2],
    layer: usize,
    /// `[q, past_k, k, past_v, v, mask]`.
    inputs: Vec<String>,
    /// `present.N.key`, `present.N.value`.
    presents: [String; 2],
}

/// The layer number of `past_key_values.N.<kind>`.
fn past_layer(name: &str, kind: &str) -> Option<usize> {
    let rest = name.strip_prefix(names::PAST_KEY_VALUES_PREFIX)?;
    let (layer, k) = rest.split_once('.')?;
    (k == kind).then(|| layer.parse().ok())?
}

/// The layer whose cache `node`, a fused attention, reads through `Concat(past, new)` on axis 2
/// for both keys and values, when nothing else reads those `Concat`s.
fn match_layer(
    graph: &pb::GraphProto,
    i: usize,
    producer: &HashMap<String, usize>,
    reads: &HashMap<String, usize>,
) -> Option<Layer> {
    let node = &graph.node[i];
    if node.op_type != ops::ATTENTION || node.input.len() != 4 || node.output.len() != 1 {
        return None;
    }
    let concat = |name: &str, kind: &str| -> Option<(usize, usize, String)> {
        let c = *producer.get(name)?;
        let n = &graph.node[c];
        let axis = n.attribute.iter().find(|a| a.name == "axis")?.i;
        let ok = n.op_type == "Concat"
            && n.domain.is_empty()
            && n.input.len() == 2
            && matches!(axis, 2 | -2)
            && reads.get(name) == Some(&1)
            && name.starts_with(names::PRESENT_PREFIX);
        let layer = past_layer(input(n, 0)?, kind)?;
        let new = input(n, 1)?.to_string();
        ok.then_some((c, layer, new))
    };
    let (ck, layer, k) = concat(input(node, 1)?, "key")?;
    let (cv, layer_v, v) = concat(input(node, 2)?, "value")?;
    if layer != layer_v {
        return None;
    }
    let past_k = graph.node[ck].input[0].clone();
    let past_v = graph.node[cv].input[0].clone();
    Some(Layer {
        attention: i,
        concats: [ck, cv],
        layer,
        inputs: vec![
            node.input[0].clone(),
            past_k,
            k,
            past_v,
            v,
            node.input[3].clone(),
        ],
        presents: [node.input[1].clone(), node.input[2].clone()],
    })
}

/// Sets the last axis of a graph input or output to the symbol [`KV_WIDTH`].
fn symbolic_width(value: &mut pb::ValueInfoProto) {
    use pb::tensor_shape_proto::dimension::Value;
    use pb::type_proto::Value as Type;
    let Some(Type::TensorType(t)) = value.r#type.as_mut().and_then(|t| t.value.as_mut()) else {
        return;
    };
    if let Some(last) = t.shape.as_mut().and_then(|s| s.dim.last_mut()) {
        last.value = Some(Value::DimParam(KV_WIDTH.into()));
    }
}

/// Rewrites every layer onto `SlmKvAttention`, or nothing: a model whose cache some layer
/// handles otherwise (or that reads `past_key_values.*` other than through `Concat` and `Shape`)
/// keeps its `Concat`s. Returns how many layers were rewritten.
pub(crate) fn rewrite(graph: &mut pb::GraphProto) -> usize {
    let producer = producers(graph);
    let reads = readers(graph);
    let layers: Vec<Layer> = (0..graph.node.len())
        .filter_map(|i| match_layer(graph, i, &producer, &reads))
        .collect();
    let past: Vec<&str> = graph
        .input
        .iter()
        .map(|i| i.name.as_str())
        .filter(|n| n.starts_with(names::PAST_KEY_VALUES_PREFIX))
        .collect();
    let covered: HashSet<&str> = layers
        .iter()
        .flat_map(|l| [l.inputs[1].as_str(), l.inputs[3].as_str()])
        .collect();
    if layers.is_empty() || covered.len() != past.len() || past.iter().any(|p| !covered.contains(p))
    {
        return 0;
    }
    // Besides its Concat, a past input may only be measured (the causal mask reads its length).
    let concats: HashSet<usize> = layers.iter().flat_map(|l| l.concats).collect();
    let other_reader = graph.node.iter().enumerate().any(|(i, n)| {
        !concats.contains(&i)
            && n.op_type != "Shape"
            && n.input.iter().any(|x| covered.contains(x.as_str()))
    });
    if other_reader {
        return 0;
    }
    let graph_outputs = outputs(graph);
    if layers
        .iter()
        .any(|l| l.presents.iter().any(|p| !graph_outputs.contains(p)))
    {
        return 0;
    }

    for l in &layers {
        let node = &mut graph.node[l.attention];
        let scale = node.attribute.clone();
        let layer = pb::AttributeProto {
            name: ops::LAYER.into(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i: l.layer as i64,
            ..Default::default()
        };
        node.op_type = ops::KV_ATTENTION.into();
        node.input = l.inputs.clone();
        node.output.extend(l.presents.iter().cloned());
        node.attribute = scale.into_iter().chain([layer]).collect();
    }
    let mut i = 0;
    graph.node.retain(|_| {
        i += 1;
        !concats.contains(&(i - 1))
    });
    let presents: HashSet<&String> = layers.iter().flat_map(|l| &l.presents).collect();
    for v in graph.input.iter_mut() {
        if covered.contains(v.name.as_str()) {
            symbolic_width(v);
        }
    }
    for v in graph.output.iter_mut() {
        if presents.contains(&v.name) {
            symbolic_width(v);
        }
    }
    layers.len()
}
