"""`slm serve` as strangers meet it (issue 16): API keys, body and time limits, connection and
generation caps, instance memory, metrics, symlinked models, and no internals in errors.
Each test starts its own server with the flags it needs (tests/python/test_http.py has the API)."""
from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import pathlib
import re
import socket
import time

import openai
import pytest

from conftest import ROOT
from test_http import _raw, _start_serve, _stop_serve

MODELS = ROOT / "models"
TINY = ROOT / "target" / "test-models" / "tiny"


@contextlib.contextmanager
def serving(models: pathlib.Path, tmp_path: pathlib.Path, *flags: str):
    url, proc, log = _start_serve(models, tmp_path / "serve.log", *flags)
    try:
        yield url, proc, tmp_path / "serve.log"
    finally:
        _stop_serve(proc, log)


@pytest.fixture
def tiny_models(tmp_path) -> pathlib.Path:
    """A models directory holding only the tiny model (fast to load and run)."""
    d = tmp_path / "models"
    d.mkdir()
    (d / "tiny").symlink_to(TINY)
    return d


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_status(s: socket.socket) -> int | None:
    """The status of the response on `s`, or None when the server closed it without one."""
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            return None
        data += chunk
    return int(data.split(b" ")[1])


def _chat(url: str, model: str, content: str = "Hi", **extra) -> tuple[int, dict, dict]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}], **extra})
    status, headers, raw = _raw(url, "POST", "/v1/chat/completions", body.encode())
    return status, {k.lower(): v for k, v in headers.items()}, json.loads(raw)


def test_api_keys(tmp_path, tiny_models):
    keys = tmp_path / "keys"
    keys.write_text("# one key per line\nsk-from-file\n\n")
    with serving(tiny_models, tmp_path, "--api-key", "sk-flag", "--api-key-file", str(keys)) as (url, _, log):
        assert _raw(url, "GET", "/health")[0] == 200  # load balancers need no key
        for key in (None, "sk-wrong", "sk-fla"):
            c = openai.OpenAI(base_url=url + "/v1", api_key=key or "unused", max_retries=0)
            headers = {} if key else {"Authorization": ""}
            with pytest.raises(openai.AuthenticationError) as e:
                c.models.list(extra_headers=headers)
            assert e.value.status_code == 401
            assert e.value.body["code"] == "invalid_api_key"
        for key in ("sk-flag", "sk-from-file"):
            c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
            assert [m.id for m in c.models.list()] == ["tiny"]
            r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3)
            assert r.usage.completion_tokens <= 3
        status, headers, _ = _raw(url, "GET", "/metrics")
        assert status == 401 and headers.get("www-authenticate") == "Bearer"
        assert _raw(url, "GET", "/metrics", headers={"Authorization": "Bearer sk-flag"})[0] == 200
    text = log.read_text()
    assert "sk-wrong" not in text and "sk-flag" not in text and "sk-from-file" not in text
    # --public-metrics: scrapers without a key get /metrics, and nothing else.
    with serving(tiny_models, tmp_path, "--api-key", "sk-flag", "--public-metrics") as (url, _, _):
        assert _raw(url, "GET", "/metrics")[0] == 200
        assert _raw(url, "GET", "/v1/models")[0] == 401


def test_body_size_and_time(tmp_path, tiny_models):
    with serving(tiny_models, tmp_path, "--max-body-kib", "1", "--body-timeout", "2") as (url, _, _):
        # Announced too large: refused before a byte of the body is read.
        s = _connect(url)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 50000000\r\n\r\n")
        t = time.time()
        assert _read_status(s) == 413
        assert time.time() - t < 2
        s.close()
        # Chunked, with no length announced: refused once it passes the limit.
        s = _connect(url)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        s.sendall(b"800\r\n" + b"x" * 0x800 + b"\r\n")
        assert _read_status(s) == 413
        s.close()
        # A chunk announcing 2^64-1 bytes, then silence: refused, not waited on forever.
        s = _connect(url)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"FFFFFFFFFFFFFFFF\r\n{")
        assert _read_status(s) in (408, 413)
        s.close()
        # Too slow: 408 after --body-timeout.
        s = _connect(url)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                  b'{"messages":')
        t = time.time()
        assert _read_status(s) == 408
        assert 1.5 < time.time() - t < 10
        s.close()
        status, _, body = _raw(url, "POST", "/v1/chat/completions", b"x" * 2000)
        assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"


