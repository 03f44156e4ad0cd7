"""Cache-affine routing against round-robin (issue 19, item 3): replays one multi-tenant trace against
N `slm serve` replicas behind HAProxy (scripts/cluster), once per policy, on fresh replicas each time.

    .venv/bin/python scripts/bench_affinity.py [--replicas 3] [--tenants 12] [--requests 240]
        [--rate 0.6] [--system-tokens 300] [--max-tokens 8] [--seed 0] [--kill] [--only-kill]
        [--prefix-cache-mb MIB] [--key prompt_cache_key|none] [--json FILE]

The trace: every tenant has its own system prompt (about --system-tokens tokens, distinct from its
first words); each request is one tenant (uniformly drawn) asking one short question, arriving as a
Poisson process at --rate requests/s; greedy, --max-tokens tokens, streamed. With --key
prompt_cache_key (default) each request carries its tenant's id as OpenAI's `prompt_cache_key`; with
--key none the affine policy hashes the system prompt's first bytes instead. The same seed gives the
same trace for every policy.

Per policy it reports the prompt tokens served from the prefix cache (the sum of the responses'
usage.prompt_tokens_details.cached_tokens, checked against the replicas' /metrics), p50/p95 time to
first content chunk (from each request's scheduled arrival, so a late client counts), errors, and
how the requests spread over the replicas. --kill adds a run (affinity) where one replica is killed
(SIGKILL) halfway through the trace: requests that had not started answering are retried on another
replica by HAProxy (retry-on, redispatch); streams the replica had started are cut, and the client
retries those once (--client-retries); lost = requests with no complete answer in the end.

Each replica runs with 1 inference thread (`--threads 1`); on a machine with fewer cores than
replicas they share the CPU (the report says how many cores there were). Prints one line per run
and, last, one JSON object (also written to --json, default target/bench-affinity/last.json).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import pathlib
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "cluster"

COMPANIES = ["Aldermoor Freight", "Brightwater Dental", "Cobalt Ridge Insurance", "Dunmore Public Library",
             "Evergreen Solar Co-op", "Foxglove Veterinary", "Granite Peak Outfitters", "Harborline Ferries",
             "Ironbark Builders", "Juniper Street Bakery", "Kestrel Air Charter", "Lanternfish Aquarium",
             "Meridian Tax Advisors", "Northwind Bicycle Repair", "Orchard Valley Farms", "Pinecrest Hotel"]
DOMAINS = ["shipping and parcel tracking", "dental appointments", "home and car insurance", "library loans",
           "community solar subscriptions", "pet health", "outdoor gear rental", "ferry timetables and tickets",
           "home renovation quotes", "bread and pastry orders", "private flights", "aquarium tickets and events",
           "personal tax returns", "bicycle servicing", "farm shop orders", "hotel bookings"]
TOPICS = ["opening hours", "prices", "refunds", "delivery times", "cancellations", "gift cards",
          "accessibility", "parking", "loyalty points", "group discounts", "payment methods", "complaints",
          "booking changes", "lost items", "safety rules", "weekend availability"]
VERBS = ["Always", "Politely", "Briefly", "Clearly", "Never fail to", "Remember to", "Make sure to", "Kindly"]
ACTIONS = ["mention the reference number", "offer to escalate to a human", "quote the current price list",
           "explain the policy in plain words", "ask for the customer's postcode", "suggest the online form",
           "confirm the customer's name", "give the phone number 555-0100", "state the time zone",
           "point to the help page", "apologise for any delay", "keep the answer under three sentences"]
QUESTIONS = ["What are your opening hours?", "How do I get a refund?", "Can I change my booking?",
             "Do you offer group discounts?", "Where can I park?", "How long does delivery take?",
             "Which payment methods do you accept?", "Is the site wheelchair accessible?",
             "How do loyalty points work?", "Can I buy a gift card?", "What if I lost an item?",
             "Are you open on weekends?", "How do I file a complaint?", "What does it cost?"]


def system_prompt(i: int, rng: random.Random, target_tokens: int, count_tokens) -> str:
    """Tenant i's system prompt: its own first words (the company), then rules until about target_tokens."""
    company, domain = COMPANIES[i % len(COMPANIES)], DOMAINS[i % len(DOMAINS)]
    if i >= len(COMPANIES):
        company = f"{company} {i // len(COMPANIES) + 1}"
    text = (f"{company} customer assistant. You answer questions from customers of {company} about "
            f"{domain}. Follow these house rules.")
    n = 1
    while count_tokens(text) < target_tokens:
        text += f" Rule {n}: when asked about {rng.choice(TOPICS)}, {rng.choice(VERBS).lower()} {rng.choice(ACTIONS)}."
        n += 1
    return text


