"""The ONNX decoder graph: a llama block stack with a KV cache and last-position logits.

Inputs:  input_ids [batch, seq] int64, position_ids [batch, seq] int64,
         past_key_values.{i}.key|value [batch, kv_heads, past, head_dim] float32
Outputs: logits [batch, 1, vocab] (last position only),
         present.{i}.key|value [batch, kv_heads, past + seq, head_dim]

Weight layouts (one file each):
  f32   every matmul in float32: the reference.
  int8  every matmul weight int8 with one scale per output channel (Cast * scale -> MatMul),
        activations stay float32; the tied embedding / LM head int8 with one scale per token row.
  q4    symmetric 4-bit blocks of 32 (com.microsoft MatMulNBits, Q4_0-style) for the block matmuls;
        embedding / LM head as in int8. Not faithful for this model: kept to measure against.
  q4_1  asymmetric 4-bit blocks of 32 (Q4_1: value = d * q + m, d and m float16) for the block
        matmuls, written as MatMulNBits with float zero points (zp = -m / d); embedding / LM head
        as in int8. The default model's GGUF stores these weights as Q4_1, so this layout holds
        them exactly, in 5 bits per weight.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .spec import LlamaModel

LAYOUTS = ("f32", "int8", "q4", "q4_1")
OPSET = 17
NEG_INF = -1e9  # finite: a fully masked row never turns into NaN


class _Builder:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value, hint="c", dtype=None) -> str:
        arr = np.asarray(value, dtype=dtype)
        n = self.name(hint)
        self.inits.append(numpy_helper.from_array(arr, n))
        return n

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: list[str] | None = None,
           domain: str | None = None, **attrs) -> str:
        outs = outputs or [self.name(hint or op_type.lower())]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), domain=domain, **attrs))
        return outs[0]


def _quant_int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8, one scale per row of w."""
    scale = np.abs(w).max(axis=1) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def _quant_q4_blocks(w: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0-style symmetric 4-bit blocks along the input dim: value = (q - 8) * scale. w is [out, in]."""
    n, k = w.shape
    blocks = w.reshape(n, k // block, block)
    idx = np.abs(blocks).argmax(axis=2)
    maxv = np.take_along_axis(blocks, idx[..., None], axis=2)[..., 0]
    scale = (maxv / -8.0).astype(np.float32)
    inv = np.where(scale == 0, 0.0, 1.0 / np.where(scale == 0, 1.0, scale))
    q = np.clip(np.round(blocks * inv[..., None]) + 8, 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # low nibble first
    return packed, scale.reshape(-1)


def _quant_q4_1_blocks(w: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 blocks along the input dim of w [out, in]: value = d * q + m, q in 0..15, d and m
    float16 (as llama.cpp writes them). Weights that are already Q4_1 values (the default GGUF)
    come back exactly: m is the block's minimum and d its range / 15.
    Returns (packed [out, in/32, 16] low nibble first, scales d [out*in/32], zero points -m/d)."""
    n, k = w.shape
    blocks = w.reshape(n, k // block, block).astype(np.float32)
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)
    m = lo.astype(np.float16).astype(np.float32)
    d = ((hi - m) / 15.0).astype(np.float16).astype(np.float32)
    d = np.where(d > 0, d, 1.0).astype(np.float32)  # a constant block: q = 0, value = m
    q = np.clip(np.round((blocks - m[..., None]) / d[..., None]), 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed, d.reshape(-1), (-m / d).astype(np.float32).reshape(-1)


def _dequant(b: _Builder, q: str, scale: str, hint: str) -> str:
    """int8 -> float32 as Cast * scale (scale broadcast per output channel).

    Not DequantizeLinear: ONNX Runtime's full optimizer fuses DequantizeLinear -> MatMul into a
    matmul that also quantizes the activations to int8 (logits 0.3 off on the tiny model), which
    is the unfaithful layout this variant avoids. Cast * Mul on constants folds to plain float
    weights in both ONNX Runtime and tract, which then agree to 1e-5."""
    return b.op("Mul", [b.op("Cast", [q], to=TensorProto.FLOAT), scale], hint + "_dq")


def _linear(b: _Builder, x: str, w: np.ndarray, layout: str, hint: str) -> str:
    """x [.., in] @ w.T for a Hugging Face weight w [out, in]."""
    out_f, in_f = w.shape
    if layout == "f32":
        return b.op("MatMul", [x, b.const(np.ascontiguousarray(w.T), hint)], hint)
    if layout == "int8":
        q, scale = _quant_int8_rows(w)
        wq = _dequant(b, b.const(np.ascontiguousarray(q.T), hint + "_q"), b.const(scale[None, :], hint + "_s"), hint)
        return b.op("MatMul", [x, wq], hint)
    if layout == "q4":
        packed, scale = _quant_q4_blocks(w)
        return b.op("MatMulNBits", [x, b.const(packed, hint + "_q4"), b.const(scale, hint + "_s")], hint,
                    domain="com.microsoft", K=in_f, N=out_f, bits=4, block_size=32)
    if layout == "q4_1":
        packed, scale, zero = _quant_q4_1_blocks(w)
        return b.op("MatMulNBits", [x, b.const(packed, hint + "_q4"), b.const(scale, hint + "_s"), b.const(zero, hint + "_zp")],
                    hint, domain="com.microsoft", K=in_f, N=out_f, bits=4, block_size=32)
    raise ValueError(layout)


def _rms_norm(b: _Builder, x: str, w: np.ndarray, eps: float, hint: str) -> str:
    sq = b.op("Mul", [x, x])
    mean = b.op("ReduceMean", [sq], axes=[-1], keepdims=1)
    inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [mean, b.const(np.float32(eps))])])])
    return b.op("Mul", [b.op("Mul", [x, inv]), b.const(w.astype(np.float32), hint)], hint)


