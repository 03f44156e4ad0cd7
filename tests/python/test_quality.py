"""Every weight layout runs in ONNX Runtime with a KV cache, and the default stays faithful to f32,
in ONNX Runtime and through our own engine (`slm logits`, whose Q4_1 kernels round activations
to 8 bits per block of 32). The layouts are the oracle's (scripts/slmconv, in
.cache/model-variants/: scripts/model_variants.py), in standard ONNX operators; `slm logits` runs the
default model as `slm convert` wrote it.

Measured on tests/fixtures/heldout.txt (first 300 tokens), ONNX Runtime 1.32, token by token:
  layout                 perplexity vs f32   next-token agreement with f32
  q4_1 (default)         -0.3%               0.96   (ONNX Runtime's MatMulNBits kernel)
  q4_1, our engine       +1.25%              0.92
  int8                   +0.09%              0.92
  q4                     +14.7%              0.66   (symmetric 4-bit: NOT faithful, kept for measurement)
The bounds below leave room for kernel-level rounding differences only.
"""
import json
import pathlib
import subprocess

import numpy as np
import pytest

from model_variants import variants_dir
from slmconv.ort_eval import OrtModel, log_softmax, perplexity

N_TOKENS = 300
FAITHFUL = 1.03  # the default layout's perplexity bound relative to f32
LAYOUTS = {"f32", "int8", "q4", "q4_1"}
MIN_AGREEMENT = {"f32": 1.0, "int8": 0.90, "q4": 0.55, "q4_1": 0.90}
SLM = pathlib.Path(__file__).resolve().parents[2] / "target" / "release" / "slm"


@pytest.fixture(scope="module")
def ids(heldout_ids):
    return heldout_ids[:N_TOKENS]


@pytest.fixture(scope="module")
def oracle(model_dir):
    """slmconv's directory of the default model: every layout."""
    d = variants_dir(model_dir)
    assert (d / "config.json").is_file(), f"{d} missing: scripts/test writes it (scripts/model_variants.py make)"
    return d


def variants(oracle) -> dict[str, str]:
    return json.loads((oracle / "config.json").read_text())["edge_slm"]["variants"]


@pytest.fixture(scope="module")
def runs(oracle, ids):
    """Per layout: logits of the whole prompt in one call, and of the same tokens fed one at a time."""
    out = {}
    for layout, file in variants(oracle).items():
        path = oracle / file
        assert path.is_file(), f"{path} missing: scripts/test writes it (scripts/model_variants.py make)"
        whole = OrtModel(str(oracle), str(path), all_logits=True).prompt_logits(ids)
        stepwise = OrtModel(str(oracle), str(path)).stepwise_logits(ids)
        out[layout] = (whole, stepwise)
    return out


def test_variants_present(runs):
    assert set(runs) == LAYOUTS


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_prefill_matches_token_by_token(runs, oracle, ids, layout):
    whole, stepwise = runs[layout]
    assert (whole.argmax(-1) == stepwise.argmax(-1)).all()
    np.testing.assert_allclose(whole, stepwise, atol=2e-2)
    # The shipped file (last-position logits) after a whole prompt predicts the same next token.
    last = OrtModel(str(oracle), str(oracle / variants(oracle)[layout])).prompt_logits(ids[:64])
    assert last.shape[0] == 1 and last[0].argmax() == stepwise[63].argmax()


@pytest.mark.parametrize("layout", ["int8", "q4", "q4_1"])
def test_next_token_agreement_with_f32(runs, layout):
    ref = runs["f32"][0].argmax(-1)
    for logits in runs[layout]:
        assert (logits.argmax(-1) == ref).mean() >= MIN_AGREEMENT[layout]


@pytest.mark.parametrize("mode", [0, 1], ids=["whole-prompt", "token-by-token"])
def test_default_layout_is_faithful(runs, oracle, ids, mode):
    assert variants(oracle)["q4_1"] == "model.onnx"
    ref = perplexity(runs["f32"][mode], ids)
    for layout in ("q4_1", "int8"):
        assert perplexity(runs[layout][mode], ids) <= FAITHFUL * ref, layout
    assert ref < 60  # a sane model on English prose (measured 36 on this text)


def test_default_layout_is_faithful_through_our_engine(runs, ids, tmp_path):
    """The default model as `slm` runs it (Q4_1 kernels), teacher-forced token by token."""
    assert SLM.is_file(), "build the host first: scripts/build-all"
    out = tmp_path / "logits.bin"
    n = len(ids)
    # Prompt ids[:2], then feed ids[2:]: row j predicts ids[2 + j].
    # The repository's models directory wherever pytest runs from (slm's default is ./models).
    r = subprocess.run([str(SLM), "--models", str(SLM.parents[2] / "models"), "logits", "--ids", json.dumps(ids[:2]), "--follow", json.dumps(ids[2:]),
                        "--steps", str(n - 3), "--runs", "1", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ours = np.fromfile(out, np.float32).reshape(n - 2, -1)
    ref = runs["f32"][1][1:n - 1]
    target = np.array(ids[2:])

    def ppl(logits):
        return float(np.exp(-log_softmax(logits)[np.arange(len(target)), target].mean()))

    assert ppl(ours) <= FAITHFUL * ppl(ref)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.88  # measured 0.92


def test_q4_is_not_faithful(runs, ids):
    """Why q4 (tract's fast symmetric 4-bit) is not the default: it breaks the +3% bound on this model."""
    ref = perplexity(runs["f32"][0], ids)
    assert perplexity(runs["q4"][0], ids) > FAITHFUL * ref
