//! The int8 rewrite: an int8 export writes each weight as `MatMul(x, Cast(Q int8) * scale)`
//! (optionally with a `Transpose` of the dequantized weight, as a tied LM head does). Left to
//! itself, tract folds the constant `Cast * Mul` into an f32 weight: four times the bytes, read
//! on every token. Here such a `MatMul` becomes an `SlmQMatMul(x)` node whose weights (the int8
//! values and the scales, moved out of the protobuf) wait in the registry
//! ([`crate::ops::with_weights`]); a `Gather` of rows from a tied embedding table becomes an
//! `SlmQGather` on the same weights. The `Cast`, `Mul` and initializers that fed only rewritten
//! nodes are dropped. The result is the same product (up to the order of the additions).

use std::collections::HashMap;
use std::sync::Arc;

use tract_onnx::pb;

use super::graph::{
    attr, external, init_f32, init_i64, init_i8, init_positions, input, numel, producers,
    remove_dead_nodes, set_weights_op, FLOAT, INT8,
};
use crate::kernels::int8::{Layout, QWeights};
use crate::kernels::q8::Q8Weights;
use crate::ops::{self, Packed};

/// A weight found behind a MatMul: the int8 initializer, the scales and their layout.
struct Found {
    q_init: String,
    k: usize,
    n: usize,
    layout: Layout,
    scale: Vec<f32>,
}

/// Replaces `MatMul(x, [Transpose](Cast(Q int8) * scale))` by `SlmQMatMul(x)` (and the `Gather`s
/// of a tied table by `SlmQGather`), their weights by key in `weights`. With `head_q8` (a Q4_1
/// model, whose activations are rounded to 8 bits per block), a transposed weight (the tied LM
/// head) is packed for 8-bit activations too ([`Q8Weights`]) when it can be.
pub(crate) fn rewrite(
    graph: &mut pb::GraphProto,
    weights: &mut HashMap<String, Packed>,
    head_q8: bool,
) {
    let inits = init_positions(graph);
    let rewrites = find_matmuls(graph, &inits);
    if rewrites.is_empty() {
        return;
    }
    let mut pending = vec![];
    for (i, found) in rewrites {
        let key = format!("{}#{}", found.q_init, i);
        set_weights_op(&mut graph.node[i], ops::QMATMUL, 0, &key);
        pending.push((key, found));
    }
    rewrite_gathers(graph, &pending);
    let used = remove_dead_nodes(graph);
    // An int8 initializer nothing else reads any more is moved out of the protobuf (no copy);
    // one that stays (a tied embedding table, which a Gather also reads) is copied.
    let mut uses: HashMap<String, usize> = HashMap::new();
    for (_, found) in &pending {
        *uses.entry(found.q_init.clone()).or_default() += 1;
    }
    for (key, found) in pending {
        let t = &mut graph.initializer[inits[&found.q_init]];
        let values = if !used.contains(&found.q_init)
            && uses[&found.q_init] == 1
            && !t.raw_data.is_empty()
        {
            std::mem::take(&mut t.raw_data)
        } else {
            init_i8(t).expect("checked int8 initializer")
        };
        if let Some(w) = pack(found, values, head_q8) {
            weights.insert(key, w);
        }
    }
    graph.initializer.retain(|t| used.contains(&t.name));
}

/// The `MatMul` nodes whose weight is an int8 one ([`Finder::find`]), by index.
fn find_matmuls(graph: &pb::GraphProto, inits: &HashMap<String, usize>) -> Vec<(usize, Found)> {
    let finder = Finder {
        graph,
        producer: producers(graph),
        inits,
    };
    let mut rewrites = vec![];
    for (i, node) in graph.node.iter().enumerate() {
        if node.op_type == "MatMul" && node.domain.is_empty() && node.input.len() == 2 {
            if let Some(found) = finder.find(&node.input[1]) {
                rewrites.push((i, found));
            }
        }
    }
    rewrites
}

/// A Gather of rows from an int8 table that a rewritten NK MatMul also reads (a tied embedding)
/// reads the rows from the same weights: the table is held once.
fn rewrite_gathers(graph: &mut pb::GraphProto, pending: &[(String, Found)]) {
    let tables: HashMap<&str, &str> = pending
        .iter()
        .filter(|(_, f)| f.layout == Layout::NK)
        .map(|(key, f)| (f.q_init.as_str(), key.as_str()))
        .collect();
    for node in graph.node.iter_mut() {
        let axis = attr(node, "axis").map(|a| a.i).unwrap_or(0);
        if node.op_type == "Gather" && node.domain.is_empty() && node.input.len() == 2 && axis == 0
        {
            if let Some(key) = tables.get(node.input[0].as_str()) {
                set_weights_op(node, ops::QGATHER, 1, key);
            }
        }
    }
}

