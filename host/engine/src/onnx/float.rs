//! The float rewrite: a `MatMul(x, W)` whose weight is a 2-D f32 initializer held in the file
//! (`[K, N]`, or a `Transpose` of `[N, K]` as a tied LM head is) becomes an `SlmQMatMul(x)` on
//! [`F32Weights`], which sum every output in one order on every target (tract's own f32 matmul
//! gives each build other bits, and greedy texts part). A `Gather` of rows from a rewritten
//! `[N, K]` table (the tied embedding) becomes an `SlmQGather` on the same weights: the table is
//! held once. Runs after the int8 and 4-bit rewrites, which take the quantized weights.

use std::collections::HashMap;
use std::sync::Arc;

use tract_onnx::pb;

use super::graph::{
    attr, external, init_f32, init_positions, input, numel, producers, remove_dead_nodes,
    set_weights_op, FLOAT,
};
use crate::kernels::float::F32Weights;
use crate::kernels::int8::Layout;
use crate::ops::{self, Packed};

/// A float weight behind one or more MatMuls.
struct Found {
    init: String,
    layout: Layout,
    k: usize,
    n: usize,
}

pub(crate) fn rewrite(graph: &mut pb::GraphProto, weights: &mut HashMap<String, Packed>) {
    let inits = init_positions(graph);
    let producer = producers(graph);
    // Weight key by (initializer, layout): MatMuls that read the same weight share it.
    let mut keys: HashMap<(String, Layout), String> = HashMap::new();
    let mut found: Vec<(String, Found)> = vec![];
    let mut matmuls: Vec<(usize, String)> = vec![];
    for (i, node) in graph.node.iter().enumerate() {
        if node.op_type != "MatMul" || !node.domain.is_empty() || node.input.len() != 2 {
            continue;
        }
        let b = node.input[1].as_str();
        let transpose = producer
            .get(b)
            .map(|&p| &graph.node[p])
            .filter(|t| t.op_type == "Transpose");
        let (name, layout) = match transpose {
            Some(t) => {
                let perm = attr(t, "perm").map(|a| a.ints.clone());
                if !(perm.is_none() || perm == Some(vec![1, 0])) {
                    continue;
                }
                let Some(name) = input(t, 0) else { continue };
                (name, Layout::NK)
            }
            None => (b, Layout::KN),
        };
        let Some(t) = inits.get(name).map(|&i| &graph.initializer[i]) else {
            continue;
        };
        if !held_f32_matrix(t) {
            continue;
        }
        let (rows, cols) = (t.dims[0] as usize, t.dims[1] as usize);
        let (k, n) = match layout {
            Layout::KN => (rows, cols),
            Layout::NK => (cols, rows),
        };
        let key = keys
            .entry((name.to_string(), layout))
            .or_insert_with(|| {
                let key = format!("{name}#f32#{}", found.len());
                found.push((
                    key.clone(),
                    Found {
                        init: name.to_string(),
                        layout,
                        k,
                        n,
                    },
                ));
                key
            })
            .clone();
        matmuls.push((i, key));
    }
    if matmuls.is_empty() {
        return;
    }
    for (i, key) in &matmuls {
        set_weights_op(&mut graph.node[*i], ops::QMATMUL, 0, key);
    }
    // Rows of a tied table: read from the packed weight.
    let tables: HashMap<&str, &str> = found
        .iter()
        .filter(|(_, f)| f.layout == Layout::NK)
        .map(|(key, f)| (f.init.as_str(), key.as_str()))
        .collect();
    let mut gathers = vec![];
    for (i, node) in graph.node.iter().enumerate() {
        let axis = attr(node, "axis").map(|a| a.i).unwrap_or(0);
        if node.op_type == "Gather" && node.domain.is_empty() && node.input.len() == 2 && axis == 0
        {
            if let Some(key) = tables.get(node.input[0].as_str()) {
                gathers.push((i, key.to_string()));
            }
        }
    }
    for (i, key) in gathers {
        set_weights_op(&mut graph.node[i], ops::QGATHER, 1, &key);
    }
    let used = remove_dead_nodes(graph);
    let inits = init_positions(graph);
    for (key, f) in found {
        let t = &mut graph.initializer[inits[&f.init]];
        // An initializer nothing reads any more gives up its bytes rather than being copied.
        let values = if !used.contains(&f.init) && !t.raw_data.is_empty() {
            let raw = std::mem::take(&mut t.raw_data);
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        } else {
            init_f32(t).expect("checked f32 initializer")
        };
        let w = F32Weights::new(f.k, f.n, f.layout, values).expect("checked shape");
        weights.insert(key, Packed::F32(Arc::new(w)));
    }
    graph.initializer.retain(|t| used.contains(&t.name));
}

/// A 2-D f32 initializer whose values are all in the file.
fn held_f32_matrix(t: &pb::TensorProto) -> bool {
    if t.data_type != FLOAT || t.dims.len() != 2 || t.dims.iter().any(|&d| d <= 0) || external(t) {
        return false;
    }
    let Some(len) = numel(t) else { return false };
    if t.raw_data.is_empty() {
        t.float_data.len() == len
    } else {
        t.raw_data.len() == len * 4
    }
}
