//! End-to-end generation tests of the `slm` binary (complementing cli.rs): stop strings, streaming
//! consistency, the stderr summary, and the tokenizer against llama.cpp's ids.
//! Needs `dist/slm-generator.wasm` (scripts/build), `target/test-models/tiny` and `models/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn slm(models: &str, args: &[&str]) -> Output {
    let component = root().join("dist/slm-generator.wasm");
    assert!(
        component.is_file(),
        "{} is missing: run scripts/build",
        component.display()
    );
    let models = root().join(models);
    assert!(
        models.is_dir(),
        "{} is missing: run scripts/setup / scripts/test",
        models.display()
    );
    Command::new(env!("CARGO_BIN_EXE_slm"))
        .current_dir(root())
        .env("SLM_COMPONENT", component)
        .arg("--models")
        .arg(models)
        .args(args)
        .output()
        .expect("cannot start slm")
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "slm failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("stdout is UTF-8")
}

/// Greedy raw completion on the tiny model; stdout without the final newline.
fn tiny(args: &[&str]) -> String {
    let mut a = vec!["run", "--quiet", "--raw", "--model", "tiny"];
    a.extend_from_slice(args);
    let out = ok(slm("target/test-models", &a));
    out.strip_suffix('\n')
        .expect("output ends with a newline")
        .to_string()
}

#[test]
fn stop_string_cuts_output() {
    let prompt = "It was a dark and stormy night";
    let full = tiny(&["--max-tokens", "24", prompt]);
    let words: Vec<&str> = full.split_whitespace().collect();
    assert!(
        words.len() >= 2,
        "too little output to pick a stop string: {full:?}"
    );
    let stop = words[1];
    let cut = &full[..full.find(stop).unwrap()];
    let out = tiny(&["--max-tokens", "24", "--stop", stop, prompt]);
    assert_eq!(out, cut, "stop {stop:?} in {full:?}");
    // Several stop strings: the earliest match wins.
    let out2 = tiny(&[
        "--max-tokens",
        "24",
        "--stop",
        "zzzz-never",
        "--stop",
        stop,
        prompt,
    ]);
    assert_eq!(out2, cut);
}

#[test]
fn streamed_output_of_a_shorter_run_is_a_prefix() {
    let short = tiny(&["--max-tokens", "6", "In a small village"]);
    let long = tiny(&["--max-tokens", "16", "In a small village"]);
    assert!(
        long.starts_with(&short),
        "{short:?} is not a prefix of {long:?}"
    );
    assert!(long.len() > short.len());
}

#[test]
fn summary_goes_to_stderr_and_counts_tokens() {
    let o = slm(
        "target/test-models",
        &["run", "--raw", "--max-tokens", "5", "Hello"],
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let out = ok(o);
    assert_eq!(err.lines().count(), 1, "{err}");
    for want in [
        "completion 5 tokens",
        "time to first token",
        "tokens/s",
        "finish length",
    ] {
        assert!(err.contains(want), "{want:?} missing from {err}");
    }
    assert!(!out.contains("time to first token"));
}

#[test]
fn tokenize_matches_llama_cpp_fixture() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/tokenizer_llamacpp.json")).unwrap(),
    )
    .unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 4);
    for case in cases.iter().take(10) {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let out = ok(slm("models", &["tokenize", "--", text]));
        let got: Vec<u32> = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(got, want, "tokenize {text:?}");
    }
}

/// `slm chat` on `turns` (one per line), greedy; (stdout, cached tokens of each turn).
fn chat(models: &str, model: &str, extra: &[&str], turns: &str) -> (String, Vec<u32>) {
    let component = root().join("dist/slm-generator.wasm");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_slm"));
    cmd.current_dir(root())
        .env("SLM_COMPONENT", component)
        .env_remove("SLM_PREFIX_CACHE_MB")
        .arg("--models")
        .arg(root().join(models))
        .args(extra)
        .args([
            "chat",
            "--model",
            model,
            "--max-tokens",
            "12",
            "--system",
            "You are a terse assistant who answers in one short sentence.",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("cannot start slm");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(turns.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let cached = err
        .lines()
        .filter_map(|l| l.split(" cached)").next()?.rsplit('(').next()?.parse().ok())
        .collect();
    (ok(o), cached)
}

/// `slm chat` on `turns` with the prefix cache off, then on, which must give the same output:
/// (that output, cached tokens of each turn without the cache, with it).
fn chat_without_and_with_the_cache(
    models: &str,
    model: &str,
    turns: &str,
) -> (String, Vec<u32>, Vec<u32>) {
    let (plain, none) = chat(models, model, &["--prefix-cache-mb", "0"], turns);
    let (cached, hits) = chat(models, model, &[], turns);
    assert_eq!(plain, cached, "the prefix cache changed greedy output");
    (plain, none, hits)
}

#[test]
fn prefix_cache_reuses_earlier_turns_and_changes_nothing() {
    let turns = "Name a color.\nName another one.\nAnd a third?\n";
    let (_, none, hits) = chat_without_and_with_the_cache("target/test-models", "tiny", turns);
    assert_eq!(none, vec![0, 0, 0]);
    assert_eq!(hits.len(), 3);
    assert_eq!(hits[0], 0);
    // Later turns start with the earlier ones (system prompt, question, answer).
    assert!(
        hits[1] > 20 && hits[2] > hits[1],
        "cached tokens per turn: {hits:?}"
    );
}

#[test]
fn prefix_cache_on_the_real_model_gives_the_same_answers() {
    let turns = "What is the capital of France?\nAnd of Italy?\n";
    let (plain, _, hits) =
        chat_without_and_with_the_cache("models", "smollm2-135m-instruct", turns);
    assert!(plain.contains("Paris"), "{plain}");
    assert!(hits[1] > 30, "{hits:?}");
}
