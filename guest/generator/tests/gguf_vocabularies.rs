//! SentencePiece vocabularies from GGUF files (rebuilt as BPE by the host's converter) tokenize in
//! the generator as llama.cpp tokenizes them, and as the `tokenizers` library's own BPE does:
//! Gemma 3 270M's 262k tokens (fetched by scripts/fetch-gemma) and a tiny Llama-2-style one
//! with a space prefix and byte fallback (host/gguf/tests/tiny_models.py).

use std::path::{Path, PathBuf};
use std::process::Command;

use generator::tokenizer::Tokenizer;
use serde_json::Value;
use slm_gguf::{Gguf, Vocabulary};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn stdout_of(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// tokenizer.json of `gguf`, as the converter writes it.
fn tokenizer_json(gguf: &Path) -> Vec<u8> {
    let file = Gguf::open(gguf).unwrap();
    let vocabulary = Vocabulary::read(&file).unwrap();
    serde_json::to_vec(&vocabulary.tokenizer_json().unwrap()).unwrap()
}

/// Every case of the llama.cpp fixture encodes to its ids; the fixture's texts and the held-out
/// text encode as the library's BPE encodes them.
fn tokenizes_as_llama_cpp_and_the_library(json: Vec<u8>, fixture: &str) {
    let library = tokenizers::Tokenizer::from_bytes(&json).unwrap();
    let ours = Tokenizer::from_bytes(json).unwrap();
    assert!(ours.is_lean_bpe());
    let text = std::fs::read_to_string(root().join("tests/fixtures").join(fixture)).unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ours.encode(text).unwrap(), ids, "{text:?}");
    }
    let heldout = std::fs::read_to_string(root().join("tests/fixtures/heldout.txt")).unwrap();
    for text in [
        heldout.as_str(),
        &heldout.to_uppercase(),
        &heldout.replace(' ', "  "),
    ] {
        let theirs = library.encode(text, false).unwrap();
        assert_eq!(ours.encode(text).unwrap(), theirs.get_ids());
    }
}

#[test]
fn gemma3_tokenizes_as_llama_cpp() {
    let gguf = stdout_of(&mut Command::new(root().join("scripts/fetch-gemma")));
    tokenizes_as_llama_cpp_and_the_library(
        tokenizer_json(Path::new(gguf.trim())),
        "tokenizer_gemma3_llamacpp.json",
    );
}

#[test]
fn a_sentencepiece_vocabulary_with_a_space_prefix_tokenizes_as_llama_cpp() {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tiny-gguf");
    stdout_of(
        Command::new(root().join(".venv/bin/python"))
            .arg(root().join("host/gguf/tests/tiny_models.py"))
            .arg(&out),
    );
    tokenizes_as_llama_cpp_and_the_library(
        tokenizer_json(&out.join("llama-spm.gguf")),
        "tokenizer_tiny_spm_llamacpp.json",
    );
}
