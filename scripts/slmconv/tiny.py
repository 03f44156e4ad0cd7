"""A small random-weight llama model for fast tests, deterministic from a seed."""
from __future__ import annotations

import numpy as np

from .spec import LlamaConfig, LlamaModel, TokenizerData


def tiny_model(tokenizer: TokenizerData, seed: int = 0, n_layers: int = 2, hidden: int = 64, n_heads: int = 4,
               n_kv_heads: int = 2, ffn: int = 128, context: int = 256) -> LlamaModel:
    cfg = LlamaConfig(
        n_layers=n_layers, hidden=hidden, ffn=ffn, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=hidden // n_heads, vocab=len(tokenizer.tokens), context=context, rms_eps=1e-5,
        rope_theta=100000.0, tie_embeddings=True,
    )
    rng = np.random.default_rng(seed)

    def linear(out_f: int, in_f: int) -> np.ndarray:
        return (rng.standard_normal((out_f, in_f)) / np.sqrt(in_f)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)

    kv = cfg.n_kv_heads * cfg.head_dim
    w = {"model.embed_tokens.weight": rng.standard_normal((cfg.vocab, hidden)).astype(np.float32)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = linear(hidden, hidden)
        w[p + "self_attn.k_proj.weight"] = linear(kv, hidden)
        w[p + "self_attn.v_proj.weight"] = linear(kv, hidden)
        w[p + "self_attn.o_proj.weight"] = linear(hidden, hidden)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = linear(ffn, hidden)
        w[p + "mlp.up_proj.weight"] = linear(ffn, hidden)
        w[p + "mlp.down_proj.weight"] = linear(hidden, ffn)
    w["model.norm.weight"] = norm()
    return LlamaModel(name=f"tiny-llama-seed{seed}", config=cfg, tokenizer=tokenizer, weights=w)
