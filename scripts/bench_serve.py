"""Streaming throughput of `slm serve`: time to first streamed token and tokens/s for 1 and for N
concurrent clients (greedy chat completions, one distinct question per client).

    .venv/bin/python scripts/bench_serve.py [--url http://127.0.0.1:8080] [--clients 1,8] [--max-tokens 64]

Starts `target/release/slm serve` on a free port unless --url is given. Prints one line per client
count and, last, one JSON object.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import pathlib
import signal
import socket
import statistics
import subprocess
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOPICS = ["the moon", "volcanoes", "honey bees", "the printing press", "glaciers", "lighthouses",
          "bicycles", "coral reefs", "tea", "the compass", "owls", "rainbows", "bridges", "salt", "maps", "kites"]


def stream_chat(host: str, port: int, question: str, max_tokens: int) -> dict:
    body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    c = http.client.HTTPConnection(host, port, timeout=600)
    c.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    first = None
    usage = None
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        if first is None and any(ch["delta"].get("content") for ch in chunk.get("choices", [])):
            first = time.perf_counter()
    end = time.perf_counter()
    n = usage["completion_tokens"]
    return {"ttft_ms": (first - t0) * 1e3, "tokens": n,
            "decode_tps": (n - 1) / (end - first) if n > 1 and end > first else float("nan"),
            "total_s": end - t0}


def run(host: str, port: int, clients: int, max_tokens: int) -> dict:
    questions = [f"Tell me about {TOPICS[i % len(TOPICS)]}." for i in range(clients)]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda q: stream_chat(host, port, q, max_tokens), questions))
    wall = time.perf_counter() - t0
    return {"clients": clients,
            "ttft_ms_median": statistics.median(r["ttft_ms"] for r in results),
            "ttft_ms_max": max(r["ttft_ms"] for r in results),
            "per_client_decode_tps": statistics.median(r["decode_tps"] for r in results),
            "aggregate_tps": sum(r["tokens"] for r in results) / wall,
            "tokens": sum(r["tokens"] for r in results), "wall_s": wall}


def start_server() -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(ROOT / "target/release/slm"), "serve", "--listen", f"127.0.0.1:{port}"],
                            cwd=ROOT, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    raise SystemExit("bench_serve: slm serve did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url")
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    proc = None
    if args.url:
        host, port = args.url.removeprefix("http://").rstrip("/").split(":")
        port = int(port)
    else:
        proc, port = start_server()
        host = "127.0.0.1"
    try:
        stream_chat(host, port, "Hello!", 4)  # warm-up: loads the model
        report = []
        for n in [int(c) for c in args.clients.split(",")]:
            r = run(host, port, n, args.max_tokens)
            report.append(r)
            print(f"{n:>2} clients: time to first token median {r['ttft_ms_median']:.0f} ms (max {r['ttft_ms_max']:.0f}),"
                  f" per-client decode {r['per_client_decode_tps']:.1f} tok/s, aggregate {r['aggregate_tps']:.1f} tok/s")
        print(json.dumps(report))
    finally:
        if proc:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
