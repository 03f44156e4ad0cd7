"""scripts/oci: push edge-slm to an OCI registry and pull it back, with the ORAS Python client.

What `push REGISTRY` writes (TAG defaults to the workspace version):

  REGISTRY/edge-slm/slm:TAG             container image (linux): /usr/local/bin/slm, the components
                                        next to it (where slm looks for them), the C libraries it
                                        links; runs `slm serve --listen 0.0.0.0:8080 --models /models`
                                        as user 65532
  REGISTRY/edge-slm/<component>:TAG     each dist/*.wasm as a Wasm OCI artifact (config
                                        application/vnd.wasm.config.v0+json, one application/wasm
                                        layer), the layout wkg and other Wasm tools read
  REGISTRY/edge-slm/models/<name>:TAG   a model directory, only the files slm reads (model.onnx and
                                        the JSON files; not the model_*.onnx variants), as one
                                        tar+gzip layer holding <name>/...: an OCI image that mounts
                                        as a Kubernetes image volume at /models, and that `oras pull`
                                        unpacks into <name>/

Layers are reproducible (sorted entries, zero times and owners), so pushing the same files again
uploads nothing new. `pull REF DIR` writes an artifact's files (and unpacks a model) into DIR.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tarfile
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
SLM = ROOT / "target" / "release" / "slm"
DIST = ROOT / "dist"

OCI_IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR_GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
WASM_CONFIG = "application/vnd.wasm.config.v0+json"
WASM_LAYER = "application/wasm"
TITLE = "org.opencontainers.image.title"
UNPACK = "io.deis.oras.content.unpack"  # ORAS's mark for a directory packed as tar+gzip

# The files of a model directory that slm reads (host/src/registry.rs, guest/generator/src/model.rs).
MODEL_FILES = ("model.onnx", "model.onnx.data", "config.json", "generation_config.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
NONROOT = 65532  # the conventional unprivileged user of distroless images


def say(msg: str) -> None:
    print(f"oci: {msg}", file=sys.stderr, flush=True)


def die(msg: str) -> None:
    print(f"oci: error: {msg}", file=sys.stderr)
    sys.exit(1)


def workspace_version() -> str:
    text = (ROOT / "Cargo.toml").read_text()
    m = re.search(r'^\[workspace\.package\][^\[]*?^version\s*=\s*"([^"]+)"', text, re.M | re.S)
    return m.group(1) if m else "latest"


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


# --- reproducible layers ----------------------------------------------------------------------

class Layer:
    """A tar+gzip layer written entry by entry; `diff_id` is the digest of the uncompressed tar."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._file = open(path, "wb")
        # mtime 0 and level 6: the same files always give the same bytes.
        self._gzip = gzip.GzipFile(fileobj=self._file, mode="wb", mtime=0, compresslevel=6)
        self._hash = hashlib.sha256()
        self._size = 0
        self._tar = tarfile.open(fileobj=self, mode="w", format=tarfile.PAX_FORMAT)

    def write(self, data: bytes) -> int:  # tarfile writes through this, so the tar is hashed as it goes
        self._hash.update(data)
        self._size += len(data)
        return self._gzip.write(data)

    def tell(self) -> int:
        return self._size

    def _info(self, name: str, kind: bytes, mode: int, owner: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = kind, mode, 0
        info.uid = info.gid = owner
        return info

    def dir(self, name: str, mode: int = 0o755, owner: int = 0) -> None:
        self._tar.addfile(self._info(name, tarfile.DIRTYPE, mode, owner))

    def file(self, name: str, src: pathlib.Path, mode: int = 0o644) -> None:
        info = self._info(name, tarfile.REGTYPE, mode, 0)
        info.size = src.stat().st_size
        with open(src, "rb") as f:
            self._tar.addfile(info, f)

    def data(self, name: str, data: bytes, mode: int = 0o644) -> None:
        info = self._info(name, tarfile.REGTYPE, mode, 0)
        info.size = len(data)
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> str:
        self._tar.close()
        self._gzip.close()
        self._file.close()
        return "sha256:" + self._hash.hexdigest()


def image_config(diff_id: str, config: dict | None = None) -> dict:
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    out = {"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    if config:
        out["config"] = config
    return out


# --- what gets pushed -------------------------------------------------------------------------

def linked_libraries(binary: pathlib.Path) -> list[pathlib.Path]:
    """The shared libraries `binary` loads, and its dynamic loader, as ldd resolves them here."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if out.returncode != 0:
        die(f"ldd {binary} failed: {out.stderr.strip() or out.stdout.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(pathlib.Path(m.group(1)))
    return libs


def slm_image_layer(path: pathlib.Path) -> str:
    """The root filesystem of the `slm serve` image: the binary, its components and libraries."""
    if not SLM.is_file():
        die(f"{SLM} not found: build it first (scripts/build-all)")
    components = sorted(DIST.glob("*.wasm"))
    if not components:
        die(f"no components in {DIST}: build them first (scripts/build-all)")
    layer = Layer(path)
    libs = linked_libraries(SLM)
    dirs = {"etc", "tmp", "usr", "usr/local", "usr/local/bin", "var", "var/cache"}
    for lib in libs:  # the loader's and libraries' own paths: the binary asks for them by these names
        parts = lib.relative_to("/").parts
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    for d in sorted(dirs):
        layer.dir(d, 0o1777 if d == "tmp" else 0o755)
    # The compiled-component cache (SLM_CACHE_DIR): writable by the user the image runs as.
    layer.dir("var/cache/slm", 0o755, owner=NONROOT)
    layer.data("etc/passwd", f"root:x:0:0:root:/root:/sbin/nologin\nslm:x:{NONROOT}:{NONROOT}:slm:/nonexistent:/sbin/nologin\n".encode())
    layer.data("etc/group", f"root:x:0:\nslm:x:{NONROOT}:\n".encode())
    for lib in sorted(libs):
        layer.file(str(lib.relative_to("/")), lib.resolve(), 0o755)
    layer.file("usr/local/bin/slm", SLM, 0o755)
    for c in components:
        layer.file(f"usr/local/bin/{c.name}", c)
    return layer.close()


def model_layer(path: pathlib.Path, model: pathlib.Path) -> tuple[str, list[str]]:
    files = [f for f in MODEL_FILES if (model / f).is_file()]
    if "model.onnx" not in files:
        die(f"{model} has no model.onnx: not a model directory")
    layer = Layer(path)
    layer.dir(model.name)
    for f in files:
        layer.file(f"{model.name}/{f}", model / f)
    return layer.close(), files


class Registry:
    def __init__(self, host: str, insecure: bool):
        import oras.provider  # the venv has it (scripts/setup); imported here for a clear message
        self.host = host
        self.client = oras.provider.Registry(hostname=host, insecure=insecure)

    def push(self, ref: str, layers: list[tuple[pathlib.Path, str, dict]], config: dict, config_type: str,
             annotations: dict | None = None) -> str:
        """Pushes blobs `layers` (path, media type, annotations) and `config`; returns the manifest digest."""
        with tempfile.TemporaryDirectory() as tmp:
            config_path = pathlib.Path(tmp) / "config.json"
            config_path.write_text(json.dumps(config, separators=(",", ":"), sort_keys=True))
            layer_annotations = pathlib.Path(tmp) / "annotations.json"
            layer_annotations.write_text(json.dumps({str(p): a for p, _, a in layers}))
            with contextlib.redirect_stdout(sys.stderr):
                resp = self.client.push(
                    target=ref,
                    files=[f"{p}:{media}" for p, media, _ in layers],
                    manifest_config=f"{config_path}:{config_type}",
                    annotation_file=str(layer_annotations),
                    manifest_annotations=annotations,
                    disable_path_validation=True,
                    quiet=True,
                )
        digest = resp.headers.get("Docker-Content-Digest", "")
        print(f"{ref}@{digest}" if digest else ref, flush=True)
        return digest


def push(args) -> None:
    tag = args.tag or workspace_version()
    reg = Registry(args.registry, args.insecure)
    base = f"{args.registry}/edge-slm"
    only = set(args.only.split(",")) if args.only else {"image", "components", "models"}
    unknown = only - {"image", "components", "models"}
    if unknown:
        die(f"--only: unknown part(s) {', '.join(sorted(unknown))} (image, components, models)")
    source = {"org.opencontainers.image.source": "https://github.com/edge-slm/edge-slm",
              "org.opencontainers.image.version": tag}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        if "image" in only:
            say(f"packing the slm serve image from {SLM} and {DIST}/*.wasm")
            layer = tmp / "slm.tar.gz"
            diff_id = slm_image_layer(layer)
            config = image_config(diff_id, {
                "Entrypoint": ["/usr/local/bin/slm"],
                "Cmd": ["serve", "--listen", "0.0.0.0:8080", "--models", "/models"],
                "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "SLM_CACHE_DIR=/var/cache/slm"],
                "User": f"{NONROOT}:{NONROOT}",
                "WorkingDir": "/",
                "ExposedPorts": {"8080/tcp": {}},
                "Labels": {"org.opencontainers.image.title": "slm"},
            })
            reg.push(f"{base}/slm:{tag}", [(layer, TAR_GZIP_LAYER, {TITLE: "slm.tar.gz"})],
                     config, OCI_IMAGE_CONFIG, source)
            layer.unlink()
        if "components" in only:
            components = sorted(DIST.glob("*.wasm"))
            if not components:
                die(f"no components in {DIST}: build them first (scripts/build-all)")
            for wasm in components:
                digest = sha256_file(wasm)
                config = {"architecture": "wasm", "os": "wasip2", "layerDigests": [digest]}
                reg.push(f"{base}/{wasm.stem}:{tag}", [(wasm, WASM_LAYER, {TITLE: wasm.name})],
                         config, WASM_CONFIG, source)
        if "models" in only:
            models = pathlib.Path(args.models)
            names = args.model or sorted(d.name for d in models.iterdir() if (d / "model.onnx").is_file())
            if not names:
                die(f"no model directories (with a model.onnx) in {models}")
            for name in names:
                d = (models / name).resolve()
                say(f"packing model {name} from {d}")
                layer = tmp / f"{name}.tar.gz"
                diff_id, files = model_layer(layer, d)
                say(f"  {', '.join(files)}")
                # The layer's title is the directory name and it is marked for unpacking: `oras pull`
                # (Go or Python) writes <name>/..., as a container runtime mounting the image does.
                reg.push(f"{base}/models/{name}:{tag}",
                         [(layer, TAR_GZIP_LAYER, {TITLE: name, UNPACK: "true"})],
                         image_config(diff_id), OCI_IMAGE_CONFIG, source)
                layer.unlink()


def pull(args) -> None:
    host = args.ref.split("/", 1)[0]
    reg = Registry(host, args.insecure)
    out = pathlib.Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):
        files = reg.client.pull(target=args.ref, outdir=str(out))
    for f in files:
        print(f)


def main() -> None:
    p = argparse.ArgumentParser(prog="scripts/oci", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ps = sub.add_parser("push", help="push the slm image, the components and models to REGISTRY (host[:port][/path])")
    ps.add_argument("registry")
    ps.add_argument("--models", default=str(ROOT / "models"), help="models directory (default: models/)")
    ps.add_argument("--model", action="append", help="push only this model (repeatable; default: every model in --models)")
    ps.add_argument("--tag", help="tag for every reference (default: the workspace version)")
    ps.add_argument("--only", help="comma-separated parts to push: image, components, models (default: all)")
    ps.add_argument("--insecure", action="store_true", help="plain HTTP (a local registry)")
    pl = sub.add_parser("pull", help="pull an artifact's files into DIR (a model is unpacked into DIR/<name>/)")
    pl.add_argument("ref")
    pl.add_argument("dir")
    pl.add_argument("--insecure", action="store_true", help="plain HTTP (a local registry)")
    args = p.parse_args()
    try:
        push(args) if args.command == "push" else pull(args)
    except ImportError as e:
        die(f"{e}: run scripts/setup (it installs the oras client into .venv)")
    except Exception as e:  # the client raises plain exceptions for HTTP errors: one line, no trace
        die(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
