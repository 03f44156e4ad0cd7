"""Same input, same output, on every build: the engine's logits are equal bit for bit natively
(this CPU's kernels: AVX2 here, AVX-512 VNNI where the CPU has it), at 1 and 2 threads, and in
wasm32 with simd128 under wasmtime, over a prefill and 64 greedy steps.

The probe is `slm logits` (a prefill, then greedy steps straight on the engine, every step's
logits written to a file); `slm logits --portable` runs the same steps on dist/slm-nn.wasm, the
in-wasm wasi:nn the portable components carry, through its wasi:nn exports. The files must be
identical. Models: the default SmolLM2 Q4_1 and its int8, f32 and q4 layouts, and tiny GGUF files converted by
`slm convert` that cover each architecture (llama, qwen2, phi3, gemma3 with its GELU and sliding
windows) and the block formats (Q4_0, Q4_1, Q4_K, Q6_K, Q8_0, and Q2_K/Q3_K/Q5_K/F16/BF16/F32 in
`llama-k_mix`).

The greedy texts of the hosts built on these (slm serve, --portable, wasmtime serve, jco, the
browser) are compared in test_portable.py.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import ROOT
from model_variants import variant_path

STEPS = 64
SLM = ROOT / "target" / "release" / "slm"
DEFAULT_MODEL = "smollm2-135m-instruct"
# Every architecture and block format, and float matrices (llama-k_mix's F16/BF16/F32, the qwen2
# and phi3 files' untied F32 heads).
TINY_GGUFS = ["llama-q4_1", "llama-q4_k_m", "llama-k_mix", "qwen2-q4_0", "phi3-q4_1", "gemma3-q8_0"]


# The default model's prompt is long enough that its decode steps attend over more keys than
# SPLIT_MIN_KEYS (ops/attention.rs), where 2 threads split each KV head's block inside.
LONG_PROMPT = 1100


def prompt(model_dir: pathlib.Path, tokens: int = 23) -> list[int]:
    return [(7 + 37 * i) % vocab_of(model_dir) for i in range(tokens)]


def vocab_of(model_dir: pathlib.Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def logits_everywhere(models: pathlib.Path, name: str, out: pathlib.Path,
                      tokens: int = 23) -> dict[str, bytes]:
    """`slm logits`' file for model `name` of `models` natively at 1 and 2 threads, and in wasm,
    after a prompt of `tokens` tokens."""
    assert SLM.is_file(), "run scripts/setup (builds target/release/slm)"
    ids = json.dumps(prompt(models / name, tokens))
    files = {}
    for label, flags in [("native, 1 thread", ["--threads", "1"]), ("native, 2 threads", ["--threads", "2"]),
                         ("wasm32 simd128 (slm-nn.wasm)", ["--portable"])]:
        f = out / f"{len(files)}.bin"
        r = subprocess.run([str(SLM), "--models", str(models), "--device", "cpu", "-q", "logits", "--model", name,
                            "--ids", ids, "--steps", str(STEPS), "--runs", "1", "--out", str(f), *flags],
                           cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["rewind_max_abs_diff"] == 0, report  # the KV-cache rewind, on this build too
        files[label] = f.read_bytes()
    return files


def assert_identical(files: dict[str, bytes], vocab: int) -> None:
    import numpy as np

    reference_name, reference = next(iter(files.items()))
    rows = np.frombuffer(reference, dtype="<f4").reshape(STEPS + 1, vocab)
    assert np.isfinite(rows).all() and rows.std() > 0, "the logits are degenerate"
    for name, data in files.items():
        if data != reference:
            other = np.frombuffer(data, dtype="<f4").reshape(STEPS + 1, vocab)
            differ = np.nonzero((other != rows).any(axis=1))[0]
            pytest.fail(f"{name} differs from {reference_name} from step {differ[0]} on "
                        f"(max |diff| {np.abs(other - rows).max():.3g})")


def test_default_model_same_logits_on_every_build(model_dir, tmp_path):
    assert model_dir.name == DEFAULT_MODEL
    files = logits_everywhere(model_dir.parent, DEFAULT_MODEL, tmp_path, LONG_PROMPT)
    assert_identical(files, vocab_of(model_dir))


@pytest.mark.parametrize("layout", ["model_int8.onnx", "model_f32.onnx", "model_q4.onnx"])
def test_other_layouts_same_logits_on_every_build(model_dir, layout, tmp_path):
    """The default model's other layouts (int8 and f32 weights with f32 activations, 4-bit
    blocks with f32 scales) live apart from their JSON files: a models directory of its own holds
    each with them."""
    variant = variant_path(model_dir, layout)
    assert variant.is_file(), f"{variant} missing: run scripts/setup"
    here = tmp_path / "models" / "layout"
    here.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.suffix == ".json":
            (here / f.name).write_bytes(f.read_bytes())
    try:
        os.link(variant, here / "model.onnx")
    except OSError:  # another filesystem
        (here / "model.onnx").symlink_to(variant)
    assert_identical(logits_everywhere(here.parent, "layout", tmp_path), vocab_of(model_dir))


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("tiny-gguf")
    subprocess.run([sys.executable, str(ROOT / "host" / "gguf" / "tests" / "tiny_models.py"), str(out)],
                   check=True, timeout=600)
    return out


@pytest.mark.parametrize("name", TINY_GGUFS)
def test_tiny_ggufs_same_logits_on_every_build(tiny_ggufs, name, tmp_path):
    assert SLM.is_file(), "run scripts/setup (builds target/release/slm)"
    models = tmp_path / "models"
    subprocess.run([str(SLM), "convert", str(tiny_ggufs / f"{name}.gguf"), "-o", str(models / name)],
                   check=True, timeout=600, capture_output=True)
    assert_identical(logits_everywhere(models, name, tmp_path), vocab_of(models / name))
