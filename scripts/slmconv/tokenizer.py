"""Hugging Face tokenizer files from a GGUF byte-level BPE vocabulary."""
from __future__ import annotations

from .spec import ConvertError, LlamaModel, TokenizerData

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def pre_tokenizer(pre: str) -> dict:
    """The Hugging Face pre-tokenizer matching llama.cpp's pre-tokenizer type of the same name."""
    if pre == "smollm":
        # llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM: every digit alone, then the GPT-2 regex.
        return {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, _byte_level(True)],
        }
    if pre in ("default", "gpt-2", "gpt2"):
        return _byte_level(True)
    if pre in ("llama-bpe", "llama3"):
        return {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
                _byte_level(False),
            ],
        }
    raise ConvertError(f"unsupported pre-tokenizer '{pre}': known are smollm, gpt-2, llama-bpe")


def special_ids(tok: TokenizerData) -> list[int]:
    return [i for i, t in enumerate(tok.token_types) if t in (CONTROL, USER_DEFINED)]


def tokenizer_json(tok: TokenizerData) -> dict:
    added = [
        {
            "id": i,
            "content": tok.tokens[i],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": tok.token_types[i] == CONTROL,
        }
        for i in special_ids(tok)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer(tok.pre),
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tok.tokens)},
            "merges": tok.merges,
        },
    }


def _token(tok: TokenizerData, i: int | None) -> str | None:
    return tok.tokens[i] if i is not None and 0 <= i < len(tok.tokens) else None


def eos_ids(tok: TokenizerData) -> list[int]:
    """EOS ids for generation: the declared EOS, plus an end-of-text control token when the vocabulary has one."""
    ids = [tok.eos_id] if tok.eos_id is not None else []
    for i in special_ids(tok):
        if tok.tokens[i] in ("<|endoftext|>", "<|eot_id|>", "<|end_of_text|>") and i not in ids:
            ids.append(i)
    return ids


def tokenizer_config(model: LlamaModel) -> dict:
    tok = model.tokenizer
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model.config.context,
        "add_bos_token": tok.add_bos,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": _token(tok, tok.bos_id),
        "eos_token": _token(tok, tok.eos_id),
        "pad_token": _token(tok, tok.pad_id),
        "unk_token": _token(tok, tok.unk_id),
        "additional_special_tokens": [tok.tokens[i] for i in special_ids(tok) if tok.token_types[i] == CONTROL],
        "added_tokens_decoder": {
            str(i): {"content": tok.tokens[i], "special": tok.token_types[i] == CONTROL, "normalized": False,
                     "lstrip": False, "rstrip": False, "single_word": False}
            for i in special_ids(tok)
        },
        "chat_template": tok.chat_template,
    }
