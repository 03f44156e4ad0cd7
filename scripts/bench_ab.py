"""Before/after speed of two `slm` builds, measured in the same run: `slm bench --json` of each,
interleaved (the order alternates per round) at 1 and 2 threads, medians per build and the ratio
after/before. Each binary finds its own components next to itself.

    .venv/bin/python scripts/bench_ab.py BEFORE/slm AFTER/slm [--rounds 5] [--models models]
        [--prompt-tokens N] [--gen-tokens N] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess

KEYS = ["decode_tps", "prefill_tps", "ttft_ms", "cold_start_ms", "run_peak_rss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=pathlib.Path)
    ap.add_argument("after", type=pathlib.Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", type=pathlib.Path, default=pathlib.Path("models"))
    ap.add_argument("--prompt-tokens", type=int, help="`slm bench`'s prompt length (its default: 128)")
    ap.add_argument("--gen-tokens", type=int, help="tokens generated per run (`slm bench`'s default: 64)")
    ap.add_argument("--runs", type=int, default=3, help="`slm bench` runs per round")
    a = ap.parse_args()
    builds = {"before": a.before.resolve(), "after": a.after.resolve()}
    runs = {(b, t): {k: [] for k in KEYS} for b in builds for t in (1, 2)}
    lengths = [x for flag, n in (("--prompt-tokens", a.prompt_tokens), ("--gen-tokens", a.gen_tokens))
               if n is not None for x in (flag, str(n))]
    for r in range(a.rounds):
        for t in (1, 2):
            for b in (list(builds) if r % 2 == 0 else list(reversed(builds))):
                out = subprocess.run([str(builds[b]), "--models", str(a.models.resolve()), "bench",
                                      "--runs", str(a.runs), "--threads", str(t), *lengths, "--json"],
                                     capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                for k in KEYS:
                    if result.get(k) is not None:
                        runs[(b, t)][k].append(result[k])
    for t in (1, 2):
        print(f"threads {t}")
        for k in KEYS:
            before, after = (statistics.median(runs[(b, t)][k]) for b in builds)
            print(f"  {k:16s} before {before:9.1f}  after {after:9.1f}  after/before {after / before:.3f}")


if __name__ == "__main__":
    main()
