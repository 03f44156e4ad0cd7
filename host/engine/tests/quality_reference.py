"""Reference for the engine's whole-prompt perplexity test (tests/quality.rs).

  python quality_reference.py MODEL_DIR HELDOUT.txt N OUT_DIR

Writes OUT_DIR/model.onnx (MODEL_DIR's model.onnx with logits for every position), OUT_DIR/ids.json
(the first N tokens of the held-out text) and OUT_DIR/reference.json (a number: the perplexity of the f32
reference, model_f32.onnx in ONNX Runtime, on the same tokens, whole prompt at once). model_f32.onnx is
found as scripts/model_variants.py says: in MODEL_DIR, else in .cache/model-variants/<name>/.
"""
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "scripts"))
import onnx  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from model_variants import variant_path  # noqa: E402
from slmconv.ort_eval import OrtModel, _all_positions, perplexity  # noqa: E402

model_dir, heldout, n, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4])
out.mkdir(parents=True, exist_ok=True)
ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(heldout.read_text(encoding="utf-8"), add_special_tokens=False).ids[:n]
onnx.save(_all_positions(onnx.load(str(model_dir / "model.onnx"))), str(out / "model.onnx"))
f32 = variant_path(model_dir, "model_f32.onnx")
if not f32.is_file():
    sys.exit(f"{f32} missing: run scripts/setup")
ref = perplexity(OrtModel(str(model_dir), str(f32), all_logits=True).prompt_logits(ids), ids)
(out / "ids.json").write_text(json.dumps(ids))
(out / "reference.json").write_text(json.dumps(ref))
