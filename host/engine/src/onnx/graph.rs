//! Reading and editing a decoded ONNX graph: initializer values, attributes, who produces and
//! who reads each value, and the edits every rewrite makes (replacing a node, dropping what no
//! longer has a reader).

use std::collections::{HashMap, HashSet};

use tract_onnx::pb;

/// `TensorProto.DataType` values.
pub(crate) const FLOAT: i32 = 1;
pub(crate) const UINT8: i32 = 2;
pub(crate) const INT8: i32 = 3;
const INT64: i32 = 7;

/// Whether the tensor's data lives in an external file (`data_location: EXTERNAL`), not here.
pub(crate) fn external(t: &pb::TensorProto) -> bool {
    t.data_location == Some(1)
}

/// How many values the tensor's dims hold; None for a negative dim or a count that overflows.
pub(crate) fn numel(t: &pb::TensorProto) -> Option<usize> {
    t.dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
}

/// Values of an int8 initializer held in the file, as bytes (two's complement).
pub(crate) fn init_i8(t: &pb::TensorProto) -> Option<Vec<u8>> {
    if t.data_type != INT8 || external(t) {
        return None;
    }
    let len = numel(t)?;
    if !t.raw_data.is_empty() {
        return (t.raw_data.len() == len).then(|| t.raw_data.clone());
    }
    (t.int32_data.len() == len).then(|| t.int32_data.iter().map(|&v| v as i8 as u8).collect())
}

/// Values of a float initializer held in the file.
pub(crate) fn init_f32(t: &pb::TensorProto) -> Option<Vec<f32>> {
    if t.data_type != FLOAT || external(t) {
        return None;
    }
    let len = numel(t)?;
    if !t.raw_data.is_empty() {
        if t.raw_data.len() != len.checked_mul(4)? {
            return None;
        }
        return Some(
            t.raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        );
    }
    (t.float_data.len() == len).then(|| t.float_data.clone())
}

/// Values of an int64 initializer held in the file.
pub(crate) fn init_i64(t: &pb::TensorProto) -> Option<Vec<i64>> {
    if t.data_type != INT64 || external(t) {
        return None;
    }
    if !t.raw_data.is_empty() {
        return Some(
            t.raw_data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        );
    }
    Some(t.int64_data.clone())
}

/// The name of `node`'s input `i`: a malformed graph's node may have fewer inputs than its op takes.
pub(crate) fn input(node: &pb::NodeProto, i: usize) -> Option<&str> {
    node.input.get(i).map(String::as_str)
}

pub(crate) fn attr<'a>(node: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

/// Initializer name -> its index in the graph's initializers.
pub(crate) fn init_positions(graph: &pb::GraphProto) -> HashMap<String, usize> {
    graph
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect()
}

/// Value name -> index of the node that outputs it.
pub(crate) fn producers(graph: &pb::GraphProto) -> HashMap<String, usize> {
    graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i)))
        .collect()
}

/// Value name -> how many node inputs read it.
pub(crate) fn readers(graph: &pb::GraphProto) -> HashMap<String, usize> {
    let mut readers: HashMap<String, usize> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            *readers.entry(i.clone()).or_default() += 1;
        }
    }
    readers
}

/// The names the graph returns.
pub(crate) fn outputs(graph: &pb::GraphProto) -> HashSet<String> {
    graph.output.iter().map(|o| o.name.clone()).collect()
}

/// Makes `node` the node `op_type(input)` with `attribute`, in the default domain (its outputs
/// stay): how every rewrite replaces a node.
pub(crate) fn set_op(
    node: &mut pb::NodeProto,
    op_type: &str,
    input: Vec<String>,
    attribute: Vec<pb::AttributeProto>,
) {
    node.op_type = op_type.to_string();
    node.domain = String::new();
    node.input = input;
    node.attribute = attribute;
}

/// Makes `node` our op `op_type` on its input number `input` alone, the weights it reads left in
/// the registry under `key` ([`crate::ops::with_weights`]).
pub(crate) fn set_weights_op(node: &mut pb::NodeProto, op_type: &str, input: usize, key: &str) {
    let x = std::mem::take(&mut node.input[input]);
    let weights = pb::AttributeProto {
        name: crate::ops::WEIGHTS.into(),
        r#type: pb::attribute_proto::AttributeType::String as i32,
        s: key.as_bytes().to_vec(),
        ..Default::default()
    };
    set_op(node, op_type, vec![x], vec![weights]);
}

/// Drops nodes whose outputs nobody reads; returns the names still read (by nodes or as outputs).
pub(crate) fn remove_dead_nodes(graph: &mut pb::GraphProto) -> HashSet<String> {
    loop {
        let mut used: HashSet<String> = HashSet::new();
        for n in &graph.node {
            used.extend(n.input.iter().cloned());
        }
        used.extend(graph.output.iter().map(|o| o.name.clone()));
        let before = graph.node.len();
        graph.node.retain(|n| {
            n.output.is_empty() || n.output.iter().any(|o| !o.is_empty() && used.contains(o))
        });
        if graph.node.len() == before {
            return used;
        }
    }
}

/// Drops the nodes and the initializers that nothing reads any more (after a rewrite).
pub(crate) fn prune(graph: &mut pb::GraphProto) {
    let used = remove_dead_nodes(graph);
    graph.initializer.retain(|t| used.contains(&t.name));
}
