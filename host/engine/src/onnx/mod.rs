//! The ONNX protobuf before tract parses it: decoded from the file without holding it twice
//! ([`proto`]), then rewritten so that tract builds our ops ([`crate::ops`]) where the export
//! spells out what they do: 4- and 8-bit `MatMulNBits` ([`nbits`]) and int8 `MatMul`s ([`int8`]) keep
//! their weights quantized, f32 `MatMul`s run on our one-order kernel ([`float`]), attention chains are fused ([`attention`]), and their KV cache kept in place
//! ([`kv_cache`]); the batch axis is pinned to one sequence ([`batch`]), and our converters'
//! graphs take several sequences' tokens as the rows of one run ([`packing`]). The file is unchanged
//! (it stays what ONNX Runtime runs); patterns that do not fit exactly are left to tract.

use std::collections::HashMap;

use tract_onnx::pb;

use crate::ops::Packed;

pub(crate) mod attention;
pub(crate) mod batch;
pub(crate) mod float;
pub(crate) mod graph;
pub(crate) mod int8;
pub(crate) mod kv_cache;
pub(crate) mod nbits;
pub(crate) mod packing;
pub(crate) mod proto;

/// Every rewrite of the CPU engine, on a protobuf that `stream` decoded: returns the weights of
/// the rewritten nodes, by key, for [`crate::ops::with_weights`].
pub(crate) fn rewrite(
    proto: &mut pb::ModelProto,
    stream: nbits::NBitsStream,
) -> HashMap<String, Packed> {
    let mut weights = stream.finish(proto);
    if let Some(graph) = proto.graph.as_mut() {
        batch::pin_to_one(graph);
    }
    attention::rewrite(proto);
    if let Some(graph) = proto.graph.as_mut() {
        nbits::rewrite(graph, &mut weights);
        // A block-quantized model already rounds activations to 8 bits per block: its int8 LM
        // head does too.
        let head_q8 = weights.values().any(|w| {
            matches!(
                w,
                Packed::Q4_1(_) | Packed::Q4F32(_) | Packed::Q8Blocks(_) | Packed::Q5Blocks(_)
            )
        });
        int8::rewrite(graph, &mut weights, head_q8);
        float::rewrite(graph, &mut weights);
        kv_cache::rewrite(graph);
        packing::rewrite(graph);
    }
    weights
}
