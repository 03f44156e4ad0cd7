"""Tiny random GGUF models of every architecture slm-gguf reads (tests/gguf.rs checks their
configs): the tensor names, shapes and metadata keys llama.cpp's converters write.

usage: tiny_models.py OUTDIR"""
import sys
from pathlib import Path

import numpy as np
import gguf

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 64, 96, 4, 2, 128


MATRICES = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def write(path, arch, layers, head_dim, tensors, extra=lambda w: None, matrix_type=None, spm=False,
          table_type=None):
    """matrix_type: a GGMLQuantizationType for the layers' block matrices, or a function of the
    tensor's name giving one (else f32); spm: a SentencePiece vocabulary (spm_vocabulary) instead
    of a byte-level BPE one; table_type: the embedding table's type (else f32)."""
    global VOCAB
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(layers)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_context_length(256)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    if head_dim != HIDDEN // HEADS:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    vocab = VOCAB
    if spm:
        VOCAB = spm_vocabulary(w)
    elif matrix_type is None:
        w.add_token_list([f"t{i}" for i in range(VOCAB)])
    else:
        # A whole byte-level BPE vocabulary (one merge), so llama.cpp and slm both run the file.
        w.add_token_list(["a", "b", "ab"] + [f"t{i}" for i in range(3, VOCAB)])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_types([1] * VOCAB)
        w.add_token_merges(["a b"])
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
    extra(w)
    for name, shape in tensors(layers, head_dim):
        values = rng.standard_normal(shape).astype(np.float32)
        if matrix_type is not None:
            # Scaled as trained models are, so activations stay in range and the file computes
            # smoothly enough to compare with llama.cpp: unit-gain norms, fan-in scaled matrices.
            if len(shape) == 1:
                values = (1 + 0.1 * values) if "norm" in name else 0.1 * values
            elif name not in ("token_embd.weight", "output.weight"):
                values /= np.sqrt(shape[1])
        if matrix_type is not None and name.endswith(".weight") and name.split(".")[-2] in MATRICES:
            kind = matrix_type(name) if callable(matrix_type) else matrix_type
            w.add_tensor(name, quantize(values, kind), raw_dtype=kind)
        elif table_type is not None and name == "token_embd.weight":
            w.add_tensor(name, quantize(values, table_type), raw_dtype=table_type)
        else:
            w.add_tensor(name, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    VOCAB = vocab


def quantize(values, kind):
    """gguf's quantizers, and ours for the K-quants it lacks."""
    Q = gguf.GGMLQuantizationType
    if kind == Q.Q4_K:
        return quantize_q4_k(values)
    if kind == Q.Q6_K:
        return quantize_q6_k(values)
    if kind == Q.Q5_K:
        return quantize_q5_k(values)
    if kind == Q.Q3_K:
        return quantize_q3_k(values)
    if kind == Q.Q2_K:
        return quantize_q2_k(values)
    return gguf.quants.quantize(values, kind)


def f16(x):
    return np.asarray(x, np.float32).astype(np.float16)


def quantize_q4_k(values):
    """Q4_K super-blocks of 256 (a plain min/max quantizer, not llama.cpp's search): per block of
    32, 6-bit scale and min against the super-block's f16 d and dmin, 4-bit values."""
    rows, cols = values.shape
    head, q = scales_and_mins_k(values.reshape(-1, 8, 32).astype(np.float32), 15)
    # Each 32 bytes: two blocks of 32, the first in the low nibbles.
    qs = (q[:, 0::2] | q[:, 1::2] << 4).reshape(len(q), 128)
    return np.concatenate([head, qs], axis=1).reshape(rows, cols // 256 * 144)


def scales_and_mins_k(x, levels):
    """Per block of 32 of super-blocks x [n, 8, 32]: 6-bit scales and mins against f16 d and
    dmin (min/max, not llama.cpp's search) and the values in 0..levels."""
    lo = np.minimum(x.min(axis=2), 0)
    scale = (x.max(axis=2) - lo) / levels
    d = f16(scale.max(axis=1) / 63).astype(np.float32)
    dmin = f16(-lo.min(axis=1) / 63).astype(np.float32)
    safe = lambda v: np.where(v == 0, 1, v)
    sc = np.clip(np.round(scale / safe(d)[:, None]), 0, 63).astype(np.uint8)
    mc = np.clip(np.round(-lo / safe(dmin)[:, None]), 0, 63).astype(np.uint8)
    step = safe(d[:, None] * sc)[..., None]
    q = np.clip(np.round((x + (dmin[:, None] * mc)[..., None]) / step), 0, levels).astype(np.uint8)
    packed = np.zeros((len(x), 12), np.uint8)
    packed[:, 0:4] = sc[:, :4] | (sc[:, 4:] >> 4) << 6
    packed[:, 4:8] = mc[:, :4] | (mc[:, 4:] >> 4) << 6
    packed[:, 8:12] = (sc[:, 4:] & 15) | (mc[:, 4:] & 15) << 4
    head = np.concatenate([f16(d).view(np.uint8).reshape(-1, 2), f16(dmin).view(np.uint8).reshape(-1, 2),
                           packed], axis=1)
    return head, q


def quantize_q5_k(values):
    """Q5_K super-blocks of 256: Q4_K's scales and mins, 5-bit values: the low nibbles as Q4_K
    packs them, block j's fifth bits as bit j of the 32 qh bytes."""
    rows, cols = values.shape
    head, q = scales_and_mins_k(values.reshape(-1, 8, 32).astype(np.float32), 31)
    low, high = q & 15, q >> 4
    qs = (low[:, 0::2] | low[:, 1::2] << 4).reshape(len(q), 128)
    qh = np.zeros((len(q), 32), np.uint8)
    for j in range(8):
        qh |= high[:, j] << j
    return np.concatenate([head, qh, qs], axis=1).reshape(rows, cols // 256 * 176)


def two_bit_planes(q):
    """Values [n, 256] in 0..4 as Q2_K/Q3_K's qs: per half of 128, 32 bytes of four 2-bit planes."""
    q = q.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(-1, 64)


def quantize_q2_k(values):
    """Q2_K super-blocks of 256: per 16 values a 4-bit scale and min (min << 4 | scale) against f16
    d and dmin, 2-bit values."""
    rows, cols = values.shape
    x = values.reshape(-1, 16, 16).astype(np.float32)
    lo = np.minimum(x.min(axis=2), 0)
    scale = (x.max(axis=2) - lo) / 3
    d = f16(scale.max(axis=1) / 15).astype(np.float32)
    dmin = f16(-lo.min(axis=1) / 15).astype(np.float32)
    safe = lambda v: np.where(v == 0, 1, v)
    sc = np.clip(np.round(scale / safe(d)[:, None]), 0, 15).astype(np.uint8)
    mc = np.clip(np.round(-lo / safe(dmin)[:, None]), 0, 15).astype(np.uint8)
    step = safe(d[:, None] * sc)[..., None]
    q = np.clip(np.round((x + (dmin[:, None] * mc)[..., None]) / step), 0, 3).astype(np.uint8)
    out = np.concatenate([sc | mc << 4, two_bit_planes(q.reshape(-1, 256)),
                          f16(d).view(np.uint8).reshape(-1, 2), f16(dmin).view(np.uint8).reshape(-1, 2)], axis=1)
    return out.reshape(rows, cols // 256 * 84)


def quantize_q3_k(values):
    """Q3_K super-blocks of 256: per 16 values a 6-bit scale (stored + 32) against f16 d, values
    in -4..4 as 2 low bits in qs and a high bit in hmask (set: no -4)."""
    rows, cols = values.shape
    x = values.reshape(-1, 16, 16).astype(np.float32)
    scale = np.abs(x).max(axis=2) / 4
    d = f16(scale.max(axis=1) / 31).astype(np.float32)
    safe = lambda v: np.where(v == 0, 1, v)
    sc = np.clip(np.round(scale / safe(d)[:, None]), 0, 31).astype(np.int32)
    step = safe(d[:, None] * sc)[..., None]
    q = (np.clip(np.round(x / step), -4, 3) + 4).astype(np.uint8).reshape(-1, 256)
    hmask = np.zeros((len(q), 32), np.uint8)
    for j in range(8):
        hmask |= (q[:, j * 32:(j + 1) * 32] >> 2) << j
    s = (sc + 32).astype(np.uint8)
    packed = np.zeros((len(q), 12), np.uint8)
    packed[:, 0:8] = (s[:, 0:8] & 15) | (s[:, 8:16] & 15) << 4
    for i in range(4):
        packed[:, 8 + i] = (s[:, i] >> 4) | (s[:, 4 + i] >> 4) << 2 | (s[:, 8 + i] >> 4) << 4 | (s[:, 12 + i] >> 4) << 6
    out = np.concatenate([hmask, two_bit_planes(q & 3), packed, f16(d).view(np.uint8).reshape(-1, 2)], axis=1)
    return out.reshape(rows, cols // 256 * 110)


def quantize_q6_k(values):
    """Q6_K super-blocks of 256: per 16 values an int8 scale against the super-block's f16 d,
    6-bit values (4 low bits in ql, 2 high in qh)."""
    rows, cols = values.shape
    x = values.reshape(-1, 16, 16).astype(np.float32)
    scale = np.abs(x).max(axis=2) / 31
    d = f16(scale.max(axis=1) / 127).astype(np.float32)
    safe = lambda v: np.where(v == 0, 1, v)
    sc = np.clip(np.round(scale / safe(d)[:, None]), -127, 127).astype(np.int8)
    step = safe(d[:, None] * sc)[..., None]
    q = (np.clip(np.round(x / step), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    # Per half of 128: ql holds groups 0 and 1 (low nibbles) and 2 and 3 (high nibbles); qh
    # their high 2 bits, group g at bits 2g.
    low, high = q & 15, q >> 4
    ql = np.concatenate([low[:, :, 0] | low[:, :, 2] << 4, low[:, :, 1] | low[:, :, 3] << 4], axis=2)
    qh = high[:, :, 0] | high[:, :, 1] << 2 | high[:, :, 2] << 4 | high[:, :, 3] << 6
    out = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8),
                          f16(d).view(np.uint8).reshape(-1, 2)], axis=1)
    return out.reshape(rows, cols // 256 * 210)


def q4_k_m(name):
    """The types of a Q4_K_M file, and the other exact ones once each: Q6_K for ffn_down and
    attn_v as llama.cpp's mix has them, Q8_0 and Q5_0 in the second layer."""
    Q = gguf.GGMLQuantizationType
    layer, matrix = int(name.split(".")[1]), name.split(".")[2]
    if matrix in ("ffn_down", "attn_v"):
        return Q.Q6_K if layer == 0 else {"ffn_down": Q.Q5_0, "attn_v": Q.Q8_0}[matrix]
    return Q.Q4_K


def k_mix(name):
    """The other K-quants (Q2_K, Q3_K, Q5_K, as Q2_K, Q3_K and Q5_K_M files have them) and the
    float types (F16, BF16, F32), each in several places."""
    Q = gguf.GGMLQuantizationType
    layer, matrix = int(name.split(".")[1]), name.split(".")[2]
    mix = {
        "attn_q": (Q.Q2_K, Q.BF16), "attn_k": (Q.Q3_K, Q.Q5_K), "attn_v": (Q.Q5_K, Q.Q2_K),
        "attn_output": (Q.F16, Q.Q3_K), "ffn_gate": (Q.Q5_K, Q.Q2_K), "ffn_up": (Q.Q3_K, Q.F32),
        "ffn_down": (Q.Q2_K, Q.Q5_K),
    }
    return mix[matrix][layer]


def spm_vocabulary(w):
    """A small SentencePiece vocabulary as Llama 2's GGUFs have it: <unk>, <s>, </s>, the 256
    byte tokens, characters and merged pieces scored by merge order, and a space prefix."""
    pieces = list("▁etaoinshrdlucmfwypvbgkjqxz" "ETAOINSHRDLUCMFWYPVBGKJQXZ" "0123456789.,!?'-():;")
    pieces += ["▁t", "he", "▁the", "in", "▁a", "er", "on", "▁w", "re", "▁s", "at", "en", "▁o", "nd",
               "▁th", "ing", "▁c", "es", "is", "▁b", "▁f", "or", "an", "▁and", "ed", "▁in", "▁to",
               "▁of", "it", "ou", "ll", "▁is", "ar", "▁p", "▁m", "▁The", "▁sp", "ace", "▁space",
               "▁▁", "▁▁▁▁", "12", "123", "▁h", "el", "lo", "llo", "ello", "▁hello", "▁H", "▁Hello"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|eot|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [3]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))] + [0.0]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_eot_token_id(len(tokens) - 1)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    return len(tokens)


def common(layers, d, fused=False, gated=True):
    q, kv = HEADS * d, KV_HEADS * d
    yield "token_embd.weight", (VOCAB, HIDDEN)
    yield "output_norm.weight", (HIDDEN,)
    for i in range(layers):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (HIDDEN,)
        if fused:
            yield b + "attn_qkv.weight", (q + 2 * kv, HIDDEN)
        else:
            yield b + "attn_q.weight", (q, HIDDEN)
            yield b + "attn_k.weight", (kv, HIDDEN)
            yield b + "attn_v.weight", (kv, HIDDEN)
        yield b + "attn_output.weight", (HIDDEN, q)
        yield b + "ffn_norm.weight", (HIDDEN,)
        if gated:
            yield b + "ffn_gate.weight", (FFN, HIDDEN)
            yield b + "ffn_up.weight", (FFN, HIDDEN)
        else:
            yield b + "ffn_up.weight", (2 * FFN, HIDDEN)
        yield b + "ffn_down.weight", (HIDDEN, FFN)


def llama(layers, d):
    yield from common(layers, d)


def qwen2(layers, d):
    yield from common(layers, d)
    yield "output.weight", (VOCAB, HIDDEN)
    for i in range(layers):
        yield f"blk.{i}.attn_q.bias", (HEADS * d,)
        yield f"blk.{i}.attn_k.bias", (KV_HEADS * d,)
        yield f"blk.{i}.attn_v.bias", (KV_HEADS * d,)


def phi3(layers, d):
    yield from common(layers, d, fused=True, gated=False)
    yield "output.weight", (VOCAB, HIDDEN)


def gemma3(layers, d):
    yield from common(layers, d)
    for i in range(layers):
        yield f"blk.{i}.attn_q_norm.weight", (d,)
        yield f"blk.{i}.attn_k_norm.weight", (d,)
        yield f"blk.{i}.post_attention_norm.weight", (HIDDEN,)
        yield f"blk.{i}.post_ffw_norm.weight", (HIDDEN,)


def main(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "llama.gguf", "llama", 2, 16, llama)
    Q = gguf.GGMLQuantizationType
    for kind in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_1):
        write(out / f"llama-{kind.name.lower()}.gguf", "llama", 2, 16, llama, matrix_type=kind)
    write(out / "qwen2-q4_0.gguf", "qwen2", 2, 16, qwen2, matrix_type=Q.Q4_0)
    write(out / "phi3-q4_1.gguf", "phi3", 2, 16, phi3, matrix_type=Q.Q4_1)
    write(out / "llama-spm.gguf", "llama", 2, 16, llama, matrix_type=Q.Q4_0, spm=True)
    # K-quants take rows of whole super-blocks (256): wider matrices.
    global HIDDEN, FFN
    HIDDEN, FFN = 256, 512
    write(out / "llama-q4_k_m.gguf", "llama", 2, 64, llama, matrix_type=q4_k_m)
    write(out / "llama-k_mix.gguf", "llama", 2, 64, llama, matrix_type=k_mix)
    HIDDEN, FFN = 64, 96
    write(out / "qwen2.gguf", "qwen2", 2, 16, qwen2)
    write(out / "phi3.gguf", "phi3", 2, 16, phi3)
    # Gemma 3's heads are wider than hidden / heads; its global layers come from the default
    # pattern (every sixth) here, and from the metadata in gemma3-pattern.gguf.
    write(out / "gemma3.gguf", "gemma3", 6, 32, gemma3, lambda w: (
        w.add_sliding_window(16), w.add_float32("gemma3.rope.freq_base_swa", 10000.0)))
    write(out / "gemma3-pattern.gguf", "gemma3", 4, 32, gemma3, lambda w: (
        w.add_sliding_window(16), w.add_float32("gemma3.rope.freq_base_swa", 20000.0),
        w.add_array("gemma3.attention.sliding_window_pattern", [True, False, True, False])))
    # Gemma 3 as its GGUFs come: Q8_0 table (tied), a window short enough for the fixture's
    # 18 positions to slide past it.
    write(out / "gemma3-q8_0.gguf", "gemma3", 6, 32, gemma3, lambda w: (
        w.add_sliding_window(8), w.add_float32("gemma3.rope.freq_base_swa", 10000.0)),
        matrix_type=Q.Q8_0, table_type=Q.Q8_0)
    # The metadata contradicts the tensors: 4 key/value heads, tensors made for 2.
    write(out / "contradicts.gguf", "llama", 2, 16, llama, lambda w: w.add_uint32("llama.attention.head_count_kv", 4))
    write(out / "mamba.gguf", "mamba", 1, 16, lambda layers, d: iter([("x", (4,))]))


if __name__ == "__main__":
    main(sys.argv[1])
