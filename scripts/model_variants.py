"""The other weight layouts of a model, written by the tests' oracle: .cache/model-variants/<name>/.

slm reads model.onnx, which `slm convert` (the host's converter, Rust) writes into models/<name>/.
The tests and benchmarks that compare layouts (f32, int8 rows, 4-bit; ~770 MB for the default
model) and the converter's own byte-for-byte test need scripts/slmconv, the Python converter kept
as their oracle: `make` has it write its whole model directory (model_f32.onnx, model_int8.onnx,
model_q4.onnx, its own model.onnx and JSON files) into .cache/model-variants/<name>/, outside
models/ (whatever mounts models/ takes every file in it: `spin up` copies it at every start). A
layout's file is found with `variant_path`: in the model directory when it is there (model.onnx;
the tiny test model keeps all its layouts), else there.

  python scripts/model_variants.py make MODEL_DIR GGUF   # write them (skipped when up to date)
  python scripts/model_variants.py check MODEL_DIR       # exit 1 unless every layout's file is found
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS_ROOT = ROOT / ".cache" / "model-variants"


def variants_dir(model_dir: str | os.PathLike) -> pathlib.Path:
    """The directory holding the other layouts of the model in `model_dir` (named after it)."""
    return VARIANTS_ROOT / pathlib.Path(os.path.abspath(model_dir)).name


def layouts(model_dir: str | os.PathLike) -> dict[str, str]:
    """Layout -> file name, from the config.json slmconv wrote (in variants_dir(model_dir), or in
    the model directory for a model it wrote there, like the tiny one); {} when there is none.
    (`slm convert`'s config.json lists only its own layout, model.onnx.)"""
    for where in (variants_dir(model_dir), pathlib.Path(model_dir)):
        try:
            cfg = json.loads((where / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        found = dict(cfg.get("edge_slm", {}).get("variants", {}))
        if len(found) > 1:
            return found
    return {}


def variant_path(model_dir: str | os.PathLike, file: str) -> pathlib.Path:
    """Where `file` (model.onnx, model_f32.onnx, ...) of the model in `model_dir` is, as an absolute
    path: in the model directory when it holds it, else in variants_dir(model_dir) (which may not
    hold it either)."""
    here = pathlib.Path(os.path.abspath(model_dir)) / file
    return here if here.is_file() else variants_dir(model_dir) / file


def missing(model_dir: str | os.PathLike) -> list[str]:
    """The layouts' files found nowhere (["config.json"] when the model has no layouts listed)."""
    files = layouts(model_dir).values()
    if not files:
        return ["config.json"]
    return sorted(f for f in files if not variant_path(model_dir, f).is_file())


def source_key(gguf: str | os.PathLike) -> str:
    """What the layouts are made from: the GGUF's content and the oracle's sources."""
    h = hashlib.sha256()
    with open(gguf, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    for src in sorted((ROOT / "scripts" / "slmconv").glob("*.py")):
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def make(model_dir: str | os.PathLike, gguf: str | os.PathLike, log=print) -> bool:
    """Have slmconv write its model directory for `gguf` into variants_dir(model_dir), unless every
    layout is there already and was made from this GGUF by this slmconv. True when it converted."""
    dest = variants_dir(model_dir)
    stamp = dest / ".made-from"
    key = source_key(gguf)
    if not missing(model_dir) and stamp.is_file() and stamp.read_text().strip() == key:
        return False
    log(f"writing the other layouts of {gguf} into {dest} (scripts/slmconv, the tests' oracle)")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"))
    subprocess.run([sys.executable, "-m", "slmconv", "gguf", str(gguf), str(dest)], env=env, check=True)
    stamp.write_text(key + "\n")
    return True


def main(argv: list[str]) -> int:
    if argv[:1] == ["make"] and len(argv) == 3:
        try:
            make(argv[1], argv[2], log=lambda m: print(m, file=sys.stderr))
        except subprocess.CalledProcessError:
            print("model_variants: slmconv failed (see the error above)", file=sys.stderr)
            return 1
        return 0
    if argv[:1] == ["check"] and len(argv) == 2:
        return 1 if missing(argv[1]) else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
