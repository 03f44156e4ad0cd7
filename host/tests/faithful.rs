//! Converted GGUFs compute what llama.cpp computes on the same file: tiny random models of each
//! architecture that converts (host/gguf/tests/tiny_models.py), run by `slm logits` (the engine
//! alone) on the prompt and greedy tokens of tests/fixtures/tiny_llamacpp_logits.json, which
//! llama.cpp wrote (scripts/llamacpp_reference.py logits). Every step's logits must point the same
//! way as llama.cpp's (cosine similarity) and pick the same token.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let x = x as f64;
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

fn argmax<T: PartialOrd + Copy>(v: &[T]) -> usize {
    (0..v.len())
        .reduce(|best, i| if v[i] > v[best] { i } else { best })
        .unwrap()
}

fn fixture() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/tiny_llamacpp_logits.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn tiny_models_follow_llama_cpp() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("faithful");
    let _ = std::fs::remove_dir_all(&tmp);
    let status = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("host/gguf/tests/tiny_models.py"))
        .arg(tmp.join("all"))
        .status()
        .expect("run .venv/bin/python (scripts/setup makes it)");
    assert!(status.success());
    let fixture = fixture();
    let models = tmp.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let reference = fixture["models"].as_object().unwrap();
    assert!(reference.len() >= 3, "{:?}", reference.keys());
    for name in reference.keys() {
        let file = format!("{name}.gguf");
        std::fs::copy(tmp.join("all").join(&file), models.join(&file)).unwrap();
    }
    let names: Vec<&str> = reference.keys().map(String::as_str).collect();
    follows_llama_cpp(&fixture, &models, &names, &tmp);
}

/// ONNX exports made by others: Optimum's `text-generation-with-past` (f32, standard
/// `past_key_values`, a causal mask built from `attention_mask`) of the tiny llama, qwen2,
/// phi3 and gemma3 files, made by transformers (which reads the GGUF) and optimum-onnx
/// (tests/fixtures/optimum/README.md says how). They load (tract could not analyse their mask
/// with a symbolic batch) and compute what llama.cpp computes on the GGUF they came from.
#[test]
fn optimum_exports_follow_llama_cpp() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("faithful-optimum");
    let _ = std::fs::remove_dir_all(&tmp);
    let exports = root().join("tests/fixtures/optimum");
    let mut names: Vec<String> = std::fs::read_dir(&exports)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            e.path()
                .join("model.onnx")
                .is_file()
                .then(|| e.file_name().into_string().unwrap())
        })
        .collect();
    names.sort();
    assert!(names.len() >= 4, "{names:?}");
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    follows_llama_cpp(&fixture(), &exports, &names, &tmp);
}

/// Runs each model `names` of `models` by `slm logits` on the fixture's prompt and llama.cpp's
/// greedy tokens (teacher-forced) and compares every step's logits with llama.cpp's: on the
/// default engine, and on the GPU plan's graph run by the CPU (`--plain`: the plain tract-onnx
/// parse with f32 weights that tract-cuda is given, so every architecture's graph reaches a GPU
/// in a form tract can type).
fn follows_llama_cpp(fixture: &Value, models: &Path, names: &[&str], tmp: &Path) {
    // Rounding differs (our 8-bit activations and int8 embedding rows, llama.cpp's Q8_0
    // activations), so a close call between two tokens may go either way: the top tokens must
    // agree where llama.cpp's leads its runner-up by 2% of its logits' range. A wrong graph (a
    // missing bias, unpermuted RoPE rows) drops the similarity far below the bound (0.92-0.98).
    let mut report = Vec::new();
    let mut failures = Vec::new();
    std::fs::create_dir_all(tmp).unwrap();
    let engines: [(&str, &[&str]); 2] = [("", &[]), (" (GPU plan on the CPU)", &["--plain"])];
    for (&name, (engine, flags)) in names
        .iter()
        .flat_map(|n| engines.iter().map(move |e| (n, e)))
    {
        let want = &fixture["models"][name];
        assert!(want.is_object(), "no llama.cpp logits for {name}");
        let tokens = want["tokens"].to_string();
        let out = tmp.join(format!("{name}{}.logits", flags.concat()));
        let run = Command::new(env!("CARGO_BIN_EXE_slm"))
            .env("SLM_CACHE_DIR", tmp.join("cache"))
            .args(["--threads", "1", "--models"])
            .arg(models)
            .args(["logits", "--runs", "1", "--model", name])
            .args(flags.iter())
            .args(["--ids", &fixture["prompt"].to_string()])
            .args([
                "--steps",
                &want["tokens"].as_array().unwrap().len().to_string(),
            ])
            .args(["--follow", &tokens, "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{name}{engine}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let ours: Vec<f32> = std::fs::read(&out)
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let rows = want["logits"].as_array().unwrap();
        let vocab = ours.len() / rows.len();
        assert_eq!(vocab * rows.len(), ours.len());
        for (step, row) in rows.iter().enumerate() {
            let theirs: Vec<f64> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let ours = &ours[step * vocab..(step + 1) * vocab];
            let similarity = cosine(ours, &theirs);
            let same = argmax(ours) == argmax(&theirs);
            let mut sorted = theirs.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let clear = sorted[0] - sorted[1] >= 0.02 * (sorted[0] - sorted[sorted.len() - 1]);
            report.push(format!(
                "{name}{engine} step {step}: cosine {similarity:.5}, same top token: {same} (a clear \
                 choice: {clear})"
            ));
            if similarity < 0.998 || (clear && !same) {
                failures.push(format!(
                    "{name}{engine} step {step}: cosine {similarity}, top token {} (ours) and {} (llama.cpp)",
                    argmax(ours),
                    argmax(&theirs)
                ));
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{failures:?}");
}

/// llama.cpp's greedy continuation of "The capital of France is" on Gemma 3 270M Q4_K_M
/// (llama-cpp-python 0.3.36, f32 KV cache), to its 11th token.
const GEMMA3_LLAMA_CPP: &str = " the capital of the country of France. It is the";

/// The real second model, converted from its Q4_K_M file (Q4_K, Q5_0, Q6_K and Q8_0 blocks, a
/// Q8_0 table, sliding-window layers): its greedy continuation of a raw prompt follows
/// llama.cpp's, token for token, to the 11th. (Issue 14's wider measure, next-token agreement
/// over 500 tokens and 10 greedy continuations, is `scripts/llamacpp_reference.py engine`.)
#[test]
fn gemma3_270m_continues_as_llama_cpp() {
    let fetched = Command::new(root().join("scripts/fetch-gemma"))
        .output()
        .expect("run scripts/fetch-gemma");
    assert!(fetched.status.success(), "{fetched:?}");
    let gguf = String::from_utf8(fetched.stdout).unwrap();
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("faithful-gemma3");
    let run = Command::new(env!("CARGO_BIN_EXE_slm"))
        .current_dir(root())
        .env("SLM_CACHE_DIR", tmp.join("cache"))
        .args([
            "-q",
            "--threads",
            "2",
            "run",
            "--raw",
            "--max-tokens",
            "11",
            "--model",
        ])
        .arg(gguf.trim())
        .arg("The capital of France is")
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    let text = String::from_utf8(run.stdout).unwrap();
    assert_eq!(text.trim_end_matches('\n'), GEMMA3_LLAMA_CPP);
}
