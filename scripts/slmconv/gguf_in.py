"""Read a llama-architecture GGUF into a LlamaModel."""
from __future__ import annotations

import os

import numpy as np

from .spec import ConvertError, LlamaConfig, LlamaModel, TokenizerData

# GGUF tensor name -> Hugging Face name, per layer.
LAYER_TENSORS = {
    "attn_norm": "input_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
}


def _field(reader, key, default=None, required=False):
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise ConvertError(f"GGUF metadata lacks '{key}'")
        return default
    return f.contents()


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> Hugging Face rotate_half halves)."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str, progress=None) -> LlamaModel:
    import gguf

    if not os.path.isfile(path):
        raise ConvertError(f"no such file: {path}")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the gguf package raises assorted errors on truncated or foreign files
        raise ConvertError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None

    arch = _field(reader, "general.architecture", required=True)
    if arch != "llama":
        raise ConvertError(f"unsupported architecture '{arch}' in {path}: only 'llama' converts")
    tok_model = _field(reader, "tokenizer.ggml.model", required=True)
    if tok_model != "gpt2":
        raise ConvertError(f"unsupported tokenizer model '{tok_model}' in {path}: only byte-level BPE ('gpt2') converts")

    a = arch
    n_heads = int(_field(reader, f"{a}.attention.head_count", required=True))
    n_kv = int(_field(reader, f"{a}.attention.head_count_kv", n_heads))
    hidden = int(_field(reader, f"{a}.embedding_length", required=True))
    head_dim = int(_field(reader, f"{a}.rope.dimension_count", hidden // n_heads))
    tokens = list(_field(reader, "tokenizer.ggml.tokens", required=True))
    names = {t.name for t in reader.tensors}
    config = LlamaConfig(
        n_layers=int(_field(reader, f"{a}.block_count", required=True)),
        hidden=hidden,
        ffn=int(_field(reader, f"{a}.feed_forward_length", required=True)),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        vocab=int(_field(reader, f"{a}.vocab_size", len(tokens))),
        context=int(_field(reader, f"{a}.context_length", 2048)),
        rms_eps=float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{a}.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in names,
    )
    tokenizer = TokenizerData(
        tokens=tokens,
        token_types=[int(t) for t in _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))],
        merges=list(_field(reader, "tokenizer.ggml.merges", required=True)),
        pre=str(_field(reader, "tokenizer.ggml.pre", "default")),
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        unk_id=_field(reader, "tokenizer.ggml.unknown_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    )
    name = str(_field(reader, "general.name", os.path.basename(path)))
    model = LlamaModel(name=name, config=config, tokenizer=tokenizer)

    expected = {"token_embd.weight", "output_norm.weight"}
    for i in range(config.n_layers):
        expected |= {f"blk.{i}.{k}.weight" for k in LAYER_TENSORS}
    missing = sorted(expected - names)
    if missing:
        raise ConvertError(f"{path} lacks tensor '{missing[0]}' ({len(missing)} missing)")

    tensors = [t for t in reader.tensors if t.name in expected or t.name == "output.weight"]
    for n, t in enumerate(tensors):
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ConvertError(f"cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from None
        w = np.ascontiguousarray(w.reshape(tuple(int(d) for d in reversed(t.shape))), dtype=np.float32)
        if ".attn_q." in t.name:
            w = unpermute_rope(w, config.n_heads)
        elif ".attn_k." in t.name:
            w = unpermute_rope(w, config.n_kv_heads)
        model.weights[_hf_name(t.name, config)] = w
        if progress:
            progress(n + 1, len(tensors))
    return model


def _hf_name(gguf_name: str, config: LlamaConfig) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    _, layer, kind, _ = gguf_name.split(".")
    return f"model.layers.{layer}.{LAYER_TENSORS[kind]}"

