"""scripts/cluster: `slm serve` replicas behind HAProxy with cache-affine routing (deploy/haproxy.cfg).

Runs the tiny model on 2 replicas: requests sharing a prompt_cache_key (or a system prompt) reach the
same replica, as its own access log shows, and reuse its prefix cache; different keys spread; /health
answers through HAProxy; a replica killed mid-request or before a request costs no answer; `down`
stops every process it started.
"""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "scripts" / "cluster"
SLM = ROOT / "target" / "release" / "slm"

# Debian installs it in /usr/sbin, which is not on every user's PATH (scripts/cluster looks there too).
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")

pytestmark = pytest.mark.skipif(
    HAPROXY is None,
    reason="haproxy is not installed and could not be (scripts/setup installs Debian's haproxy with apt-get)")


def cluster(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(CLUSTER), *args], capture_output=True, text=True, timeout=240)
    if check:
        assert r.returncode == 0, f"scripts/cluster {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r


def replicas(state: pathlib.Path) -> list[tuple[str, int, int]]:
    rows = [line.split() for line in (state / "replicas").read_text().splitlines() if line.strip()]
    return [(name, int(pid), int(port)) for name, pid, port in rows]


def served(state: pathlib.Path, since: dict[str, int] | None = None, total: int = 0) -> dict[str, int]:
    """Completions each replica has answered, from its own access log (one line per request).

    A replica writes the line when the request's work ends, just after the last byte reaches the
    client; with `since` and `total`, waits (up to 10 s) until `total` lines have been added.
    """
    deadline = time.monotonic() + 10
    while True:
        counts = {name: len(re.findall(r"^POST /v1/(?:chat/)?completions 200",
                                       (state / f"{name}.log").read_text(), re.M))
                  for name, _, _ in replicas(state)}
        if since is None or sum(counts.values()) - sum(since.values()) >= total or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def request(url: str, method: str, path: str, body: dict | None = None, timeout: float = 120):
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    c.request(method, path, body=json.dumps(body).encode() if body is not None else None,
              headers={"content-type": "application/json"})
    r = c.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def chat(url: str, system: str, user: str, key: str | None = None, max_tokens: int = 2, stream: bool = False):
    body = {"model": "tiny", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if key is not None:
        body["prompt_cache_key"] = key
    return request(url, "POST", "/v1/chat/completions", body)


SYSTEM = "You are the assistant of tenant {}. Answer briefly, politely and in plain words."


@pytest.fixture(scope="module")
def models(tiny_dir, tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("cluster-models")
    (d / "tiny").symlink_to(tiny_dir, target_is_directory=True)
    return d


def start(models: pathlib.Path, state: pathlib.Path, n: int = 2, *flags: str) -> str:
    assert SLM.is_file(), "build the host first: scripts/build-all"
    r = cluster("up", str(n), "--models", str(models), "--state", str(state), *flags)
    url = r.stdout.strip().splitlines()[-1]  # the load balancer's URL is the last line of stdout
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url), r.stdout
    return url


@pytest.fixture(scope="module")
def lb(models, tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    url = start(models, state)
    yield url, state
    cluster("down", "--state", str(state))
    print((state / "haproxy.log").read_text()[-3000:])


def test_health_and_models_through_haproxy(lb):
    url, state = lb
    status, headers, body = request(url, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok", body
    assert headers["x-slm-replica"] in {"r1", "r2"}
    status, _, body = request(url, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["tiny"]
    out = cluster("status", "--state", str(state)).stdout
    assert out.count(" up") == 3 and out.strip().endswith(url), out


def test_same_key_same_replica_and_its_cache(lb):
    url, state = lb
    before = served(state)
    answers = [chat(url, SYSTEM.format("blue"), f"Question number {i}?", key="tenant-blue") for i in range(6)]
    assert all(s == 200 for s, _, _ in answers), answers
    after = served(state, before, 6)
    delta = {k: after[k] - before[k] for k in after}
    assert sorted(delta.values()) == [0, 6], delta  # all six on one replica, by its own access log
    assert len({h["x-slm-replica"] for _, h, _ in answers}) == 1
    # That replica's prefix cache served the shared system prompt to every request after the first.
    cached = [json.loads(b)["usage"]["prompt_tokens_details"]["cached_tokens"] for _, _, b in answers]
    assert all(c >= 10 for c in cached[1:]), cached


def test_different_keys_spread(lb):
    url, state = lb
    before = served(state)
    replica_of = {}
    for k in range(16):
        for i in range(2):
            s, h, b = chat(url, SYSTEM.format(k), f"Hello {i}", key=f"tenant-{k}")
            assert s == 200, b
            assert replica_of.setdefault(k, h["x-slm-replica"]) == h["x-slm-replica"], k  # sticky
    after = served(state, before, 32)
    delta = {name: after[name] - before[name] for name in after}
    assert all(d >= 2 for d in delta.values()), delta  # both replicas hold some keys
    assert sum(delta.values()) == 32


def test_system_prompt_routes_without_a_key(lb):
    url, state = lb
    for tenant in ("green", "violet", "amber"):
        before = served(state)
        for i in range(4):
            assert chat(url, SYSTEM.format(tenant), f"Another question {i}?")[0] == 200
        after = served(state, before, 4)
        assert sorted(after[k] - before[k] for k in after) == [0, 4], tenant
    # /v1/completions without a key: the prompt's first 512 bytes.
    preamble = "A preamble all these completions share. " * 14
    assert len(preamble) > 512
    before = served(state)
    for i in range(4):
        s, _, b = request(url, "POST", "/v1/completions",
                          {"model": "tiny", "prompt": f"{preamble}Item {i}", "max_tokens": 2})
        assert s == 200, b
    after = served(state, before, 4)
    assert sorted(after[k] - before[k] for k in after) == [0, 4]


def test_user_field_and_affinity_header_route(lb):
    url, state = lb
    # `user` when there is no prompt_cache_key (the key slm's x-slm-affinity-key response header names).
    before = served(state)
    for i in range(4):
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"Different question {i}"}],
                "max_tokens": 2, "user": "alice"}
        assert request(url, "POST", "/v1/chat/completions", body)[0] == 200
    after = served(state, before, 4)
    assert sorted(after[k] - before[k] for k in after) == [0, 4]
    # The request header x-slm-affinity-key wins over the body.
    host, port = url.removeprefix("http://").split(":")
    seen = set()
    for i in range(4):
        c = http.client.HTTPConnection(host, int(port), timeout=60)
        c.request("POST", "/v1/chat/completions", headers={"content-type": "application/json",
                                                           "x-slm-affinity-key": "tenant-header"},
                  body=json.dumps({"model": "tiny", "max_tokens": 2, "prompt_cache_key": f"other-{i}",
                                   "messages": [{"role": "user", "content": f"Hi {i}"}]}).encode())
        r = c.getresponse()
        r.read()
        assert r.status == 200
        seen.add(r.getheader("x-slm-replica"))
    assert len(seen) == 1, seen
    assert "key=header" in (state / "haproxy.log").read_text()


def test_roundrobin_frontend_alternates(lb):
    url, state = lb
    rr = (state / "url-roundrobin").read_text().strip()
    seen = [chat(rr, SYSTEM.format("rr"), "Hi", key="tenant-rr")[1]["x-slm-replica"] for _ in range(4)]
    assert sorted(seen) == ["r1", "r1", "r2", "r2"], seen


def running(port: int) -> float:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    return sum(float(v) for v in re.findall(r"^slm_requests_running\{[^}]*\} (\S+)$", text, re.M))


def test_killed_replica_loses_no_request(models, tmp_path):
    state = tmp_path / "cluster"
    url = start(models, state)
    try:
        by_name = {name: (pid, port) for name, pid, port in replicas(state)}
        s, h, _ = chat(url, SYSTEM.format("doomed"), "Hi", key="tenant-doomed")
        assert s == 200
        victim = h["x-slm-replica"]
        pid, port = by_name[victim]
        # A long request in flight on the victim (non-streaming: nothing is sent before it ends).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(request, url, "POST", "/v1/completions",
                              {"model": "tiny", "prompt": "Tenant doomed: count", "max_tokens": 200,
                               "temperature": 0, "prompt_cache_key": "tenant-doomed"})
            deadline = time.time() + 30
            while running(port) < 1 and not fut.done():
                assert time.time() < deadline, "the long request never started"
                time.sleep(0.02)
            in_flight = not fut.done()
            print("long request in flight at the kill:", in_flight)
            os.kill(pid, signal.SIGKILL)
            # Right after the kill, before the health checks notice: same key, streamed and not.
            after = [chat(url, SYSTEM.format("doomed"), f"Still there {i}?", key="tenant-doomed",
                          stream=bool(i % 2)) for i in range(6)]
            s, h, b = fut.result(timeout=120)
        assert s == 200, b
        assert all(s == 200 for s, _, _ in after), after
        others = {h["x-slm-replica"] for _, h, _ in after}
        assert victim not in others, others
        assert all(b"[DONE]" in b for s, _, b in after[1::2])  # the streams completed
        assert request(url, "GET", "/health")[0] == 200
        log = (state / "haproxy.log").read_text()
        if in_flight:  # HAProxy replayed it on the other replica
            assert re.search(r"slm_affinity/r\d .* rc=\+?[1-9] \"POST /v1/completions", log), log
        # HAProxy takes the dead replica out within its check interval (fall 2 x 1 s).
        deadline = time.time() + 10
        while f"slm_affinity/{victim} is DOWN" not in (state / "haproxy.log").read_text():
            assert time.time() < deadline, (state / "haproxy.log").read_text()
            time.sleep(0.2)
        assert chat(url, SYSTEM.format("doomed"), "And now?", key="tenant-doomed")[0] == 200
    finally:
        cluster("down", "--state", str(state))


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: nobody may be reaping orphans in a container)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_down_stops_everything(models, tmp_path):
    state = tmp_path / "cluster"
    url = start(models, state, 2, "--policy", "roundrobin")
    reps = replicas(state)
    haproxy_pid = int((state / "haproxy.pid").read_text())
    lb_port = int(url.rsplit(":", 1)[1])
    # A second `up` on the same state refuses (it would orphan the first cluster).
    again = cluster("up", "2", "--models", str(models), "--state", str(state), check=False)
    assert again.returncode != 0 and "already runs" in again.stderr
    cluster("down", "--state", str(state))
    assert all(gone(pid) for pid in [haproxy_pid] + [pid for _, pid, _ in reps])
    assert not any(listening(p) for p in [lb_port] + [port for _, _, port in reps])
    assert not (state / "replicas").exists() and not (state / "haproxy.pid").exists()
    assert (state / "r1.log").exists()  # logs stay
    assert "no cluster" in cluster("down", "--state", str(state)).stderr  # a second down is harmless


def test_configurations_are_valid_and_route_alike():
    """deploy/haproxy.cfg and its Kubernetes variant pass `haproxy -c` and hash on the same key."""
    rules = {}
    for cfg in (ROOT / "deploy" / "haproxy.cfg", ROOT / "deploy" / "kubernetes" / "haproxy.cfg"):
        r = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True)
        assert r.returncode == 0 and "Warning" not in r.stdout + r.stderr, r.stdout + r.stderr
        backend = cfg.read_text().split("\nbackend slm_affinity\n", 1)[1].split("\nbackend ", 1)[0]
        rules[cfg] = [line.strip() for line in backend.splitlines()
                      if line.strip().startswith(("http-request", "balance", "hash-type", "default-server"))]
    a, b = rules.values()
    assert a == b and len(a) >= 10
