"""The converter: output layout, metadata-driven hyperparameters, determinism, and clean failures."""
import json
import pathlib

import numpy as np
import onnx
import pytest

from conftest import run_converter
from model_variants import variant_path, variants_dir
from slmconv.gguf_in import read_gguf
from slmconv.ort_eval import OrtModel
from slmconv.spec import LlamaModel
from slmconv.tiny import tiny_model
from slmconv.writer import write_model_dir

FILES = ["model.onnx", "tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"]
VARIANTS = ["model_f32.onnx", "model_int8.onnx", "model_q4.onnx"]


def test_default_model_directory(model_dir):
    for f in FILES:
        assert (model_dir / f).is_file(), f
    # The other layouts (the oracle's, scripts/model_variants.py) are kept out of models/, so that
    # what mounts models/ (Spin copies it at every start) gets only what slm reads.
    assert not sorted(model_dir.glob("model_*.onnx"))
    for f in VARIANTS:
        assert (variants_dir(model_dir) / f).is_file(), f
    cfg = json.loads((model_dir / "config.json").read_text())
    # Values read from the GGUF metadata.
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 576, 9, 3)
    assert cfg["rope_theta"] == 100000.0 and cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"]
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert 2 in gen["eos_token_id"]


@pytest.mark.parametrize("file", ["model.onnx"] + VARIANTS)
def test_onnx_interface(model_dir, file):
    m = onnx.load(str(variant_path(model_dir, file)), load_external_data=False)
    onnx.checker.check_model(m)
    ins = {i.name: i for i in m.graph.input}
    outs = {o.name: o for o in m.graph.output}
    assert list(ins)[:2] == ["input_ids", "position_ids"]
    assert len([n for n in ins if n.startswith("past_key_values.")]) == 60
    assert len([n for n in outs if n.startswith("present.")]) == 60
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(ins["input_ids"]) == ["batch", "seq"]
    assert dims(ins["past_key_values.0.key"]) == ["batch", 3, "past", 64]
    assert dims(outs["logits"]) == ["batch", 1, 49152]  # last position only


def test_tiny_model_is_deterministic_per_seed(tiny_dir, gguf, tmp_path):
    again = tmp_path / "again"
    other = tmp_path / "other"
    assert run_converter("tiny", str(again), "--tokenizer-from", str(gguf), "--seed", "0").returncode == 0
    assert run_converter("tiny", str(other), "--tokenizer-from", str(gguf), "--seed", "1", "--layouts", "int8").returncode == 0
    assert (again / "model.onnx").read_bytes() == (tiny_dir / "model.onnx").read_bytes()
    assert (other / "model.onnx").read_bytes() != (tiny_dir / "model.onnx").read_bytes()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"]) == (2, 64)
    assert (tiny_dir / "model.onnx").stat().st_size < 5_000_000


