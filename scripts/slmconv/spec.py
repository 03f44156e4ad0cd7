"""What a converted model is made of, independent of where it came from."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class ConvertError(Exception):
    """A conversion failure with a one-line, user-facing reason."""


@dataclass
class LlamaConfig:
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    context: int
    rms_eps: float
    rope_theta: float
    tie_embeddings: bool


@dataclass
class TokenizerData:
    """A byte-level BPE vocabulary as GGUF stores it (model 'gpt2')."""

    tokens: list[str]
    token_types: list[int]  # GGUF token types: 1 normal, 3 control, 4 user-defined
    merges: list[str]
    pre: str  # GGUF pre-tokenizer name, e.g. 'smollm'
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    chat_template: str | None
    add_bos: bool


@dataclass
class LlamaModel:
    """Weights in Hugging Face naming and layout: linear weights are [out, in]."""

    name: str
    config: LlamaConfig
    tokenizer: TokenizerData
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    def w(self, key: str) -> np.ndarray:
        return self.weights[key]
