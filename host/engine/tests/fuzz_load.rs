//! Fuzzing the model loader (issue 16, "Fuzzing"): corrupted ONNX bytes (cut short, bytes flipped,
//! random garbage, and the tiny test model mutated node by node) load as an error or as a model;
//! a model that does load runs a step (the session turns engine panics into errors itself).
//!
//! No panic of this crate's own code (the graph rewrites, our ops) may escape a load: that fails
//! the test. Panics inside tract's ONNX front end on malformed graphs are listed but not failed
//! here: `slm_wasi_nn::load_bytes` turns them into errors (its tests/fuzz_load.rs fails on any).
//!
//! Deterministic: every test draws its cases from a fixed seed. A failure lists each case that
//! panicked: the test, the case number, the mutation, and where it panicked.
//! (There is no GGUF reader in the engine: scripts/slmconv converts GGUF files to ONNX.)

mod fuzz_common;

use std::sync::Arc;
use std::time::Instant;

use prost::Message;
use slm_engine::names::{INPUT_IDS, POSITION_IDS};
use slm_engine::{EngineError, Model, Session, Tensor};
use tract_onnx::pb;

use fuzz_common::{cuts, flip, garbage, ours, raw_data_ranges, tiny_bytes, Rng, Tally, LAYOUTS};

/// Whether `bytes` loaded. A load failure must be a load error; a loaded model runs one stateful
/// step, whose result may be an error.
fn load_and_step(bytes: &[u8]) -> bool {
    match Model::from_bytes(bytes) {
        Err(EngineError::Load { message, .. }) => {
            assert!(!message.is_empty(), "a load error says why");
            false
        }
        Err(e) => panic!("a model that does not load is a load error, got {e:?}"),
        Ok(model) => {
            let mut s = Session::new(Arc::new(model));
            let _ = s.run(vec![
                (INPUT_IDS.into(), Tensor::from_i64(vec![1, 2], &[1, 2])),
                (POSITION_IDS.into(), Tensor::from_i64(vec![1, 2], &[0, 1])),
            ]);
            true
        }
    }
}

#[test]
fn truncated_models_are_load_errors() {
    let started = Instant::now();
    let mut rng = Rng(0x7275_6e63);
    let mut tally = Tally::new();
    for file in LAYOUTS {
        let bytes = tiny_bytes(file);
        let len = bytes.len();
        for cut in cuts(&mut rng, len, 80) {
            tally.run(
                || format!("{file} cut to {cut} of {len} bytes"),
                || load_and_step(&bytes[..cut]),
            );
        }
    }
    assert_eq!(tally.ok, 0, "a model cut short does not load");
    tally.check("truncated", started, ours);
}

#[test]
fn random_garbage_is_a_load_error() {
    let started = Instant::now();
    let mut rng = Rng(0x6761_7262);
    let mut tally = Tally::new();
    for case in 0..400 {
        let bytes = garbage(&mut rng);
        tally.run(
            || format!("garbage case {case}: {bytes:02x?}"),
            || load_and_step(&bytes),
        );
    }
    assert_eq!(tally.ok, 0, "garbage does not load");
    tally.check("garbage", started, ours);
}

#[test]
fn flipped_bytes_load_or_fail_cleanly() {
    let started = Instant::now();
    let mut rng = Rng(0x666c_6970);
    let mut tally = Tally::new();
    for file in LAYOUTS {
        let original = tiny_bytes(file);
        let raw = raw_data_ranges(&original);
        assert!(
            raw.iter().map(|(s, e)| e - s).sum::<usize>() > original.len() / 2,
            "{file}: the weights' raw data was found"
        );
        for case in 0..60 {
            let (bytes, edits) = flip(&mut rng, &original, &raw);
            tally.run(
                || format!("{file} flip case {case}: (offset, old, new) {edits:?}"),
                || load_and_step(&bytes),
            );
        }
    }
    tally.check("flipped", started, ours);
}

/// Values that break arithmetic and indexing: zero, signs, the block size and its neighbours,
/// the ends of the integer types.
const INTERESTING: [i64; 16] = [
    0,
    1,
    -1,
    2,
    3,
    4,
    16,
    31,
    32,
    33,
    1 << 31,
    1 << 32,
    (1 << 62) + 1,
    i64::MAX,
    i64::MIN,
    -(1 << 40),
];

/// The ops our rewrites (attention, int8, Q4_1) look for: mutated more often than the rest.
const REWRITTEN_OPS: [&str; 9] = [
    "MatMul",
    "MatMulNBits",
    "Softmax",
    "Add",
    "Mul",
    "Transpose",
    "Cast",
    "Gather",
    "Unsqueeze",
];

