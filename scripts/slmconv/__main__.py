"""slmconv: convert a llama GGUF into a model directory, or write the tiny test model.

  python -m slmconv gguf MODEL.gguf OUT_DIR [--layouts f32,int8,q4]
  python -m slmconv tiny OUT_DIR --tokenizer-from MODEL.gguf [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
import time

from . import graph
from .gguf_in import read_gguf
from .spec import ConvertError
from .tiny import tiny_model
from .writer import write_model_dir


def _progress(label: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=label, unit="tensor", file=sys.stderr, leave=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


def _layouts(text: str) -> list[str]:
    layouts = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in layouts if s not in graph.LAYOUTS]
    if bad:
        raise ConvertError(f"unknown layout '{bad[0]}': choose from {', '.join(graph.LAYOUTS)}")
    return layouts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="slmconv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gguf", help="convert a llama-architecture GGUF")
    g.add_argument("gguf")
    g.add_argument("out")
    g.add_argument("--layouts", default=",".join(graph.LAYOUTS))
    t = sub.add_parser("tiny", help="write a small random-weight model with a GGUF's tokenizer")
    t.add_argument("out")
    t.add_argument("--tokenizer-from", required=True, metavar="GGUF")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--layouts", default=",".join(graph.LAYOUTS))
    args = ap.parse_args(argv)

    start = time.time()
    try:
        layouts = _layouts(args.layouts)
        if args.cmd == "gguf":
            model = read_gguf(args.gguf, progress=_progress("dequantize"))
        else:
            source = read_gguf(args.tokenizer_from, progress=None)
            model = tiny_model(source.tokenizer, seed=args.seed)
        print(f"converting {model.name}: {model.config.n_layers} layers, hidden {model.config.hidden}, "
              f"vocab {model.config.vocab}", file=sys.stderr)
        write_model_dir(model, args.out, layouts, log=lambda m: print(m, file=sys.stderr))
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} in {time.time() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