def _permute_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf Q/K permutation (the inverse of what the converter undoes)."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, 2, out // n_heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(w) -> None:
    """Write out a GGUFWriter's header, metadata and tensors, and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_llama_gguf(path: pathlib.Path, model: LlamaModel, rope_theta: float) -> None:
    import gguf

    c, t = model.config, model.tokenizer
    w = gguf.GGUFWriter(str(path), "llama")
    metadata = {"block_count": c.n_layers, "context_length": c.context, "embedding_length": c.hidden,
                "feed_forward_length": c.ffn, "head_count": c.n_heads, "head_count_kv": c.n_kv_heads,
                "rope_freq_base": rope_theta, "layer_norm_rms_eps": c.rms_eps, "tokenizer_model": "gpt2",
                "tokenizer_pre": t.pre, "token_list": t.tokens, "token_types": t.token_types,
                "token_merges": t.merges, "bos_token_id": t.bos_id, "eos_token_id": t.eos_id,
                "chat_template": t.chat_template}
    for key, value in metadata.items():
        getattr(w, f"add_{key}")(value)  # GGUFWriter.add_block_count(...) and so on, in this order
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    embed = model.weights["model.embed_tokens.weight"]
    q8 = gguf.quants.quantize(embed, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("token_embd.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    model.weights["model.embed_tokens.weight"] = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0).reshape(embed.shape)
    for i in range(c.n_layers):
        for hf, gg in names.items():
            arr = model.weights[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                arr = _permute_for_gguf(arr, c.n_heads)
            elif gg == "attn_k":
                arr = _permute_for_gguf(arr, c.n_kv_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", arr)
    w.add_tensor("output_norm.weight", model.weights["model.norm.weight"])
    _write_gguf(w)


def test_other_llama_gguf_converts_from_metadata(gguf, tmp_path):
    """A different llama GGUF (3 layers, hidden 96, RoPE base 10000) converts, and its ONNX computes what
    the same weights give when built directly: hyperparameters come from metadata and Q/K un-permute."""
    source = read_gguf(str(gguf))
    model = tiny_model(source.tokenizer, seed=7, n_layers=3, hidden=96, n_heads=6, n_kv_heads=2, ffn=160)
    model.config.rope_theta = 10000.0
    path = tmp_path / "other.gguf"
    _write_llama_gguf(path, model, rope_theta=10000.0)
    r = run_converter("gguf", str(path), str(tmp_path / "converted"), "--layouts", "f32")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["rope_theta"], cfg["head_dim"]) == (3, 96, 6, 2, 10000.0, 16)

    write_model_dir(model, str(tmp_path / "direct"), ["f32"], log=lambda m: None)
    ids = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47]
    got = OrtModel(str(tmp_path / "converted"), "model.onnx").stepwise_logits(ids)
    want = OrtModel(str(tmp_path / "direct"), "model.onnx").stepwise_logits(ids)
    np.testing.assert_allclose(got, want, atol=1e-4)


def _assert_clean_failure(r, out: pathlib.Path, needle: str):
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and needle in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]


def test_missing_file(tmp_path):
    out = tmp_path / "out"
    _assert_clean_failure(run_converter("gguf", str(tmp_path / "nope.gguf"), str(out)), out, "no such file")


def test_truncated_gguf(gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf.read_bytes()[: 4_000_000])
    out = tmp_path / "out"
    _assert_clean_failure(run_converter("gguf", str(cut), str(out)), out, "truncated or corrupt")


def test_unsupported_architecture(tmp_path):
    import gguf as gg

    path = tmp_path / "phi.gguf"
    w = gg.GGUFWriter(str(path), "phi2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    _write_gguf(w)
    out = tmp_path / "out"
    _assert_clean_failure(run_converter("gguf", str(path), str(out)), out, "unsupported architecture 'phi2'")


def test_failed_conversion_keeps_previous_output(gguf, tmp_path, tiny_dir):
    """A failing re-conversion must not destroy a complete model directory that is already there."""
    out = tmp_path / "existing"
    assert run_converter("tiny", str(out), "--tokenizer-from", str(gguf), "--layouts", "int8").returncode == 0
    r = run_converter("gguf", str(tmp_path / "missing.gguf"), str(out))
    assert r.returncode == 1 and (out / "model.onnx").is_file()


def test_q4_1_layout_holds_the_gguf_weights_exactly(gguf):
    """The default GGUF stores its layer weights as Q4_1: the q4_1 layout (the default model.onnx)
    recovers every block's scale, offset and values, so its weights are the f32 reference's."""
    from slmconv.graph import _quant_q4_1_blocks

    model = read_gguf(str(gguf))
    checked = 0
    for name, w in model.weights.items():
        if w.ndim != 2 or "embed" in name:
            continue
        packed, d, zero = _quant_q4_1_blocks(w)
        n, k = w.shape
        q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, k // 32, 32).astype(np.float32)
        back = q * d.reshape(n, -1, 1) - (zero * d).reshape(n, -1, 1)
        assert np.abs(back.reshape(n, k) - w).max() <= 1e-6 * max(1.0, np.abs(w).max()), name
        assert (d.astype(np.float16).astype(np.float32) == d).all(), name  # float16 scales, as Q4_1
        checked += 1
    assert checked == 30 * 7
