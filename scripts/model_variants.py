"""Where a model's other weight layouts live: .cache/model-variants/<name>/ (git-ignored).

The converter writes every layout it is asked for into the model directory: model.onnx (the
default, Q4_1) and model_<layout>.onnx for the others (config.json's edge_slm.variants names them;
model_f32.onnx, model_int8.onnx and model_q4.onnx, ~770 MB for the default model). slm reads only
model.onnx, and whatever mounts models/ takes every file in it (`spin up` copies it into a temporary
directory at every start; `wasmtime --dir`, image volumes), so scripts/setup moves the other layouts
here. The tests and benchmarks that compare layouts find a layout's file with `variant_path`: in the
model directory when it is there (model.onnx; the tiny test model keeps all its layouts), else here.

  python scripts/model_variants.py move MODEL_DIR    # move the layouts other than model.onnx here
  python scripts/model_variants.py check MODEL_DIR   # exit 1 unless every layout's file is found
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS_ROOT = ROOT / ".cache" / "model-variants"
DEFAULT_FILE = "model.onnx"


def variants_dir(model_dir: str | os.PathLike) -> pathlib.Path:
    """The directory holding the other layouts of the model in `model_dir` (named after it)."""
    return VARIANTS_ROOT / pathlib.Path(os.path.abspath(model_dir)).name


def layouts(model_dir: str | os.PathLike) -> dict[str, str]:
    """Layout -> file name, from config.json (written by slmconv); {} for a model without it."""
    try:
        cfg = json.loads((pathlib.Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return dict(cfg.get("edge_slm", {}).get("variants", {}))


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


def move(model_dir: str | os.PathLike, log=print) -> list[str]:
    """Move every layout's file but model.onnx out of `model_dir` into variants_dir(model_dir),
    replacing older copies there (a rename on one filesystem). Returns the files moved."""
    moved = []
    dest = variants_dir(model_dir)
    for file in sorted(set(layouts(model_dir).values()) - {DEFAULT_FILE}):
        src = pathlib.Path(model_dir) / file
        if not src.is_file() or src.is_symlink():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dest / file))
        log(f"moved {src} -> {dest / file}")
        moved.append(file)
    return moved


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("move", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, model_dir = argv
    if cmd == "move":
        move(model_dir, log=lambda m: print(m, file=sys.stderr))
        return 0
    return 1 if missing(model_dir) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