/// A name that some node or input of the graph carries (or a new one).
fn some_name(rng: &mut Rng, g: &pb::GraphProto) -> String {
    match rng.below(5) {
        0 => String::new(),
        1 => format!("no_such_value_{}", rng.below(100)),
        2 if !g.initializer.is_empty() => rng.pick(&g.initializer).name.clone(),
        3 if !g.input.is_empty() => rng.pick(&g.input).name.clone(),
        _ if !g.node.is_empty() => {
            let n = rng.pick(&g.node);
            n.output.first().cloned().unwrap_or_default()
        }
        _ => "x".into(),
    }
}

fn mutate_node(rng: &mut Rng, g: &mut pb::GraphProto) -> String {
    if g.node.is_empty() {
        return "no nodes".into();
    }
    let rewritten: Vec<usize> = (0..g.node.len())
        .filter(|&i| REWRITTEN_OPS.contains(&g.node[i].op_type.as_str()))
        .collect();
    let i = if !rewritten.is_empty() && rng.chance(75) {
        *rng.pick(&rewritten)
    } else {
        rng.below(g.node.len())
    };
    let name = some_name(rng, g);
    let op_types: Vec<String> = g.node.iter().map(|n| n.op_type.clone()).collect();
    let n = &mut g.node[i];
    let what = format!("node {i} ({} {:?})", n.op_type, n.name);
    match rng.below(12) {
        0 if !n.input.is_empty() => {
            let j = rng.below(n.input.len());
            n.input.remove(j);
            format!("{what}: input {j} removed")
        }
        1 => {
            n.input.clear();
            format!("{what}: inputs cleared")
        }
        2 => {
            n.input.push(name.clone());
            format!("{what}: input {name:?} added")
        }
        3 if !n.input.is_empty() => {
            let j = rng.below(n.input.len());
            n.input[j] = name.clone();
            format!("{what}: input {j} is now {name:?}")
        }
        4 => {
            n.output.clear();
            format!("{what}: outputs cleared")
        }
        5 => {
            let op = rng.pick(&op_types).clone();
            n.op_type = op.clone();
            format!("{what}: op is now {op}")
        }
        6 => {
            n.domain = rng.pick(&["", "com.microsoft", "ai.onnx", "x"]).to_string();
            format!("{what}: domain {:?}", n.domain)
        }
        7 if !n.attribute.is_empty() => {
            let j = rng.below(n.attribute.len());
            let a = n.attribute.remove(j);
            format!("{what}: attribute {} removed", a.name)
        }
        8 | 9 if !n.attribute.is_empty() => {
            let j = rng.below(n.attribute.len());
            let a = &mut n.attribute[j];
            match rng.below(5) {
                0 => a.i = *rng.pick(&INTERESTING),
                1 => {
                    let len = rng.below(5);
                    a.ints = (0..len).map(|_| *rng.pick(&INTERESTING)).collect()
                }
                2 => a.f = *rng.pick(&[f32::NAN, f32::INFINITY, -0.0, 0.0, 1e30]),
                3 => a.r#type = rng.below(16) as i32,
                _ => {
                    let len = rng.below(8);
                    a.s = rng.bytes(len)
                }
            }
            format!("{what}: attribute {} is now {a:?}", a.name)
        }
        10 => {
            let node = g.node.remove(i);
            format!("{what}: removed ({} outputs)", node.output.len())
        }
        _ => {
            let j = rng.below(g.node.len());
            g.node.swap(i, j);
            format!("{what}: swapped with node {j}")
        }
    }
}

fn mutate_initializer(rng: &mut Rng, g: &mut pb::GraphProto) -> String {
    if g.initializer.is_empty() {
        return "no initializers".into();
    }
    let i = rng.below(g.initializer.len());
    let t = &mut g.initializer[i];
    let what = format!("initializer {} {:?} type {}", t.name, t.dims, t.data_type);
    match rng.below(10) {
        0 => {
            t.data_type = rng.below(20) as i32;
            format!("{what}: type {}", t.data_type)
        }
        1 if !t.dims.is_empty() => {
            let j = rng.below(t.dims.len());
            t.dims[j] = *rng.pick(&INTERESTING);
            format!("{what}: dims {:?}", t.dims)
        }
        2 => {
            t.dims.push(*rng.pick(&[0, 1, 2, -1]));
            format!("{what}: dims {:?}", t.dims)
        }
        3 => {
            t.dims.pop();
            format!("{what}: dims {:?}", t.dims)
        }
        4 => {
            let keep = rng.below(t.raw_data.len() + 1);
            t.raw_data.truncate(keep);
            format!("{what}: raw data cut to {keep} bytes")
        }
        5 => {
            let more = rng.below(9);
            t.raw_data.extend(rng.bytes(more));
            format!("{what}: {more} raw bytes more")
        }
        6 => {
            t.data_location = Some(1);
            format!("{what}: external")
        }
        7 => {
            g.initializer.remove(i);
            format!("{what}: removed")
        }
        8 => {
            let name = some_name(rng, g);
            g.initializer[i].name = name.clone();
            format!("{what}: renamed {name:?}")
        }
        _ => {
            // The values as float_data / int32_data instead of raw bytes.
            t.float_data = t.raw_data.chunks_exact(4).map(|_| 1.0).collect();
            t.int32_data = vec![1; rng.below(4)];
            t.raw_data.clear();
            format!("{what}: typed data instead of raw")
        }
    }
}

