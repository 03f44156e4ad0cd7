"""tokenizer.json built from the GGUF vocabulary reproduces llama.cpp's token ids exactly."""
import json

import pytest
from tokenizers import Tokenizer

from conftest import FIXTURES

CASES = json.loads((FIXTURES / "tokenizer_llamacpp.json").read_text(encoding="utf-8"))["cases"]


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.mark.parametrize("case", CASES, ids=[repr(c["text"])[:40] for c in CASES])
def test_ids_match_llama_cpp(tok, case):
    assert tok.encode(case["text"], add_special_tokens=False).ids == case["ids"]


def test_special_token_text_is_one_token(tok):
    ids = tok.encode("<|im_start|>user", add_special_tokens=False).ids
    assert ids[0] == tok.token_to_id("<|im_start|>") == 1
    assert tok.id_to_token(ids[1]) == "user"


def test_decode_round_trips_text(tok):
    for case in CASES:
        if "<|" not in case["text"]:
            assert tok.decode(case["ids"], skip_special_tokens=False) == case["text"]


def test_tokenizer_config(model_dir):
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|im_start|>" and cfg["eos_token"] == "<|im_end|>"
    assert "<|im_start|>assistant" in cfg["chat_template"]
    assert cfg["added_tokens_decoder"]["2"]["special"] is True
