"""Optimum `text-generation-with-past` exports of the tiny GGUF models, as a new user makes them:
transformers reads the GGUF (dequantized to f32), optimum-onnx exports it. host/tests/faithful.rs
runs them against llama.cpp's logits on the same GGUFs (tests/fixtures/tiny_llamacpp_logits.json).

  python scripts/optimum_exports.py TINY_MODELS_DIR tests/fixtures/optimum

TINY_MODELS_DIR is what host/gguf/tests/tiny_models.py writes. Needs torch, transformers,
accelerate, gguf and optimum-onnx (several GB with torch: not part of scripts/setup; the exports are
committed, a few hundred KB each, so the tests need none of it).
"""
import os
import shutil
import sys

# The fixture's models of each architecture that converts.
MODELS = ["llama-q4_0", "qwen2-q4_0", "phi3-q4_1", "gemma3-q8_0"]


def export(gguf_path: str, out: str) -> None:
    from optimum.exporters.onnx import main_export
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, name = os.path.split(gguf_path)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # transformers' Phi-3 default pad id (32000) lies outside a tiny vocabulary.
    if config.pad_token_id is not None and config.pad_token_id >= config.vocab_size:
        config.pad_token_id = None
    # llama.cpp scales Gemma 3's queries by 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim in
    # the released models, 256); transformers' GGUF import leaves its default, 256, which the tiny
    # model's 32-wide heads do not have.
    if config.model_type == "gemma3_text":
        config.query_pre_attn_scalar = config.head_dim
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype="float32")
    hf = out + ".hf"
    model.save_pretrained(hf)
    main_export(hf, output=out, task="text-generation-with-past")
    shutil.rmtree(hf)


def main(tiny_dir: str, out_dir: str) -> None:
    for name in MODELS:
        out = os.path.join(out_dir, name)
        shutil.rmtree(out, ignore_errors=True)
        export(os.path.join(tiny_dir, name + ".gguf"), out)
        print(name, os.path.getsize(os.path.join(out, "model.onnx")), "bytes", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
