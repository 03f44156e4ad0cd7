"""spin.toml, checked without Spin (it is on no package registry): what `spin build` runs, what
`spin up` loads, and what it copies.

- `spin build` runs the component's build command (through the shell, in this directory): it is
  scripts/build, which writes the component the manifest names; `watch` (for `spin watch`) covers the
  sources compiled into it, path dependencies included.
- `spin up` copies every file of `files` into a temporary directory at every start (Spin's loader,
  crates/loader/src/local.rs, globs a directory source as `<dir>/**/*`). What it copies must be what
  the models need, each model directory's model.onnx and JSON files, not the other weight layouts
  (model_*.onnx): scripts/setup keeps those in .cache/model-variants/ (scripts/model_variants.py).
- `spin up --direct-mounts` copies nothing; Spin allows it only for directory mounts with no
  patterns and no `exclude_files`, which is what the manifest keeps to.
- `watch` globs are matched like the `glob` crate's `Pattern::matches_path` (default options, so
  `*` also matches `/`).
- `spin build` writes .spin/ (the last build profile): git ignores it.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

import model_variants
from conftest import ROOT

MANIFEST = ROOT / "spin.toml"
# What slm reads from a model directory (guest/generator/src/model.rs, guest/nn: model.onnx).
MODEL_FILES = {"model.onnx", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}


def _manifest(path: pathlib.Path = MANIFEST) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _component() -> dict:
    m = _manifest()
    assert m["spin_manifest_version"] == 2
    (trigger,) = m["trigger"]["http"]
    return m["component"][trigger["component"]]


def spin_glob(pattern: str) -> re.Pattern:
    """The `glob` crate's Pattern (MatchOptions::new(): `*` and `?` match `/` too, a leading `.` needs
    no literal) as a regex; `**` must be a whole path component, as there."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            j = i
            while j < len(pattern) and pattern[j] == "*":
                j += 1
            if j - i > 2:
                raise ValueError(f"{pattern!r}: wildcards are either regular `*` or recursive `**`")
            if j - i == 2:
                if not (i == 0 or pattern[i - 1] == "/") or not (j == len(pattern) or pattern[j] == "/"):
                    raise ValueError(f"{pattern!r}: recursive wildcards must form a single path component")
                if j < len(pattern):
                    out.append("(?:.*/)?")  # `**/`: the current directory or any below it
                    j += 1
                else:
                    out.append(".*")
            else:
                out.append(".*")
            i = j
        elif c == "?":
            out.append(".")
            i += 1
        elif c == "[":
            negate = pattern[i + 1:i + 2] == "!"
            start = i + 2 if negate else i + 1
            end = pattern.find("]", start + 1)  # a `]` right after `[` or `[!` is a member
            if end < 0:
                raise ValueError(f"{pattern!r}: invalid range pattern")
            members = pattern[start:end].replace("\\", "\\\\").replace("^", "\\^").replace("[", "\\[")
            out.append(f"[{'^' if negate else ''}{members}]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out), re.DOTALL)


def mounted_files(app_root: pathlib.Path, component: dict) -> dict[str, pathlib.Path]:
    """Guest path -> host file, for every file `spin up` would copy (placement mounts of directories
    and files, and plain paths; glob patterns and exclude_files are not used here and refused)."""
    assert "exclude_files" not in component, "extend this test to exclude_files"
    out = {}
    for mount in component.get("files", []):
        if isinstance(mount, str):
            assert not any(ch in mount for ch in "*?["), f"{mount}: extend this test to glob patterns"
            source, dest = mount, mount
        else:
            source, dest = mount["source"], mount["destination"]
        src = app_root / source
        if src.is_dir():
            walked = [pathlib.Path(d) / f for d, _, fs in os.walk(src, followlinks=True) for f in fs]
            for path in (p for p in walked if p.is_file()):
                out[f"{dest.rstrip('/')}/{path.relative_to(src).as_posix()}"] = path
        else:
            out[dest] = src
    return out


def test_spin_glob_follows_the_glob_crate():
    # The crate's own examples, and its default options: `*` crosses `/`.
    assert spin_glob("c?t").fullmatch("cat")
    assert spin_glob("k[!e]tteh").fullmatch("kitteh") and not spin_glob("k[!e]tteh").fullmatch("ketteh")
    assert spin_glob("d*g").fullmatch("doog")
    assert spin_glob("a*c").fullmatch("ab/c")
    g = spin_glob("models/**/model_*.onnx")
    assert g.fullmatch("models/m/model_f32.onnx") and g.fullmatch("models/a/b/model_q4.onnx")
    assert g.fullmatch("models/model_int8.onnx")  # `**/` also matches no directory
    assert not g.fullmatch("models/m/model.onnx") and not g.fullmatch("other/m/model_f32.onnx")
    for bad in ("a**/b", "a/**b", "a/***/b", "a/[b"):
        with pytest.raises(ValueError):
            spin_glob(bad)


def test_build_command_is_scripts_build():
    build = _component()["build"]
    assert "workdir" not in build  # Spin runs it in the manifest's directory
    argv = shlex.split(build["command"])
    assert argv == ["scripts/build"]
    script = ROOT / argv[0]
    assert script.is_file() and os.access(script, os.X_OK), f"{script} is not executable"
    # It needs scripts/setup first and says so when that has not run.
    assert "run scripts/setup" in script.read_text(encoding="utf-8")


def test_source_is_what_scripts_build_writes():
    source = _component()["source"]
    assert source == "dist/slm-http-portable.wasm"
    build = (ROOT / "scripts" / "build").read_text(encoding="utf-8")
    # Composed (atomically) by scripts/build, and checked there to import no wasi:nn.
    assert re.search(rf"^compose {re.escape(source)} ", build, re.M), build
    assert re.search(rf"^for f in .*\b{re.escape(source)}\b.*; do$", build, re.M)


def _path_dependencies(manifest: pathlib.Path, seen: set[pathlib.Path]) -> None:
    """Crate directories reachable from `manifest` through `path` dependencies."""
    crate = manifest.parent.resolve()
    if crate in seen:
        return
    seen.add(crate)
    deps = _manifest(manifest).get("dependencies", {})
    for dep in deps.values():
        if isinstance(dep, dict) and "path" in dep:
            _path_dependencies(crate / dep["path"] / "Cargo.toml", seen)


def test_watch_covers_what_goes_into_the_component():
    watch = _component()["build"]["watch"]
    for pattern in watch:
        assert sorted(ROOT.glob(pattern)), f"watch pattern {pattern!r} matches nothing"
    crates: set[pathlib.Path] = set()
    for manifest in sorted((ROOT / "guest").glob("*/Cargo.toml")):
        _path_dependencies(manifest, crates)
    inputs = [ROOT / "Cargo.toml", ROOT / "Cargo.lock", ROOT / ".cargo" / "config.toml", ROOT / "scripts" / "build"]
    inputs += sorted((ROOT / "wit").rglob("*.wit"))
    for crate in sorted(crates):
        inputs += [crate / "Cargo.toml"] + sorted((crate / "src").rglob("*.rs"))
    assert any(p.parent.name == "engine" for p in inputs)  # guest/nn compiles slm-engine
    for path in inputs:
        rel = path.relative_to(ROOT).as_posix()
        assert any(spin_glob(p).fullmatch(rel) for p in watch), f"{rel} is in the component but not watched"


def test_every_files_source_exists():
    files = _component()["files"]
    assert files == [{"source": "models", "destination": "/models"}]
    for mount in files:
        source = mount if isinstance(mount, str) else mount["source"]
        assert (ROOT / source).exists(), f"{source} missing: run scripts/setup (it converts the default model)"


def test_spin_up_copies_only_what_the_models_need():
    mounted = mounted_files(ROOT, _component())
    models = ROOT / "models"
    model_dirs = sorted(d for d in models.iterdir() if (d / "model.onnx").is_file())
    assert models / "smollm2-135m-instruct" in model_dirs, "run scripts/setup (it converts the default model)"
    needed = {f"/models/{d.name}/{f}": d / f for d in model_dirs for f in MODEL_FILES if (d / f).is_file()}
    assert not [g for g in mounted if re.fullmatch(r".*/model_[^/]*\.onnx", g)]
    # Each model directory: exactly the files slm reads.
    assert {g: p for g, p in mounted.items() if p.parent in model_dirs} == needed
    # Beside them, nothing big (a models.toml, say).
    size = lambda files: sum(p.stat().st_size for p in files.values())  # noqa: E731
    assert size(mounted) - size(needed) < 1_000_000
    default = {g: p for g, p in needed.items() if g.startswith("/models/smollm2-135m-instruct/")}
    assert size(default) < 120_000_000  # the Q4_1 model.onnx (108 MB) and its JSON files, not 839 MB


def test_direct_mounts_are_allowed():
    """`spin up --direct-mounts` (no copy at all) refuses a component with `exclude_files` or with
    glob-pattern file mounts: the manifest has neither, and mounts only directories."""
    component = _component()
    assert "exclude_files" not in component
    for mount in component["files"]:
        assert isinstance(mount, dict), f"{mount}: a plain path is not a directory mount"
        assert (ROOT / mount["source"]).is_dir()


def test_setup_converts_with_the_host_and_the_oracle_writes_the_other_layouts(tmp_path, monkeypatch):
    """scripts/setup converts the default model with `slm convert` (model.onnx only, in models/);
    scripts/test has slmconv, the oracle, write the other layouts outside models/, where
    `variant_path` finds them."""
    setup = (ROOT / "scripts" / "setup").read_text(encoding="utf-8")
    assert 'target/release/slm convert "$GGUF" --output "$MODEL_DIR"' in setup
    assert setup.index("scripts/build-all") < setup.index("target/release/slm convert")
    assert "-m slmconv" not in setup and "model_variants.py make" not in setup
    test = (ROOT / "scripts" / "test").read_text(encoding="utf-8")
    assert 'scripts/model_variants.py make models/smollm2-135m-instruct "$GGUF"' in test
    assert test.index("model_variants.py make") < test.index("pytest")

    monkeypatch.setattr(model_variants, "VARIANTS_ROOT", tmp_path / "cache")
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"edge_slm": {"variants": {"q4_1": "model.onnx"}}}))
    (model / "model.onnx").write_text("slm convert's")
    assert model_variants.missing(model) == ["config.json"]  # the oracle has not written them yet
    oracle = tmp_path / "cache" / "m"
    oracle.mkdir(parents=True)
    files = {"f32": "model_f32.onnx", "int8": "model_int8.onnx", "q4": "model_q4.onnx", "q4_1": "model.onnx"}
    (oracle / "config.json").write_text(json.dumps({"edge_slm": {"variants": files}}))
    for f in files.values():
        (oracle / f).write_text(f)
    assert model_variants.missing(model) == []
    assert model_variants.variant_path(model, "model.onnx") == model / "model.onnx"
    assert model_variants.variant_path(model, "model_q4.onnx") == oracle / "model_q4.onnx"
    (oracle / "model_int8.onnx").unlink()
    assert model_variants.missing(model) == ["model_int8.onnx"]  # `make` then converts again


