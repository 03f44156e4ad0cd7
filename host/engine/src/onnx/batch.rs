//! One sequence per run: the batch axis pinned to 1. Exports made by others (Optimum's
//! `text-generation-with-past`) build the causal mask by flattening `attention_mask`
//! `[batch_size, past_sequence_length + sequence_length]`, a product of symbols tract cannot
//! analyse ("Can not compute a shape with square of symbols"); with the batch a number, it can.
//! The engine runs one sequence per session anyway (the KV cache is per stream).

use tract_onnx::pb;

use crate::names;

/// Replaces the symbol of `input_ids`' first axis by 1 on every graph input, output and value
/// info that carries it. A graph whose `input_ids` has a fixed or no first axis is left alone.
pub(crate) fn pin_to_one(graph: &mut pb::GraphProto) {
    let Some(batch) = graph
        .input
        .iter()
        .find(|v| v.name == names::INPUT_IDS)
        .and_then(|v| dims(v).and_then(|d| d.first()))
        .and_then(|d| match &d.value {
            Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) => Some(p.clone()),
            _ => None,
        })
    else {
        return;
    };
    let values = graph
        .input
        .iter_mut()
        .chain(graph.output.iter_mut())
        .chain(graph.value_info.iter_mut());
    for v in values {
        for d in dims_mut(v).into_iter().flatten() {
            if matches!(&d.value, Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) if *p == batch)
            {
                d.value = Some(pb::tensor_shape_proto::dimension::Value::DimValue(1));
            }
        }
    }
}

fn dims(v: &pb::ValueInfoProto) -> Option<&Vec<pb::tensor_shape_proto::Dimension>> {
    let pb::type_proto::Value::TensorType(t) = v.r#type.as_ref()?.value.as_ref()?;
    Some(&t.shape.as_ref()?.dim)
}

fn dims_mut(v: &mut pb::ValueInfoProto) -> Option<&mut Vec<pb::tensor_shape_proto::Dimension>> {
    let pb::type_proto::Value::TensorType(t) = v.r#type.as_mut()?.value.as_mut()?;
    Some(&mut t.shape.as_mut()?.dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::tensor_shape_proto::dimension::Value;

    fn value(name: &str, dims: &[Value]) -> pb::ValueInfoProto {
        let dim = dims
            .iter()
            .map(|v| pb::tensor_shape_proto::Dimension {
                value: Some(v.clone()),
                ..Default::default()
            })
            .collect();
        pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: 7,
                    shape: Some(pb::TensorShapeProto { dim }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn sym(s: &str) -> Value {
        Value::DimParam(s.into())
    }

    fn shape(v: &pb::ValueInfoProto) -> Vec<Value> {
        dims(v)
            .unwrap()
            .iter()
            .map(|d| d.value.clone().unwrap())
            .collect()
    }

    /// Optimum's names: every axis named `batch_size` becomes 1, other symbols stay.
    #[test]
    fn the_batch_symbol_of_input_ids_becomes_one_everywhere() {
        let mut graph = pb::GraphProto {
            input: vec![
                value("input_ids", &[sym("batch_size"), sym("sequence_length")]),
                value(
                    "attention_mask",
                    &[
                        sym("batch_size"),
                        sym("past_sequence_length + sequence_length"),
                    ],
                ),
            ],
            output: vec![value(
                "logits",
                &[
                    sym("batch_size"),
                    sym("sequence_length"),
                    Value::DimValue(128),
                ],
            )],
            ..Default::default()
        };
        pin_to_one(&mut graph);
        assert_eq!(
            shape(&graph.input[1]),
            [
                Value::DimValue(1),
                sym("past_sequence_length + sequence_length")
            ]
        );
        assert_eq!(
            shape(&graph.output[0]),
            [
                Value::DimValue(1),
                sym("sequence_length"),
                Value::DimValue(128)
            ]
        );
    }

    /// A fixed batch, or no batch symbol shared: nothing to pin.
    #[test]
    fn a_fixed_batch_is_left_alone() {
        let mut graph = pb::GraphProto {
            input: vec![
                value("input_ids", &[Value::DimValue(1), sym("seq")]),
                value("position_ids", &[sym("b"), sym("seq")]),
            ],
            ..Default::default()
        };
        pin_to_one(&mut graph);
        assert_eq!(shape(&graph.input[1]), [sym("b"), sym("seq")]);
    }
}
