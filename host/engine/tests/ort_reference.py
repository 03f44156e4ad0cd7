"""ONNX Runtime logits for the engine parity test (tests/engine.rs).

  python ort_reference.py MODEL_DIR FILE OUT.json

Runs the reference script of the parity test: a 10-token prefill, three single-token steps through
the KV cache, then a rewind to position 6 and a 2-token step. Prints the last-position logits of each.
"""
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "scripts"))
from slmconv.ort_eval import OrtModel  # noqa: E402

from engine_script import PREFILL, STEPS, REWIND_AT, REWIND_IDS  # noqa: E402

model_dir, file, out = sys.argv[1:4]
m = OrtModel(model_dir, file)
results = []
logits, cache = m.step(PREFILL, 0, m.empty_cache())
results.append(logits[-1].tolist())
pos = len(PREFILL)
for t in STEPS:
    logits, cache = m.step([t], pos, cache)
    results.append(logits[-1].tolist())
    pos += 1
cut = {k: v[:, :, :REWIND_AT, :] for k, v in cache.items()}
logits, _ = m.step(REWIND_IDS, REWIND_AT, cut)
results.append(logits[-1].tolist())
json.dump(results, open(out, "w"))