def test_variants_command_exit_status(tmp_path):
    script = ROOT / "scripts" / "model_variants.py"
    run = lambda *a: subprocess.run([sys.executable, str(script), *a], capture_output=True, text=True)  # noqa: E731
    assert run("check", str(tmp_path / "none")).returncode == 1
    assert run("make", str(tmp_path / "none")).returncode == 2  # no GGUF named
    assert run("nonsense", str(tmp_path)).returncode == 2


def test_spin_and_variant_directories_are_not_committed():
    for path in (".spin", ".spin/last-build.txt", ".cache/model-variants/smollm2-135m-instruct/model_f32.onnx"):
        r = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert r.returncode == 0, f"git does not ignore {path}"


BAKED_MANIFEST = ROOT / "spin-baked.toml"


def test_baked_manifest_builds_what_it_serves_and_mounts_nothing():
    """spin-baked.toml: `spin build` bakes the default model (scripts/build --bake), `spin up` loads
    the file that writes and mounts no files (the model is inside: nothing to copy at start)."""
    baked = _manifest(BAKED_MANIFEST)["component"]["slm"]
    model = "smollm2-135m-instruct"
    assert shlex.split(baked["build"]["command"]) == ["scripts/build", "--bake", model]
    assert baked["source"] == f"dist/slm-http-{model}.wasm"
    build = (ROOT / "scripts" / "build").read_text(encoding="utf-8")
    assert 'compose "dist/slm-http-$name.wasm" ' in build, build  # where --bake writes it
    assert "files" not in baked
    assert (ROOT / "models" / model).is_dir(), "run scripts/setup (it converts the default model)"
    # Watched: what spin.toml watches (the component's sources), and the model baked in.
    watch = baked["build"]["watch"]
    assert watch == _component()["build"]["watch"] + [f"models/{model}/*"]