def _rotate_half(b: _Builder, x: str, half: int) -> str:
    big = np.iinfo(np.int64).max
    x1 = b.op("Slice", [x, b.const([0], dtype=np.int64), b.const([half], dtype=np.int64), b.const([-1], dtype=np.int64)])
    x2 = b.op("Slice", [x, b.const([half], dtype=np.int64), b.const([big], dtype=np.int64), b.const([-1], dtype=np.int64)])
    return b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)


def build_graph(model: LlamaModel, layout: str) -> onnx.ModelProto:
    cfg = model.config
    w = model.weights
    b = _Builder()
    nh, nkv, hd, hidden = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden
    rep = nh // nkv
    i64 = lambda v: b.const(v, dtype=np.int64)  # noqa: E731

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, cfg.vocab])]
    for i in range(cfg.n_layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kv}", TensorProto.FLOAT, ["batch", nkv, "past", hd]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kv}", TensorProto.FLOAT, ["batch", nkv, "total", hd]))

    # Embedding. Quantized layouts keep the table int8 with a scale per token row; the same table,
    # dequantized, is the tied LM head (a row of the table is an output channel of the head).
    embed = w["model.embed_tokens.weight"]
    if layout == "f32":
        table = b.const(embed, "embed")
        x = b.op("Gather", [table, "input_ids"], "embeds", axis=0)
    else:
        q, scale = _quant_int8_rows(embed)
        table_q, table_s = b.const(q, "embed_q"), b.const(scale, "embed_s")
        rows = b.op("Cast", [b.op("Gather", [table_q, "input_ids"], axis=0)], to=TensorProto.FLOAT)
        row_scale = b.op("Unsqueeze", [b.op("Gather", [table_s, "input_ids"], axis=0), i64([-1])])
        x = b.op("Mul", [rows, row_scale], "embeds")
        table = _dequant(b, table_q, b.op("Unsqueeze", [table_s, i64([-1])]), "embed")

    # Causal mask over [past + seq]: query i (absolute position past + i) sees keys 0..past + i.
    seq = b.op("Gather", [b.op("Shape", ["input_ids"]), i64(1)], axis=0)
    past = b.op("Gather", [b.op("Shape", ["past_key_values.0.key"]), i64(2)], axis=0)
    total = b.op("Add", [past, seq])
    q_pos = b.op("Unsqueeze", [b.op("Range", [past, total, i64(1)]), i64([1])])
    k_pos = b.op("Unsqueeze", [b.op("Range", [i64(0), total, i64(1)]), i64([0])])
    mask = b.op("Where", [b.op("LessOrEqual", [k_pos, q_pos]), b.const(np.float32(0)), b.const(np.float32(NEG_INF))],
                "causal_mask")
    grouped_mask = b.op("Tile", [mask, i64([rep, 1])], "grouped_mask")  # rows ordered (query head in group, position)

    # Rotary embedding (rotate_half convention), shared by every layer: cos/sin [batch, 1, seq, head_dim].
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    pos = b.op("Unsqueeze", [b.op("Cast", ["position_ids"], to=TensorProto.FLOAT), i64([-1])])
    freqs = b.op("Mul", [pos, b.const(inv_freq.astype(np.float32), "inv_freq")])
    emb = b.op("Concat", [freqs, freqs], axis=-1)
    cos = b.op("Unsqueeze", [b.op("Cos", [emb]), i64([1])], "rope_cos")
    sin = b.op("Unsqueeze", [b.op("Sin", [emb]), i64([1])], "rope_sin")

    scale = b.const(np.float32(1.0 / np.sqrt(hd)), "attn_scale")
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        h = _rms_norm(b, x, w[p + "input_layernorm.weight"], cfg.rms_eps, f"l{i}_attn_norm")

        def heads(t: str, n: int) -> str:
            return b.op("Transpose", [b.op("Reshape", [t, i64([0, 0, n, hd])])], perm=[0, 2, 1, 3])

        def rope(t: str) -> str:
            return b.op("Add", [b.op("Mul", [t, cos]), b.op("Mul", [_rotate_half(b, t, hd // 2), sin])])

        q = rope(heads(_linear(b, h, w[p + "self_attn.q_proj.weight"], layout, f"l{i}_q"), nh))
        k = rope(heads(_linear(b, h, w[p + "self_attn.k_proj.weight"], layout, f"l{i}_k"), nkv))
        v = heads(_linear(b, h, w[p + "self_attn.v_proj.weight"], layout, f"l{i}_v"), nkv)
        k_all = b.op("Concat", [f"past_key_values.{i}.key", k], outputs=[f"present.{i}.key"], axis=2)
        v_all = b.op("Concat", [f"past_key_values.{i}.value", v], outputs=[f"present.{i}.value"], axis=2)

        # Grouped-query attention without repeating K/V: the `rep` query heads of a KV head are
        # stacked along the sequence axis, [b, kv, rep*seq, hd] @ [b, kv, hd, total].
        # (The causal mask is tiled to match; no reshape divides by the symbolic total length.)
        qg = b.op("Reshape", [q, i64([0, nkv, -1, hd])])
        scores = b.op("MatMul", [qg, b.op("Transpose", [k_all], perm=[0, 1, 3, 2])])
        probs = b.op("Softmax", [b.op("Add", [b.op("Mul", [scores, scale]), grouped_mask])], axis=-1)
        ctx = b.op("MatMul", [probs, v_all])
        ctx = b.op("Reshape", [b.op("Transpose", [b.op("Reshape", [ctx, i64([0, nh, -1, hd])])], perm=[0, 2, 1, 3]),
                               i64([0, 0, nh * hd])])
        x = b.op("Add", [x, _linear(b, ctx, w[p + "self_attn.o_proj.weight"], layout, f"l{i}_o")], f"l{i}_attn_out")

        h = _rms_norm(b, x, w[p + "post_attention_layernorm.weight"], cfg.rms_eps, f"l{i}_ffn_norm")
        gate = _linear(b, h, w[p + "mlp.gate_proj.weight"], layout, f"l{i}_gate")
        up = _linear(b, h, w[p + "mlp.up_proj.weight"], layout, f"l{i}_up")
        act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
        x = b.op("Add", [x, _linear(b, act, w[p + "mlp.down_proj.weight"], layout, f"l{i}_down")], f"l{i}_out")

    # Only the last position reaches the norm and the vocabulary-wide head.
    big = np.iinfo(np.int64).max
    last = b.op("Slice", [x, i64([-1]), i64([big]), i64([1])], "last_hidden")
    last = _rms_norm(b, last, w["model.norm.weight"], cfg.rms_eps, "final_norm")
    if cfg.tie_embeddings:
        head_t = b.op("Transpose", [table], "lm_head_t", perm=[1, 0])
        b.op("MatMul", [last, head_t], outputs=["logits"])
    else:
        head = _linear(b, last, w["lm_head.weight"], layout if layout in ("f32", "int8") else "int8", "lm_head")
        b.op("Identity", [head], outputs=["logits"])

    graph = helper.make_graph(b.nodes, "llama_decoder", inputs, outputs, b.inits)
    opsets = [helper.make_opsetid("", OPSET)]
    if layout in ("q4", "q4_1"):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    m = helper.make_model(graph, opset_imports=opsets, producer_name="edge-slm slmconv")
    m.ir_version = 8
    return m