fn mutate_io(rng: &mut Rng, g: &mut pb::GraphProto) -> String {
    use pb::tensor_shape_proto::{dimension, Dimension};
    let inputs = !g.input.is_empty() && (g.output.is_empty() || rng.chance(60));
    let list = if inputs { &mut g.input } else { &mut g.output };
    if list.is_empty() {
        return "no inputs or outputs".into();
    }
    let i = rng.below(list.len());
    let what = format!(
        "graph {} {i} ({})",
        if inputs { "input" } else { "output" },
        list[i].name
    );
    match rng.below(6) {
        0 => {
            list.remove(i);
            format!("{what}: removed")
        }
        1 => {
            let name = rng
                .pick(&[
                    "input_ids",
                    "position_ids",
                    "attention_mask",
                    "logits",
                    "past_key_values.7.key",
                    "past_key_values.4294967296.value",
                    "past_key_values.18446744073709551615.key",
                    "past_key_values..key",
                    "present.99.key",
                    "present.18446744073709551615.value",
                    "",
                ])
                .to_string();
            list[i].name = name.clone();
            format!("{what}: renamed {name:?}")
        }
        2 => {
            let dup = list[i].clone();
            list.push(dup);
            format!("{what}: listed twice")
        }
        _ => {
            let Some(pb::type_proto::Value::TensorType(t)) =
                list[i].r#type.as_mut().and_then(|t| t.value.as_mut())
            else {
                return format!("{what}: untyped");
            };
            if rng.chance(30) {
                t.elem_type = rng.below(20) as i32;
                return format!("{what}: element type {}", t.elem_type);
            }
            let shape = t.shape.get_or_insert_with(Default::default);
            if shape.dim.is_empty() || rng.chance(20) {
                shape.dim.push(Dimension::default());
            }
            let j = rng.below(shape.dim.len());
            shape.dim[j].value = Some(if rng.chance(70) {
                dimension::Value::DimValue(*rng.pick(&INTERESTING))
            } else {
                let param = rng.pick(&["S", "P", "", "1"]);
                dimension::Value::DimParam(param.to_string())
            });
            format!("{what}: dim {j} is now {:?}", shape.dim[j].value)
        }
    }
}

fn mutate_model(rng: &mut Rng, m: &mut pb::ModelProto) -> String {
    match rng.below(4) {
        0 => {
            m.opset_import.clear();
            "opset imports removed".into()
        }
        1 if !m.opset_import.is_empty() => {
            let v = *rng.pick(&[0, 1, 7, 9999, -1, i64::MAX]);
            m.opset_import[0].version = v;
            format!("opset {:?} version {v}", m.opset_import[0].domain)
        }
        2 => {
            m.ir_version = *rng.pick(&INTERESTING);
            format!("ir_version {}", m.ir_version)
        }
        _ => {
            m.graph = None;
            "no graph".into()
        }
    }
}

#[test]
fn mutated_graphs_load_or_fail_cleanly() {
    let started = Instant::now();
    let mut rng = Rng(0x6d75_7461);
    let mut tally = Tally::new();
    for file in LAYOUTS {
        let original = pb::ModelProto::decode(&tiny_bytes(file)[..]).expect(file);
        for case in 0..80 {
            let mut m = original.clone();
            let mut edits = vec![];
            for _ in 0..1 + rng.below(3) {
                let g = m.graph.as_mut();
                let edit = match (rng.below(20), g) {
                    (0, _) => mutate_model(&mut rng, &mut m),
                    (_, None) => "no graph".into(),
                    (1..=9, Some(g)) => mutate_node(&mut rng, g),
                    (10..=15, Some(g)) => mutate_initializer(&mut rng, g),
                    (_, Some(g)) => mutate_io(&mut rng, g),
                };
                edits.push(edit);
            }
            let bytes = m.encode_to_vec();
            tally.run(
                || format!("{file} mutation case {case}: {}", edits.join("; ")),
                || load_and_step(&bytes),
            );
        }
    }
    tally.check("mutated", started, ours);
}

