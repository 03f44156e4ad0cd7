//! `--device` of the `slm` binary on whatever machine runs the tests: without a usable GPU (or in a
//! build without the `gpu` feature) `--device gpu` fails with one line naming what is missing and
//! `auto` runs on the CPU with the CPU's output. With a GPU the GPU-specific assertions are
//! skipped here; scripts/gpu-check covers that machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn slm() -> Command {
    let component = root().join("dist/slm-generator.wasm");
    assert!(
        component.is_file(),
        "{} missing: run scripts/build",
        component.display()
    );
    let models = root().join("target/test-models");
    assert!(
        models.join("tiny/model.onnx").is_file(),
        "tiny test model missing (scripts/test writes it)"
    );
    let mut c = Command::new(env!("CARGO_BIN_EXE_slm"));
    c.current_dir(root())
        .env_remove("SLM_MODELS")
        .env_remove("SLM_DEVICE")
        .env_remove("RUST_LOG")
        .env_remove("SLM_LOG")
        .env("SLM_CACHE_DIR", root().join("target/slm-test-cache"))
        .env("SLM_COMPONENT", component)
        .arg("--models")
        .arg(models)
        .stdin(Stdio::null());
    c
}

fn run(args: &[&str]) -> Output {
    slm().args(args).output().expect("run the slm binary")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Greedy raw completion on the tiny model with `--device DEVICE`: (stdout, stderr).
fn tiny(device: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec!["--device", device];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "run",
        "--model",
        "tiny",
        "--raw",
        "--max-tokens",
        "16",
        "Once upon a time",
    ]);
    let o = run(&args);
    assert!(
        o.status.success(),
        "slm --device {device} failed: {}",
        stderr(&o)
    );
    (String::from_utf8_lossy(&o.stdout).into_owned(), stderr(&o))
}

/// A short greedy `slm run` on the tiny model.
const RUN_TINY: [&str; 7] = [
    "run",
    "--model",
    "tiny",
    "--raw",
    "--max-tokens",
    "4",
    "Hello",
];

fn gpu_in_use(err: &str) -> bool {
    err.lines().any(|l| l.starts_with("device: GPU"))
}

#[test]
fn device_gpu_without_a_gpu_fails_with_one_line_naming_what_is_missing() {
    let o = run(&[&["--device", "gpu"][..], &RUN_TINY].concat());
    let err = stderr(&o);
    if o.status.success() && gpu_in_use(&err) {
        return; // a machine with a GPU and a gpu build: scripts/gpu-check
    }
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(o.stdout.is_empty(), "nothing generated");
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    let line = err.lines().next().unwrap();
    assert!(line.starts_with("error: --device gpu: "), "{line}");
    // A build without the feature says so and how to build one; a gpu build names the missing
    // piece (libcuda / a CUDA library / a device).
    assert!(
        line.contains("built without GPU support") && line.contains("--features gpu")
            || line.contains("not found")
            || line.contains("CUDA"),
        "{line}"
    );
    // The same through the environment.
    let o = slm()
        .env("SLM_DEVICE", "gpu")
        .args(RUN_TINY)
        .output()
        .unwrap();
    assert_eq!(stderr(&o), err);
}

#[test]
fn device_auto_without_a_gpu_gives_the_cpu_output() {
    let (cpu, cpu_err) = tiny("cpu", &[]);
    let (auto, auto_err) = tiny("auto", &[]);
    assert!(!gpu_in_use(&cpu_err), "{cpu_err}");
    if gpu_in_use(&auto_err) {
        return; // auto picked a GPU: scripts/gpu-check compares it with the CPU
    }
    assert!(!cpu.trim().is_empty());
    assert_eq!(auto, cpu, "auto (on the CPU) and cpu differ");
    // The default is auto; it says nothing about the device unless asked (-v).
    let (default, default_err) = tiny("auto", &["-q"]);
    assert_eq!(default, cpu);
    assert!(default_err.is_empty(), "{default_err}");
    let (_, verbose) = tiny("auto", &["-v"]);
    assert!(
        verbose.contains("device: CPU (--device auto; no GPU: "),
        "{verbose}"
    );
}

#[test]
fn bad_device_and_commands_without_a_model_run() {
    let o = run(&["--device", "tpu", "models"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--device"), "{err}");
    // tokenize and models need no model run, hence no GPU.
    let o = run(&["--device", "gpu", "tokenize", "--model", "tiny", "Hello"]);
    assert!(o.status.success(), "{}", stderr(&o));
}