/// The weight of `found` with its int8 `values`: for 8-bit activations (the tied LM head of a
/// Q4_1 model) when `head_q8` and the table fits, else for f32 activations.
fn pack(found: Found, values: Vec<u8>, head_q8: bool) -> Option<Packed> {
    let (values, scale) = if head_q8 && found.layout == Layout::NK {
        match Q8Weights::from_rows(found.k, found.n, values, found.scale) {
            Ok(w) => return Some(Packed::Q8Head(Arc::new(w))),
            Err(back) => back,
        }
    } else {
        (values, found.scale)
    };
    QWeights::new(found.k, found.n, found.layout, values, scale)
        .map(|w| Packed::Int8(Arc::new(w)))
        .ok()
}

/// What [`Finder::find`] reads of the graph before it changes.
struct Finder<'g> {
    graph: &'g pb::GraphProto,
    producer: HashMap<String, usize>,
    inits: &'g HashMap<String, usize>,
}

impl<'g> Finder<'g> {
    fn node(&self, name: &str) -> Option<&'g pb::NodeProto> {
        self.producer.get(name).map(|&i| &self.graph.node[i])
    }

    fn init(&self, name: &str) -> Option<&'g pb::TensorProto> {
        self.inits.get(name).map(|&i| &self.graph.initializer[i])
    }

    /// The int8 weight behind the MatMul operand `b`: `[Transpose](Cast(Q) * scale)`.
    fn find(&self, b: &str) -> Option<Found> {
        let (b, transposed) = match self.node(b).filter(|n| n.op_type == "Transpose") {
            Some(t) => {
                let perm = attr(t, "perm").map(|a| a.ints.clone());
                if !(perm.is_none() || perm == Some(vec![1, 0])) {
                    return None;
                }
                (input(t, 0)?, true)
            }
            None => (b, false),
        };
        let (q, scale_name) = self.dequantized(b)?;
        let (rows, cols) = (q.dims[0] as usize, q.dims[1] as usize);
        let (scale, scale_dims) = self.scale(scale_name)?;
        // Per column of Q ([C] or [1, C]) or per row ([R, 1]).
        let per_column = scale_dims == [cols as i64] || scale_dims == [1, cols as i64];
        let per_row = scale_dims == [rows as i64, 1];
        let (k, n, layout) = match (transposed, per_column, per_row) {
            // x @ (Q * s): K = rows, N = cols, a scale per output column.
            (false, true, _) => (rows, cols, Layout::KN),
            // x @ (Q * s)^T: K = cols, N = rows, a scale per output row.
            (true, _, true) => (cols, rows, Layout::NK),
            _ => return None,
        };
        Some(Found {
            q_init: q.name.clone(),
            k,
            n,
            layout,
            scale,
        })
    }

    /// `Cast(Q, to=float) * s` (either order), Q a 2-D int8 initializer in the file: Q and the
    /// name of s.
    fn dequantized(&self, name: &str) -> Option<(&'g pb::TensorProto, &'g str)> {
        let mul = self
            .node(name)
            .filter(|n| n.op_type == "Mul" && n.input.len() == 2)?;
        let (cast, scale_name) = [(0, 1), (1, 0)].iter().find_map(|&(c, s)| {
            self.node(&mul.input[c])
                .filter(|n| n.op_type == "Cast")
                .map(|n| (n, mul.input[s].as_str()))
        })?;
        if attr(cast, "to").map(|a| a.i) != Some(FLOAT as i64) {
            return None;
        }
        let q = self.init(input(cast, 0)?)?;
        if q.data_type != INT8 || q.dims.len() != 2 || q.dims.contains(&0) || external(q) {
            return None;
        }
        // Its values are all there (as `init_i8` reads them).
        let held = if q.raw_data.is_empty() {
            q.int32_data.len()
        } else {
            q.raw_data.len()
        };
        if numel(q) != Some(held) {
            return None;
        }
        Some((q, scale_name))
    }

    /// The scale's values and broadcast shape: an initializer, or an Unsqueeze of a 1-D one.
    fn scale(&self, name: &str) -> Option<(Vec<f32>, Vec<i64>)> {
        if let Some(s) = self.init(name) {
            return Some((init_f32(s)?, s.dims.clone()));
        }
        let u = self.node(name).filter(|n| n.op_type == "Unsqueeze")?;
        let s = self.init(input(u, 0)?)?;
        if s.dims.len() != 1 {
            return None;
        }
        let axes = match u.input.get(1) {
            Some(a) => init_i64(self.init(a)?)?,
            None => attr(u, "axes")?.ints.clone(),
        };
        let dims = match axes.as_slice() {
            [-1] | [1] => vec![s.dims[0], 1],
            [0] | [-2] => vec![1, s.dims[0]],
            _ => return None,
        };
        Some((init_f32(s)?, dims))
    }
}
