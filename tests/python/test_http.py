"""`slm serve`: the OpenAI-compatible API, tested with the official openai SDK and raw HTTP."""
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

from conftest import ROOT

SLM = ROOT / "target" / "release" / "slm"
MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of Germany?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_serve(models: pathlib.Path, log_path: pathlib.Path, *flags: str):
    """`slm serve FLAGS` on a free port, once it answers /health: its base URL, process and log file."""
    assert SLM.is_file(), "build the host first: scripts/build-all"
    port = _free_port()
    log = open(log_path, "w+")
    proc = subprocess.Popen([str(SLM), "serve", "--listen", f"127.0.0.1:{port}", "--models", str(models), *flags],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 120
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            log.seek(0)
            pytest.fail(f"slm serve did not become ready:\n{log.read()}")
        time.sleep(0.3)
    return f"http://127.0.0.1:{port}", proc, log


def _stop_serve(proc, log):
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0  # Ctrl-C is a clean shutdown
    log.seek(0)
    print(log.read()[-4000:])


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    """A running `slm serve`: its base URL, the file its stderr (the access log) goes to, its process."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    url, proc, log = _start_serve(ROOT / "models", log_path)
    yield url, log_path, proc
    _stop_serve(proc, log)


@pytest.fixture(scope="module")
def server(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def server_log(served) -> pathlib.Path:
    return served[1]


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _raw(server: str, method: str, path: str, body: bytes | None = None, headers=None):
    host, port = server.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=120)
    c.request(method, path, body=body, headers=headers or {"content-type": "application/json"})
    r = c.getresponse()
    return r.status, dict(r.getheaders()), r.read()


def test_models_and_health(server, client):
    assert MODEL in [m.id for m in client.models.list().data]
    status, _, body = _raw(server, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_chat_non_streaming(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                       max_tokens=24, temperature=0)
    text = r.choices[0].message.content
    assert "Berlin" in text
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_text_equals_non_streamed(client):
    kw = dict(model=MODEL, messages=[{"role": "system", "content": "Answer briefly."},
                                     {"role": "user", "content": "Name three colors."}], max_tokens=32, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert [c for c in chunks if c.choices][0].choices[0].delta.role == "assistant"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # streamed in pieces


def test_usage_agrees_with_tokenizer(client, model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False).ids)
    assert r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop"


def test_completions_streaming_and_stop(client):
    kw = dict(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == full and "5" in full
    cut = client.completions.create(stop=[" 7"], **kw)
    assert cut.choices[0].finish_reason == "stop" and " 7" not in cut.choices[0].text
    assert full.startswith(cut.choices[0].text)


def test_sse_framing(server):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                       "stream": True, "temperature": 0}).encode()
    status, headers, raw = _raw(server, "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = raw.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ")
        assert json.loads(e[len("data: "):])["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("body,status,code", [
    (b"{not json", 400, None),
    (json.dumps({"model": MODEL}).encode(), 400, None),  # missing messages
    (json.dumps({"model": MODEL, "messages": "hello"}).encode(), 400, None),  # wrong type
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}).encode(), 400, None),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}).encode(), 400, None),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}).encode(), 400, None),
    (json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}).encode(), 400, None),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}).encode(), 400, None),
    (json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404, "model_not_found"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "word " * 9000}]}).encode(), 400, "context_length_exceeded"),
])
def test_bad_requests(server, body, status, code):
    got, headers, raw = _raw(server, "POST", "/v1/chat/completions", body)
    assert got == status, raw
    assert headers["content-type"].startswith("application/json")
    err = json.loads(raw)["error"]
    assert err["message"] and err["type"]
    if code:
        assert err["code"] == code
    # The server keeps serving.
    assert _raw(server, "GET", "/health")[0] == 200


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 1.5), ("min_p", 1),
                                         ("repetition_penalty", 0)])
def test_an_invalid_option_is_named_in_param(server, field, value):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], field: value}
    got, _, raw = _raw(server, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert got == 400, raw
    err = json.loads(raw)["error"]
    assert err["param"] == field, err
    assert err["type"] == "invalid_request_error"


def test_a_request_without_host_is_a_bad_request(server):
    """HTTP/1.1 requires Host: a clear 400 in OpenAI's shape, not a 500 from the host's internals."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"400", raw
    err = json.loads(body)["error"]
    assert err["type"] == "invalid_request_error" and "Host" in err["message"], err
    assert _raw(server, "GET", "/health")[0] == 200


def test_one_broken_model_does_not_break_the_others(tmp_path):
    """A model directory with an unreadable config.json is left out of /v1/models; /health and the
    other models keep working, and a request naming it gets a clear model error."""
    models = tmp_path / "models"
    shutil.copytree(ROOT / "target" / "test-models" / "tiny", models / "tiny")
    shutil.copytree(ROOT / "target" / "test-models" / "tiny", models / "broken")
    (models / "broken" / "config.json").write_text("{not json")
    url, proc, log = _start_serve(models, tmp_path / "serve.log")
    try:
        status, _, body = _raw(url, "GET", "/v1/models")
        assert status == 200, body
        assert [m["id"] for m in json.loads(body)["data"]] == ["tiny"]
        ask = lambda model: _raw(url, "POST", "/v1/completions",
                                 json.dumps({"model": model, "prompt": "a b", "max_tokens": 2}).encode())
        assert ask("tiny")[0] == 200
        status, _, body = ask("broken")
        assert status == 500, body
        assert "config.json" in json.loads(body)["error"]["message"], body
        assert ask("absent")[0] == 404
    finally:
        _stop_serve(proc, log)


def test_wrong_method_and_path(server):
    assert _raw(server, "GET", "/v1/chat/completions")[0] == 405
    assert _raw(server, "POST", "/v1/nothing-here", b"{}")[0] == 404


def _counter(server: str, name: str) -> float:
    text = _raw(server, "GET", "/metrics")[2].decode()
    m = re.search(rf'^{name}{{model="{MODEL}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_eight_concurrent_streams(server, client):
    """Concurrent greedy streams run their steps together (continuous batching), and each answer is
    the one it gets alone."""
    questions = [f"What is {a} plus {a}?" for a in range(1, 9)]

    def ask(q: str, stream: bool) -> str:
        kw = dict(model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0)
        if not stream:
            return client.chat.completions.create(**kw).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw) if c.choices)

    expected = [ask(q, False) for q in questions]
    counters = ("slm_batched_steps_total", "slm_generation_tokens_total")
    before = [_counter(server, c) for c in counters]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda q: ask(q, True), questions))
    assert got == expected
    assert all(g for g in got)
    # Most of the streams' steps ran with others'.
    batched, steps = (_counter(server, c) - b for c, b in zip(counters, before))
    assert batched >= steps / 2, (batched, steps)