/// Every node our rewrites look at, with its inputs cleared or its last input dropped: the
/// rewrites read a node's inputs by position (regressions: attention.rs and int8.rs indexed
/// `input[0]`/`input[1]` of a matched node and panicked on a node with fewer).
#[test]
fn rewritten_ops_with_missing_inputs_fail_cleanly() {
    let started = Instant::now();
    let mut tally = Tally::new();
    for file in LAYOUTS {
        let original = pb::ModelProto::decode(&tiny_bytes(file)[..]).expect(file);
        let graph = original.graph.as_ref().unwrap();
        for op in REWRITTEN_OPS {
            let nodes: Vec<usize> = (0..graph.node.len())
                .filter(|&i| graph.node[i].op_type == op)
                .take(3)
                .collect();
            for i in nodes {
                for clear in [true, false] {
                    let mut m = original.clone();
                    let node = &mut m.graph.as_mut().unwrap().node[i];
                    if clear {
                        node.input.clear();
                    } else {
                        node.input.pop();
                    }
                    let bytes = m.encode_to_vec();
                    let what = if clear { "cleared" } else { "last dropped" };
                    tally.run(
                        || format!("{file}: node {i} ({op}) inputs {what}"),
                        || load_and_step(&bytes),
                    );
                }
            }
        }
    }
    tally.check("missing inputs", started, ours);
}

/// The int8 weight behind a `Cast` whose values do not match its dims (regression: int8.rs's
/// `init_i8(..).expect("checked int8 initializer")` panicked when they were held as
/// `int32_data` of the wrong length; a negative or overflowing dim is refused too).
#[test]
fn int8_weights_that_do_not_match_their_dims_fail_cleanly() {
    let started = Instant::now();
    let original = pb::ModelProto::decode(&tiny_bytes("model_int8.onnx")[..]).unwrap();
    let graph = original.graph.as_ref().unwrap();
    let int8: Vec<usize> = (0..graph.initializer.len())
        .filter(|&i| graph.initializer[i].data_type == 3 && graph.initializer[i].dims.len() == 2)
        .collect();
    assert!(int8.len() >= 4, "the int8 layout has int8 weights");
    let mut tally = Tally::new();
    for &i in &int8 {
        for edit in 0..4 {
            let mut m = original.clone();
            let t = &mut m.graph.as_mut().unwrap().initializer[i];
            match edit {
                0 => {
                    t.int32_data = vec![1; 3];
                    t.raw_data.clear();
                }
                1 => t.dims[0] = -t.dims[0],
                2 => t.dims = vec![1 << 32, 1 << 32],
                _ => {
                    t.raw_data.pop();
                }
            }
            let bytes = m.encode_to_vec();
            tally.run(
                || format!("int8 initializer {i} edit {edit}"),
                || load_and_step(&bytes),
            );
        }
    }
    tally.check("int8 dims", started, ours);
}

/// A model whose `past_key_values.N.*` input claims a huge layer number (regression: the session
/// sized its KV cache by the largest N, and `past_key_values.4294967296.value` asked for 64 GiB:
/// an allocation failure, which aborts the process). Now a load error.
#[test]
fn absurd_layer_numbers_fail_cleanly() {
    let started = Instant::now();
    let original = pb::ModelProto::decode(&tiny_bytes("model.onnx")[..]).unwrap();
    let mut tally = Tally::new();
    for name in [
        "past_key_values.4294967296.value",
        "past_key_values.18446744073709551615.key",
        "past_key_values.1000000.key",
    ] {
        let mut m = original.clone();
        let g = m.graph.as_mut().unwrap();
        let i = g
            .input
            .iter()
            .position(|i| i.name == "past_key_values.1.value")
            .unwrap();
        let old = std::mem::replace(&mut g.input[i].name, name.to_string());
        // The nodes that read it read the new name.
        for n in g.node.iter_mut() {
            for input in n.input.iter_mut().filter(|x| **x == old) {
                *input = name.to_string();
            }
        }
        let bytes = m.encode_to_vec();
        tally.run(
            || format!("input {old} renamed {name}"),
            || load_and_step(&bytes),
        );
    }
    tally.check("layer numbers", started, ours);
}
