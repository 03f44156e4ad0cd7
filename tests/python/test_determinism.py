"""Same input, same output, on every build: the engine's logits are equal bit for bit natively
(this CPU's kernels: AVX2 here, AVX-512 VNNI where the CPU has it), at 1 and 2 threads, and in
wasm32 with simd128 under wasmtime, over a prefill and 64 greedy steps.

The probe is the engine's `greedy_logits` example (host/engine/examples), built natively and for
wasm32-wasip2; each run writes every step's logits, and the files must be identical. Models: the
default SmolLM2 Q4_1 and its int8 layout, and tiny GGUF files converted by `slm convert` that
cover each architecture (llama, qwen2, phi3, gemma3 with its GELU and sliding windows) and the
block formats (Q4_0, Q4_1, Q4_K, Q6_K, Q8_0, and Q2_K/Q3_K/Q5_K/F16/BF16/F32 in `llama-k_mix`).
Files with float matrices are expected to differ (FLOAT_MATRICES, below).

The greedy texts of the hosts built on these (slm serve, --portable, wasmtime serve, jco, the
browser) are compared in test_portable.py.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from conftest import ROOT
from model_variants import variant_path

STEPS = 64
WASMTIME = next((ROOT / ".venv" / "lib").glob("python3*/site-packages/wasmtime_cli/wasmtime"))
SLM = ROOT / "target" / "release" / "slm"
# Float matrices (F16, BF16, F32: llama-k_mix's, and the tiny qwen2 and phi3 files' untied F32
# heads) still go through tract's f32 matmul, whose kernels add in another order (and fuse
# multiply-adds) natively than in wasm: a known gap until they run on a kernel of ours. Strict:
# an unexpected pass fails, so this list stays true.
FLOAT_MATRICES = pytest.mark.xfail(strict=True, reason="float matrices run on tract's f32 matmul, which differs by target")
TINY_GGUFS = ["llama-q4_1", "llama-q4_k_m", "gemma3-q8_0",
              pytest.param("llama-k_mix", marks=FLOAT_MATRICES),
              pytest.param("qwen2-q4_0", marks=FLOAT_MATRICES),
              pytest.param("phi3-q4_1", marks=FLOAT_MATRICES)]


def cargo(*args: str) -> None:
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "slm-engine", "--example", "greedy_logits", *args],
                   cwd=ROOT, check=True, timeout=1800)


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> dict:
    """The native probe, and the wasm probe compiled ahead by wasmtime (once, not per run)."""
    cargo()
    cargo("--target", "wasm32-wasip2", "--no-default-features")
    wasm = ROOT / "target" / "wasm32-wasip2" / "release" / "examples" / "greedy_logits.wasm"
    cwasm = tmp_path_factory.mktemp("probe") / "greedy_logits.cwasm"
    subprocess.run([str(WASMTIME), "compile", "-o", str(cwasm), str(wasm)], check=True, timeout=900)
    return {"native": ROOT / "target" / "release" / "examples" / "greedy_logits", "wasm": cwasm}


def prompt(model_dir: pathlib.Path) -> list[int]:
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    return [(7 + 37 * i) % vocab for i in range(23)]


def logits_everywhere(probes: dict, model: pathlib.Path, out: pathlib.Path) -> dict[str, bytes]:
    """The probe's logits file for `model` (a model.onnx) natively at 1 and 2 threads and in wasm."""
    ids = [str(i) for i in prompt(model.parent)]
    files = {}
    for threads in (1, 2):
        f = out / f"native-{threads}.bin"
        subprocess.run([str(probes["native"]), str(model), str(f), str(STEPS), str(threads), *ids],
                       check=True, timeout=600)
        files[f"native, {threads} thread(s)"] = f.read_bytes()
    f = out / "wasm.bin"
    subprocess.run([str(WASMTIME), "run", "--allow-precompiled", "--dir", f"{model.parent}::/model",
                    "--dir", f"{out}::/out", str(probes["wasm"]), f"/model/{model.name}", f"/out/{f.name}",
                    str(STEPS), "1", *ids], check=True, timeout=900)
    files["wasm32 simd128"] = f.read_bytes()
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


def vocab_of(model_dir: pathlib.Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


@pytest.mark.parametrize("layout", ["model.onnx", "model_int8.onnx"])
def test_default_model_same_logits_on_every_build(probes, model_dir, layout, tmp_path):
    model = model_dir / layout if layout == "model.onnx" else variant_path(model_dir, layout)
    assert model.is_file(), f"{model} missing: run scripts/setup"
    if model.parent != model_dir:  # the variant lives apart from its JSON files: bring them
        for name in ("config.json",):
            (tmp_path / "dir").mkdir(exist_ok=True)
            (tmp_path / "dir" / name).write_bytes((model_dir / name).read_bytes())
        link = tmp_path / "dir" / "model.onnx"
        link.hardlink_to(model) if model.stat().st_dev == tmp_path.stat().st_dev else link.write_bytes(model.read_bytes())
        model = link
    assert_identical(logits_everywhere(probes, model, tmp_path), vocab_of(model_dir))


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("tiny-gguf")
    subprocess.run([sys.executable, str(ROOT / "host" / "gguf" / "tests" / "tiny_models.py"), str(out)],
                   check=True, timeout=600)
    return out


@pytest.mark.parametrize("name", TINY_GGUFS)
def test_tiny_ggufs_same_logits_on_every_build(probes, tiny_ggufs, name, tmp_path):
    assert SLM.is_file(), "run scripts/setup (builds target/release/slm)"
    model_dir = tmp_path / name
    subprocess.run([str(SLM), "convert", str(tiny_ggufs / f"{name}.gguf"), "-o", str(model_dir)],
                   check=True, timeout=600, capture_output=True)
    assert_identical(logits_everywhere(probes, model_dir / "model.onnx", tmp_path), vocab_of(model_dir))