def _access_lines(log: pathlib.Path, path: str) -> list[re.Match]:
    pattern = re.compile(rf"^POST {re.escape(path)} (\d+) tokens (\d+)\+(\d+) (\d+) ms", re.M)
    return list(pattern.finditer(log.read_text()))


def test_access_log(server, client, server_log):
    before = len(_access_lines(server_log, "/v1/completions"))
    client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=5, temperature=0)
    time.sleep(0.5)
    lines = _access_lines(server_log, "/v1/completions")
    assert len(lines) == before + 1
    status, prompt, generated, _ms = (int(g) for g in lines[-1].groups())
    assert status == 200 and prompt == 4 and generated == 5


def test_client_disconnect_stops_generation(server, client, server_log):
    host, port = server.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
                       "max_tokens": 500, "stream": True}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    before = len(_access_lines(server_log, "/v1/chat/completions"))
    assert s.recv(256).startswith(b"HTTP/1.1 200")
    s.close()
    # The stream's generation stops soon after: its log line shows far fewer than 500 tokens.
    deadline = time.time() + 60
    while time.time() < deadline:
        lines = _access_lines(server_log, "/v1/chat/completions")
        if len(lines) > before:
            assert int(lines[-1].group(3)) < 100, lines[-1].group(0)
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"generation did not stop:\n{server_log.read_text()[-2000:]}")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0)
    assert "Berlin" in r.choices[0].message.content


def test_prefix_cache_reuses_a_shared_system_prompt(client):
    system = ("You are a museum guide in Amsterdam. You answer visitors' questions about paintings, "
              "painters and opening hours in one friendly sentence, and you never make up facts.")

    def ask(question: str):
        return client.chat.completions.create(
            model=MODEL, max_tokens=12, temperature=0,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])

    first = ask("Who painted The Night Watch?")
    assert first.usage.prompt_tokens_details.cached_tokens < 10  # at most the template's opening tokens
    ask("When does the museum open?")  # another visitor, same system prompt
    again = ask("Who painted The Night Watch?")
    assert again.usage.prompt_tokens_details.cached_tokens >= 40
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    assert again.choices[0].message.content == first.choices[0].message.content


def test_running_out_of_file_descriptors_does_not_stop_the_server(served):
    """More idle connections than the process may open files: accepting fails (EMFILE) until some
    close, and the server keeps serving (it used to exit on the first failed accept). Runs last:
    it lowers the running server's descriptor limit for a moment."""
    server, _, proc = served
    host, port = server.removeprefix("http://").split(":")
    limit = subprocess.run(["prlimit", f"--pid={proc.pid}", "--nofile", "--output=SOFT", "--noheadings"],
                           capture_output=True, text=True, check=True).stdout.strip()
    low = len(os.listdir(f"/proc/{proc.pid}/fd")) + 16
    subprocess.run(["prlimit", f"--pid={proc.pid}", f"--nofile={low}:"], check=True)
    socks = []
    try:
        socks = [socket.create_connection((host, int(port)), timeout=5) for _ in range(low + 32)]
        time.sleep(1.0)  # the server accepts what it can, then fails on the rest
        assert proc.poll() is None, "slm serve exited when it ran out of file descriptors"
    finally:
        for s in socks:
            s.close()
        subprocess.run(["prlimit", f"--pid={proc.pid}", f"--nofile={limit}:"], check=True)
    deadline = time.time() + 30
    while True:
        try:
            if _raw(server, "GET", "/health")[0] == 200:
                break
        except OSError:
            pass
        assert time.time() < deadline, "slm serve did not answer again after the connections closed"
        time.sleep(0.2)