def test_stalled_clients_do_not_take_the_api_down(tmp_path, tiny_models):
    """The outage of the issue: 128+ connections that send headers and part of a body held every
    instance; headers were never timed out. Now bodies are read before an instance exists, and
    slow headers and idle connections are closed."""
    with serving(tiny_models, tmp_path, "--header-timeout", "2", "--body-timeout", "4") as (url, _, _):
        stalled_bodies, stalled_heads = [], []
        for _ in range(200):
            s = _connect(url)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
                      b'{"messages":')
            stalled_bodies.append(s)
        for _ in range(20):
            s = _connect(url)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
            stalled_heads.append(s)
        idle = _connect(url)  # opened, never used
        time.sleep(0.5)
        for _ in range(3):
            t = time.time()
            assert _raw(url, "GET", "/health")[0] == 200
            assert time.time() - t < 1.0
        status, _, body = _chat(url, "tiny", max_tokens=4)
        assert status == 200, body
        # The slow ones are answered or closed once their time is up.
        time.sleep(4.5)
        assert {_read_status(s) for s in stalled_heads} == {None}
        assert _read_status(idle) is None
        assert {_read_status(s) for s in stalled_bodies} == {408}
        for s in stalled_bodies + stalled_heads + [idle]:
            s.close()


def test_connection_cap(tmp_path, tiny_models):
    with serving(tiny_models, tmp_path, "--max-connections", "4") as (url, _, _):
        time.sleep(0.5)  # the readiness probe's connection is closed
        held = [_connect(url) for _ in range(4)]
        time.sleep(0.3)
        extra = _connect(url)
        data = extra.recv(4096)
        assert data.startswith(b"HTTP/1.1 503"), data
        assert b"too_many_connections" in data and b"retry-after: 1" in data
        extra.close()
        for s in held:
            s.close()
        deadline = time.time() + 10
        while True:
            try:
                if _raw(url, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "connections were not given back"
            time.sleep(0.2)


def _stream_started(url: str, model: str, prompt: str, max_tokens: int):
    """A streaming chat request whose first chunk has arrived: its connection and response."""
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=120)
    body = {"model": model, "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}]}
    c.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"content-type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    assert r.readline().startswith(b"data: ")
    return c, r


def _metric(url: str, name: str) -> float:
    text = _raw(url, "GET", "/metrics")[2].decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics:\n{text}"
    return float(m.group(1))


def test_generation_queue(tmp_path):
    """--max-running 1 --max-queue 1: one runs, one waits, the next is refused with Retry-After."""
    model = "smollm2-135m-instruct"
    with serving(MODELS, tmp_path, "--max-running", "1", "--max-queue", "1") as (url, _, _):
        conn, first = _stream_started(url, model, "Write a long story about the sea.", 40)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            queued = pool.submit(_chat, url, model, "Hi", max_tokens=3)
            deadline = time.time() + 10
            while _metric(url, f'slm_requests_waiting{{model="{model}"}}') != 1:
                assert time.time() < deadline, "the second request is not waiting"
                time.sleep(0.1)
            assert _metric(url, f'slm_requests_running{{model="{model}"}}') == 1
            status, headers, body = _chat(url, model, "Hi", max_tokens=3)
            assert status == 503, body
            assert body["error"]["code"] == "overloaded" and headers["retry-after"] == "1"
            # Requests that do not generate are not queued.
            assert _raw(url, "GET", "/v1/models")[0] == 200
            rest = first.read()
            assert rest.rstrip().endswith(b"data: [DONE]")
            conn.close()
            status, _, body = queued.result(timeout=60)
            assert status == 200, body
        assert _metric(url, f'slm_requests_running{{model="{model}"}}') == 0


def test_request_timeout(tmp_path):
    with serving(MODELS, tmp_path, "--request-timeout", "2") as (url, proc, _):
        body = json.dumps({"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 1000})
        t = time.time()
        status, _, raw = _raw(url, "POST", "/v1/completions", body.encode())
        assert status == 503, raw
        assert json.loads(raw)["error"]["code"] == "timeout"
        assert time.time() - t < 5
        assert _raw(url, "GET", "/health")[0] == 200


def test_health_answers_under_full_load(tmp_path):
    """Inference used to run on the server's async workers: 20 long prompts made /health take
    83 s. Now inference steps leave them."""
    model = "smollm2-135m-instruct"
    prompt = "Tell me everything about the history of shipbuilding. " * 20
    with serving(MODELS, tmp_path, "--max-running", "3") as (url, _, _):
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            streams = list(pool.map(lambda _: _stream_started(url, model, prompt, 60), range(3)))
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            waiting = [pool.submit(_chat, url, model, prompt, max_tokens=2) for _ in range(6)]
            time.sleep(0.5)
            latencies = []
            for _ in range(5):
                t = time.time()
                assert _raw(url, "GET", "/health")[0] == 200
                latencies.append(time.time() - t)
                time.sleep(0.1)
            print("GET /health under load, s:", [round(x, 3) for x in latencies])
            assert max(latencies) < 1.0, latencies
            for conn, r in streams:
                r.read()
                conn.close()
            assert all(w.result(timeout=300)[0] == 200 for w in waiting)


def test_instance_memory_limit(tmp_path, tiny_models):
    """An instance that runs out of its memory fails its request alone, with no internals in the
    answer (it used to send the wasm backtrace)."""
    with serving(tiny_models, tmp_path, "--max-instance-memory-mib", "4") as (url, _, log):
        status, _, body = _chat(url, "tiny", max_tokens=2)
        assert status == 500, body
        message = body["error"]["message"]
        assert "backtrace" not in message and "wasm" not in message and str(ROOT) not in message
        assert "the details are in its log" in message
    assert "POST /v1/chat/completions" in log.read_text()


def test_metrics(tmp_path, tiny_models):
    with serving(tiny_models, tmp_path) as (url, _, _):
        status, _, body = _chat(url, "tiny", max_tokens=4)
        assert status == 200, body
        status, headers, raw = _raw(url, "GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
        text = raw.decode()
        assert text.rstrip().endswith("# EOF")
        usage = body["usage"]
        assert _metric(url, 'slm_http_requests_total{route="/v1/chat/completions",status="200"}') == 1
        assert _metric(url, 'slm_prompt_tokens_total{model="tiny"}') == usage["prompt_tokens"]
        assert _metric(url, 'slm_generation_tokens_total{model="tiny"}') == usage["completion_tokens"]
        assert _metric(url, 'slm_time_to_first_token_seconds_count{model="tiny"}') == 1
        assert _metric(url, 'slm_inter_token_latency_seconds_count{model="tiny"}') == usage["completion_tokens"] - 1
        assert _metric(url, 'slm_requests_running{model="tiny"}') == 0
        assert _metric(url, 'slm_kv_cache_tokens{model="tiny"}') == 0
        # A path clients make up is counted as `other`, so they cannot grow the label set.
        _raw(url, "GET", "/no/such/route")
        assert _metric(url, 'slm_http_requests_total{route="other",status="404"}') == 1


def test_symlinked_model_directory(tmp_path, tiny_models):
    """A model directory that is a symbolic link (tiny_models holds one) is listed and runs: the
    guest's sandbox does not follow links, so the host mounts it where the guest looks."""
    with serving(tiny_models, tmp_path) as (url, _, _):
        models = json.loads(_raw(url, "GET", "/v1/models")[2])
        assert [m["id"] for m in models["data"]] == ["tiny"]
        status, _, body = _chat(url, "tiny", max_tokens=3)
        assert status == 200, body


def test_errors_name_no_host_paths(tmp_path):
    models = tmp_path / "models"
    broken = models / "broken"
    broken.mkdir(parents=True)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / f).write_bytes((TINY / f).read_bytes())
    (broken / "model.onnx").write_bytes(b"\x08\x07 not a model")
    with serving(models, tmp_path) as (url, _, _):
        status, _, body = _chat(url, "broken", max_tokens=2)
        assert status >= 400
        assert str(tmp_path) not in json.dumps(body), body


def test_sigterm_drains_requests_in_progress(tmp_path):
    """SIGTERM (what Kubernetes sends; also as PID 1): no new connections, the stream in progress
    ends whole, then the process exits 0. With --drain-timeout 1 a longer one is cut."""
    import signal
    import subprocess

    model = "smollm2-135m-instruct"
    url, proc, log = _start_serve(MODELS, tmp_path / "serve.log")
    conn, first = _stream_started(url, model, "Write a long story about the sea.", 64)
    proc.send_signal(signal.SIGTERM)
    rest = first.read()
    assert rest.rstrip().endswith(b"data: [DONE]"), rest[-200:]
    conn.close()
    assert proc.wait(timeout=30) == 0
    log.seek(0)
    out = log.read()
    assert "terminate: shutting down" in out, out
    with pytest.raises(OSError):
        _connect(url).recv(1)

    url, proc, log = _start_serve(MODELS, tmp_path / "serve2.log", "--drain-timeout", "1")
    conn, first = _stream_started(url, model, "Write a long story about the sea.", 2000)
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert time.time() - t < 5
    try:
        cut = first.read()
    except http.client.IncompleteRead as e:  # the connection closed inside a chunk
        cut = e.partial
    assert not cut.rstrip().endswith(b"data: [DONE]")
    log.seek(0)
    assert "after --drain-timeout" in log.read()