def token_counter(models: pathlib.Path):
    """Token count with the first model's tokenizer (tokenizers from the venv), else ~4 characters a token."""
    try:
        from tokenizers import Tokenizer

        tok = next(models.glob("*/tokenizer.json"))
        t = Tokenizer.from_file(str(tok))
        return lambda s: len(t.encode(s, add_special_tokens=False).ids)
    except Exception:  # noqa: BLE001: an estimate is fine for sizing the prompts
        return lambda s: len(s) // 4


def make_trace(args, count_tokens) -> tuple[list[str], list[dict]]:
    rng = random.Random(args.seed)
    prompts = [system_prompt(i, rng, args.system_tokens, count_tokens) for i in range(args.tenants)]
    t = 0.0
    trace = []
    for k in range(args.requests):
        t += rng.expovariate(args.rate)
        tenant = rng.randrange(args.tenants)
        trace.append({"i": k, "at": t, "tenant": tenant,
                      "question": f"{rng.choice(QUESTIONS)} (ticket {rng.randrange(10000, 99999)})"})
    return prompts, trace


def body_of(req: dict, prompts: list[str], args) -> bytes:
    body = {"messages": [{"role": "system", "content": prompts[req["tenant"]]},
                         {"role": "user", "content": req["question"]}],
            "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.key == "prompt_cache_key":
        body["prompt_cache_key"] = f"tenant-{req['tenant']:02d}"
    return json.dumps(body).encode()


def stream_once(host: str, port: int, body: bytes, timeout: float) -> dict:
    """One streamed chat completion: status, first content time, usage, replica, complete or not."""
    out = {"status": None, "first": None, "usage": None, "replica": None, "done": False, "error": None}
    try:
        c = http.client.HTTPConnection(host, port, timeout=timeout)
        c.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
        r = c.getresponse()
        out["status"], out["replica"] = r.status, r.getheader("x-slm-replica")
        if r.status != 200:
            out["error"] = f"HTTP {r.status}: {r.read()[:160]!r}"
            return out
        any_chunk = None
        for line in r:
            line = line.strip()
            if line == b"data: [DONE]":
                out["done"] = True
                break
            if not line.startswith(b"data: "):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["error"] = f"stream error: {chunk['error'].get('message', '')[:160]}"
                break
            now = time.perf_counter()
            any_chunk = any_chunk or now
            if chunk.get("usage"):
                out["usage"] = chunk["usage"]
            if out["first"] is None and any(ch.get("delta", {}).get("content") for ch in chunk.get("choices", [])):
                out["first"] = now
        out["first"] = out["first"] or any_chunk
        if not out["done"] and out["error"] is None:
            out["error"] = "stream cut before [DONE]"
        c.close()
    except (OSError, http.client.HTTPException, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def replay(url: str, prompts: list[str], trace: list[dict], args, on_half=None) -> list[dict]:
    """Sends every request at its arrival time (one thread each); returns one result per request."""
    u = urllib.parse.urlparse(url)
    results: list[dict | None] = [None] * len(trace)
    t0 = time.perf_counter() + 0.5

    def one(req: dict):
        body = body_of(req, prompts, args)
        start = t0 + req["at"]
        attempts = []
        for _ in range(1 + args.client_retries):
            res = stream_once(u.hostname, u.port, body, args.timeout)
            attempts.append(res)
            if res["error"] is None:
                break
        last = attempts[-1]
        results[req["i"]] = {
            "i": req["i"], "tenant": req["tenant"], "ok": last["error"] is None,
            "ttft": (last["first"] - start) if last["error"] is None and last["first"] else None,
            "cached": (last["usage"] or {}).get("prompt_tokens_details", {}).get("cached_tokens", 0) if last["usage"] else 0,
            "prompt_tokens": (last["usage"] or {}).get("prompt_tokens", 0),
            "replica": last["replica"], "client_retries": len(attempts) - 1,
            "errors": [a["error"] for a in attempts if a["error"]],
        }

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(trace)) as pool:
        futures = []
        half = len(trace) // 2
        for req in trace:
            delay = t0 + req["at"] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if req["i"] == half and on_half:
                on_half()
            futures.append(pool.submit(one, req))
        for f in futures:
            f.result()
    return results  # type: ignore[return-value]


def cluster(*argv: str) -> str:
    r = subprocess.run([str(CLUSTER), *argv], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench_affinity: scripts/cluster {' '.join(argv)} failed:\n{r.stderr}")
    return r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""


def replicas(state: pathlib.Path) -> list[tuple[str, int, int]]:
    rows = [line.split() for line in (state / "replicas").read_text().splitlines() if line.strip()]
    return [(name, int(pid), int(port)) for name, pid, port in rows]


def metric(port: int, name: str) -> float:
    """Sum of one counter over all models, from a replica's /metrics (0 when it does not answer)."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
    except OSError:
        return 0.0
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def warm(port: int):
    """Loads the model on one replica (the first request pays for it) with a prompt no tenant shares."""
    body = json.dumps({"messages": [{"role": "user", "content": "Warm up."}], "max_tokens": 1}).encode()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    c.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
    assert c.getresponse().status == 200


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def run_policy(policy: str, prompts, trace, args, kill: bool = False) -> dict:
    state = pathlib.Path(args.state)
    serve_flags = ["--max-queue", "512"]
    if args.prefix_cache_mb is not None:
        serve_flags += ["--prefix-cache-mb", str(args.prefix_cache_mb)]
    url = cluster("up", str(args.replicas), "--policy", policy, "--models", str(args.models), "--state", str(state),
                  "--", *serve_flags)
    try:
        reps = replicas(state)
        for _, _, port in reps:
            warm(port)
        before = {name: metric(port, "slm_prefix_cache_hit_tokens_total") for name, _, port in reps}
        killed = {}

        def kill_one():
            # Halfway through, as soon as the replica is busy (a generation running), so that the
            # kill catches requests in flight; then SIGKILL.
            name, pid, port = next(r for r in reps if r[0] == args.kill_replica)
            deadline = time.perf_counter() + 60
            busy = 0.0
            while time.perf_counter() < deadline:
                busy = metric(port, "slm_requests_running") + metric(port, "slm_requests_waiting")
                if busy >= 1:
                    break
                time.sleep(0.02)
            os.kill(pid, signal.SIGKILL)
            killed.update(name=name, at=round(time.perf_counter() - t_start, 2), in_flight=int(busy))

        def kill_when_busy():
            threading.Thread(target=kill_one, daemon=True).start()

        log_lines = len((state / "haproxy.log").read_text().splitlines())
        t_start = time.perf_counter()
        results = replay(url, prompts, trace, args, on_half=kill_when_busy if kill else None)
        wall = time.perf_counter() - t_start
        after = {name: metric(port, "slm_prefix_cache_hit_tokens_total") for name, _, port in reps}
        hap = (state / "haproxy.log").read_text().splitlines()[log_lines:]
    finally:
        cluster("down", "--state", str(state))
    ok = [r for r in results if r["ok"]]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    per_replica: dict[str, int] = {}
    for r in ok:
        per_replica[r["replica"] or "?"] = per_replica.get(r["replica"] or "?", 0) + 1
    retried_by_proxy = sum(1 for line in hap if "/v1/chat/completions" in line and re.search(r" rc=\+?[1-9]", line))
    out = {
        "policy": policy, "kill": killed or None, "requests": len(results), "ok": len(ok),
        "lost": len(results) - len(ok),
        "errors_seen": sum(len(r["errors"]) for r in results),
        "retried_by_client": sum(r["client_retries"] for r in results),
        "retried_by_haproxy": retried_by_proxy,
        "cached_tokens": sum(r["cached"] for r in ok),
        "prompt_tokens": sum(r["prompt_tokens"] for r in ok),
        # The replicas' own count (a killed replica's counters die with it: left out).
        "cached_tokens_metrics": int(sum(after[k] - before[k] for k in before if k != (killed or {}).get("name"))),
        "ttft_p50_ms": round(pct(ttfts, 0.5) * 1e3) if ttfts else None,
        "ttft_p95_ms": round(pct(ttfts, 0.95) * 1e3) if ttfts else None,
        "ttft_mean_ms": round(statistics.fmean(ttfts) * 1e3) if ttfts else None,
        "per_replica": dict(sorted(per_replica.items())),
        "tenants_per_replica": {k: len({r["tenant"] for r in ok if r["replica"] == k}) for k in sorted(per_replica)},
        "wall_s": round(wall, 1),
        # Time from the last arrival to the last answer: stays small when the rate is sustained.
        "drain_s": round(wall - 0.5 - trace[-1]["at"], 1),
        "error_samples": sorted({e for r in results for e in r["errors"]})[:5],
    }
    return out


def line(r: dict) -> str:
    k = (f" (killed {r['kill']['name']} at {r['kill']['at']} s, {r['kill']['in_flight']} requests running or "
         f"waiting on it)" if r["kill"] else "")
    return (f"{r['policy']:<10}{k}: cached prompt tokens {r['cached_tokens']}/{r['prompt_tokens']} "
            f"({r['cached_tokens'] / max(1, r['prompt_tokens']):.0%}; /metrics {r['cached_tokens_metrics']}"
            f"{' without the killed replica' if r['kill'] else ''}), "
            f"TTFT p50 {r['ttft_p50_ms']} ms p95 {r['ttft_p95_ms']} ms, ok {r['ok']}/{r['requests']}, lost {r['lost']}, "
            f"errors seen {r['errors_seen']} (client retries {r['retried_by_client']}, HAProxy retries "
            f"{r['retried_by_haproxy']}), per replica {r['per_replica']}, tenants {r['tenants_per_replica']}, "
            f"{r['wall_s']} s (drain {r['drain_s']} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--tenants", type=int, default=12)
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--rate", type=float, default=0.6, help="Poisson arrival rate, requests/s (default 0.6: "
                    "what 3 replicas on 2 cores sustain under round-robin, README 'Many replicas')")
    ap.add_argument("--system-tokens", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--key", choices=["prompt_cache_key", "none"], default="prompt_cache_key")
    ap.add_argument("--policies", default="roundrobin,affinity")
    ap.add_argument("--kill", action="store_true", help="then a run (affinity) killing one replica halfway")
    ap.add_argument("--only-kill", action="store_true", help="only the run killing a replica")
    ap.add_argument("--kill-replica", default="r1")
    ap.add_argument("--client-retries", type=int, default=1, help="retries of a failed or cut request by the client")
    ap.add_argument("--prefix-cache-mb", type=int, default=None, help="each replica's prefix cache (default: slm's)")
    ap.add_argument("--models", type=pathlib.Path, default=ROOT / "models")
    ap.add_argument("--state", default=str(ROOT / "target" / "bench-affinity" / "cluster"))
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", type=pathlib.Path, default=ROOT / "target" / "bench-affinity" / "last.json")
    args = ap.parse_args()

    count = token_counter(args.models)
    prompts, trace = make_trace(args, count)
    sys_tokens = [count(p) for p in prompts]
    print(f"trace: {args.requests} requests, {args.tenants} tenants (system prompts {min(sys_tokens)}-"
          f"{max(sys_tokens)} tokens), Poisson {args.rate}/s over {trace[-1]['at']:.0f} s, max_tokens "
          f"{args.max_tokens}, key {args.key}, seed {args.seed}; {args.replicas} replicas x 1 thread on "
          f"{os.cpu_count()} cores; prefix cache {args.prefix_cache_mb or 'default'} MiB", flush=True)
    runs = []
    if not args.only_kill:
        for policy in args.policies.split(","):
            runs.append(run_policy(policy, prompts, trace, args))
            print(line(runs[-1]), flush=True)
    if args.kill or args.only_kill:
        runs.append(run_policy("affinity", prompts, trace, args, kill=True))
        print(line(runs[-1]), flush=True)
    summary = {"config": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
               "cores": os.cpu_count(), "system_prompt_tokens": sys_tokens, "runs": runs}
    by = {r["policy"]: r for r in runs if not r["kill"]}
    if "roundrobin" in by and "affinity" in by:
        rr, af = by["roundrobin"], by["affinity"]
        summary["cached_ratio"] = round(af["cached_tokens"] / max(1, rr["cached_tokens"]), 2)
        if rr["ttft_p50_ms"] and af["ttft_p50_ms"] is not None:
            summary["ttft_p50_ratio"] = round(af["ttft_p50_ms"] / rr["ttft_p50_ms"], 2)
        if rr["ttft_p95_ms"] and af["ttft_p95_ms"] is not None:
            summary["ttft_p95_ratio"] = round(af["ttft_p95_ms"] / rr["ttft_p95_ms"], 2)
        print(f"affinity / round-robin: cached tokens x{summary['cached_ratio']} (goal >= 2), TTFT p50 "
              f"x{summary.get('ttft_p50_ratio')} (goal <= 0.6), p95 x{summary.get('ttft_p95_ratio')}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
