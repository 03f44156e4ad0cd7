//! Packed runs: several sequences' new tokens as the rows of one run, so a batched decode step
//! reads the weights once for all of them ([`crate::batching`]). Every op of our converters'
//! graphs treats rows independently except two, which this rewrite makes row-aware:
//!
//! - the causal (and sliding-window) mask compares key positions with the query positions
//!   `Range(past, past + seq)`: they become `position_ids` (as `[seq, 1]`), which a run of one
//!   sequence sets to exactly that range (the session checks), and a packed run to each row's own
//!   position; the KV attention op then reads each sequence's rows of the mask against its own
//!   cache ([`crate::ops::kv_attention`]);
//! - the `last_hidden` slice, which keeps the last position for the LM head, becomes
//!   `SlmLastRows` ([`crate::ops::last_rows`]): the last row, or the last row of each packed
//!   sequence; `logits` is `[1, slm_rows, vocab]`.
//!
//! Exports made by others (Optimum's) build their masks otherwise: they are left alone and run one
//! sequence per step.

use tract_onnx::pb;

use super::graph::{input, producers, set_op};
use crate::ops::last_rows::ROWS;
use crate::{names, ops};

/// The query positions that replace the mask's `Range`.
const QUERY_POSITIONS: &str = "slm_query_positions";

/// Rewrites the mask and the last-position slice, both or neither; returns whether it did.
pub(crate) fn rewrite(graph: &mut pb::GraphProto) -> bool {
    let has_input = |name: &str| graph.input.iter().any(|i| i.name == name);
    if !has_input(names::POSITION_IDS) || !has_input(names::INPUT_IDS) {
        return false;
    }
    let producer = producers(graph);
    let node = |name: &str| producer.get(name).map(|&i| &graph.node[i]);
    let op = |name: &str, op_type: &str| node(name).filter(|n| n.op_type == op_type);
    // causal_mask = Where(LessOrEqual(k_pos, q_pos), 0, -inf), q_pos = Unsqueeze(Range(..)).
    // Our converters name values `<name>_<n>`.
    let named = |prefix: &str, op_type: &str| {
        graph.node.iter().position(|n| {
            n.op_type == op_type && n.output.first().is_some_and(|o| o.starts_with(prefix))
        })
    };
    let q_pos = named("causal_mask", "Where")
        .map(|w| &graph.node[w])
        .and_then(|w| op(input(w, 0)?, "LessOrEqual"))
        .and_then(|le| input(le, 1))
        .filter(|q| {
            op(q, "Unsqueeze")
                .and_then(|u| op(input(u, 0)?, "Range"))
                .is_some()
        })
        .map(str::to_string);
    let last = named("last_hidden", "Slice");
    let logits = graph.output.iter().position(|o| o.name == names::LOGITS);
    let (Some(q_pos), Some(last), Some(logits)) = (q_pos, last, logits) else {
        return false;
    };
    if rows_axis(&mut graph.output[logits]).is_none() {
        return false;
    }

    for n in graph.node.iter_mut() {
        for i in n.input.iter_mut().filter(|i| **i == q_pos) {
            *i = QUERY_POSITIONS.into();
        }
    }
    let perm = pb::AttributeProto {
        name: "perm".into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: vec![1, 0],
        ..Default::default()
    };
    let transpose = pb::NodeProto {
        op_type: "Transpose".into(),
        name: QUERY_POSITIONS.into(),
        input: vec![names::POSITION_IDS.into()],
        output: vec![QUERY_POSITIONS.into()],
        attribute: vec![perm],
        ..Default::default()
    };
    let hidden = graph.node[last].input[0].clone();
    set_op(&mut graph.node[last], ops::LAST_ROWS, vec![hidden], vec![]);
    // Before its readers: tract does not need the order, ONNX checkers do.
    graph.node.insert(0, transpose);
    if let Some(d) = rows_axis(&mut graph.output[logits]) {
        d.value = Some(pb::tensor_shape_proto::dimension::Value::DimParam(
            ROWS.into(),
        ));
    }
    super::graph::remove_dead_nodes(graph);
    true
}

/// The second axis of `[batch, 1, vocab]` logits.
fn rows_axis(v: &mut pb::ValueInfoProto) -> Option<&mut pb::tensor_shape_proto::Dimension> {
    let pb::type_proto::Value::TensorType(t) = v.r#type.as_mut()?.value.as_mut()?;
    let dims = &mut t.shape.as_mut()?.dim;
    (dims.len() == 3).then(|| &mut dims[1])
}
