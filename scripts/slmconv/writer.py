"""Write a model directory atomically: a temporary sibling, renamed into place when complete."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import onnx

from . import graph, tokenizer
from .spec import LlamaModel

# Q4_1: the default GGUF's own layer weights, exactly, in 5 bits per weight (graph.py).
DEFAULT_LAYOUT = "q4_1"


def default_layout(layouts: list[str]) -> str:
    """The layout written as model.onnx: the default, or the first one asked for without it."""
    return DEFAULT_LAYOUT if DEFAULT_LAYOUT in layouts else layouts[0]


def variant_file(layout: str, layouts: list[str]) -> str:
    return "model.onnx" if layout == default_layout(layouts) else f"model_{layout}.onnx"


def config_json(model: LlamaModel, layouts: list[str]) -> dict:
    c, tok = model.config, model.tokenizer
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.hidden,
        "intermediate_size": c.ffn,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.context,
        "vocab_size": c.vocab,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "torch_dtype": "float32",
        "edge_slm": {
            "source": model.name,
            "default_layout": default_layout(layouts),
            "variants": {layout: variant_file(layout, layouts) for layout in layouts},
            "onnx_logits": "last_position",
        },
    }


def generation_config(model: LlamaModel) -> dict:
    tok = model.tokenizer
    return {
        "bos_token_id": tok.bos_id,
        "eos_token_id": tokenizer.eos_ids(tok),
        "pad_token_id": tok.pad_id,
        "do_sample": False,
        "max_length": model.config.context,
    }


def write_model_dir(model: LlamaModel, out_dir: str, layouts: list[str], log=print) -> None:
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        def dump(name: str, obj: dict) -> None:
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, ensure_ascii=False, indent=None if name == "tokenizer.json" else 2)

        dump("tokenizer.json", tokenizer.tokenizer_json(model.tokenizer))
        dump("tokenizer_config.json", tokenizer.tokenizer_config(model))
        dump("config.json", config_json(model, layouts))
        dump("generation_config.json", generation_config(model))
        for layout in layouts:
            proto = graph.build_graph(model, layout)
            path = os.path.join(tmp, variant_file(layout, layouts))
            onnx.save_model(proto, path)
            log(f"  wrote {variant_file(layout, layouts)} ({layout}, {os.path.getsize(path) / 1e6:.1f} MB)")
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
