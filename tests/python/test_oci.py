"""scripts/oci against a real registry (Debian's docker-registry, started here on localhost).

Pushes the `slm serve` image, the components and the tiny model; pulls them back with existing
clients (ORAS's Python client, and skopeo, the container tooling's); then runs what was pulled:
the portable component on stock `wasmtime serve` with the pulled model, and the image's own
entrypoint from its unpacked root filesystem (chroot in fresh mount and PID namespaces, as user
65532, /proc mounted: what a container runtime does, minus the cgroups). Both answer.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import tarfile
import time
import urllib.request

import pytest

from test_portable import WASMTIME, chat_request, free_port, post_json, server

ROOT = pathlib.Path(__file__).resolve().parents[2]
OCI = ROOT / "scripts" / "oci"
DIST = ROOT / "dist"
TAG = "test"
REGISTRY_BIN = shutil.which("docker-registry") or shutil.which("registry")
SKOPEO = shutil.which("skopeo")

pytestmark = pytest.mark.skipif(
    REGISTRY_BIN is None or SKOPEO is None,
    reason="docker-registry or skopeo is not installed and could not be (scripts/setup installs them with apt-get)")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A local OCI registry: host:port."""
    d = tmp_path_factory.mktemp("registry")
    port = free_port()
    (d / "config.yml").write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {d / 'data'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
    with open(d / "log", "wb") as log:
        proc = subprocess.Popen([REGISTRY_BIN, "serve", str(d / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (d / "log").read_text()
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def oci(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(OCI), *args], capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, f"scripts/oci {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def models(tiny_dir, tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("oci-models")
    (d / "tiny").symlink_to(tiny_dir, target_is_directory=True)
    return d


@pytest.fixture(scope="module")
def pushed(registry, models) -> dict[str, str]:
    """What `scripts/oci push` printed: repository -> digest."""
    out = oci("push", registry, "--models", str(models), "--tag", TAG, "--insecure").stdout
    refs = {}
    for line in out.splitlines():
        ref, _, digest = line.partition("@")
        assert ref.startswith(f"{registry}/edge-slm/") and ref.endswith(f":{TAG}"), line
        assert digest.startswith("sha256:"), line
        refs[ref.removeprefix(f"{registry}/").removesuffix(f":{TAG}")] = digest
    return refs


def test_push_names_every_part_and_is_reproducible(registry, models, pushed):
    components = {f"edge-slm/{w.stem}" for w in DIST.glob("*.wasm")}
    assert components and set(pushed) == {"edge-slm/slm", "edge-slm/models/tiny"} | components, pushed
    # The same files give the same layers and manifests: a second push changes nothing.
    again = oci("push", registry, "--models", str(models), "--tag", TAG, "--insecure", "--only", "models").stdout
    assert again.strip() == f"{registry}/edge-slm/models/tiny:{TAG}@{pushed['edge-slm/models/tiny']}"


def test_push_errors_are_one_line(models):
    r = oci("push", f"127.0.0.1:{free_port()}", "--models", str(models), "--only", "models", "--insecure", check=False)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("oci: error: "), r.stderr
    assert "Traceback" not in r.stderr
    r = oci("push", "127.0.0.1:1", "--only", "nothing", check=False)
    assert r.returncode == 1 and "--only: unknown part(s) nothing" in r.stderr, r.stderr


def test_pulled_component_and_model_answer_on_stock_wasmtime(registry, pushed, tiny_dir, tmp_path):
    import oras.provider

    client = oras.provider.Registry(hostname=registry, insecure=True)
    ref = f"{registry}/edge-slm/slm-http-portable:{TAG}"
    manifest = client.get_manifest(ref)
    assert manifest["config"]["mediaType"] == "application/vnd.wasm.config.v0+json"
    assert [layer["mediaType"] for layer in manifest["layers"]] == ["application/wasm"]
    [wasm] = client.pull(target=ref, outdir=str(tmp_path / "components"))
    assert pathlib.Path(wasm).read_bytes() == (DIST / "slm-http-portable.wasm").read_bytes()

    # The model, pulled with scripts/oci (the same client): unpacked into models/tiny/.
    out = oci("pull", f"{registry}/edge-slm/models/tiny:{TAG}", str(tmp_path / "models"), "--insecure").stdout
    assert out.strip() == str(tmp_path / "models" / "tiny")
    pulled = tmp_path / "models" / "tiny"
    assert sorted(p.name for p in pulled.iterdir()) == sorted(
        p.name for p in tiny_dir.iterdir() if p.name in {"model.onnx", "config.json", "generation_config.json",
                                                         "tokenizer.json", "tokenizer_config.json"})
    assert (pulled / "model.onnx").read_bytes() == (tiny_dir / "model.onnx").read_bytes()

    port = free_port()
    cmd = [str(WASMTIME), "serve", "-S", "cli", "--dir", f"{tmp_path / 'models'}::/models",
           "--addr", f"127.0.0.1:{port}", wasm]
    with server(cmd, port, tmp_path / "wasmtime-serve.log") as base:
        status, body = post_json(base + "/v1/chat/completions", dict(chat_request(), model="tiny", max_tokens=4))
        assert status == 200, body
        assert body["model"] == "tiny" and body["usage"]["completion_tokens"] == 4, body


def blob(layout: pathlib.Path, digest: str) -> pathlib.Path:
    path = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
    assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{path}: digest mismatch"
    return path


def unpack_image(ref: str, layout: pathlib.Path, rootfs: pathlib.Path) -> dict:
    """skopeo copies `ref` into an OCI layout; its layers are checked against the config's diff_ids
    (as a runtime does) and unpacked into `rootfs`. Returns the image config."""
    subprocess.run([SKOPEO, "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:img"],
                   check=True, capture_output=True, timeout=300)
    index = json.loads((layout / "index.json").read_text())
    [entry] = [m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "img"]
    manifest = json.loads(blob(layout, entry["digest"]).read_text())
    config = json.loads(blob(layout, manifest["config"]["digest"]).read_text())
    assert config["os"] == "linux" and config["rootfs"]["type"] == "layers", config
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"])
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"]):
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        path = blob(layout, layer["digest"])
        with gzip.open(path) as f:
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        assert "sha256:" + h.hexdigest() == diff_id, "layer does not match the config's diff_id"
        with tarfile.open(path) as t:
            t.extractall(rootfs, filter="tar")
    return config


def test_slm_image_runs_its_entrypoint_with_the_model_image(registry, pushed, tmp_path):
    unshare, chroot = shutil.which("unshare"), shutil.which("chroot")
    if os.geteuid() != 0 or unshare is None or chroot is None:
        pytest.skip("running the image's root filesystem needs root and unshare (chroot, mount namespaces)")
    rootfs = tmp_path / "rootfs"
    config = unpack_image(f"{registry}/edge-slm/slm:{TAG}", tmp_path / "layout", rootfs)["config"]
    assert config["Entrypoint"] == ["/usr/local/bin/slm"] and config["User"] == "65532:65532", config
    assert config["Cmd"] == ["serve", "--listen", "0.0.0.0:8080", "--models", "/models"], config
    # The model image mounts at /models (a Kubernetes image volume): unpacking it there is the same.
    unpack_image(f"{registry}/edge-slm/models/tiny:{TAG}", tmp_path / "layout", rootfs / "models")
    assert (rootfs / "models" / "tiny" / "model.onnx").is_file()
    (rootfs / "proc").mkdir(exist_ok=True)

    port = free_port()
    cmd = config["Cmd"][:]
    cmd[cmd.index("--listen") + 1] = f"127.0.0.1:{port}"  # as `docker run IMAGE serve --listen ...` would
    env = dict(e.split("=", 1) for e in config["Env"])
    run = [unshare, "--mount", "--pid", "--fork", f"--mount-proc={rootfs / 'proc'}",
           chroot, f"--userspec={config['User']}", str(rootfs), *config["Entrypoint"], *cmd]
    with server(run, port, tmp_path / "slm-image.log", env=env) as base:
        status, body = post_json(base + "/v1/chat/completions", dict(chat_request(), model="tiny", max_tokens=4))
        assert status == 200, body
        assert body["model"] == "tiny" and body["usage"]["completion_tokens"] == 4, body
    # The compiled component was cached where the image points SLM_CACHE_DIR, writable as user 65532.
    assert list((rootfs / "var" / "cache" / "slm").glob("*.cwasm")), (tmp_path / "slm-image.log").read_text()
