"""Writes the GGUF that tests/dequantize.rs reads: for every supported tensor type, a tensor of
random blocks (finite random scales, random quants) and the `gguf` package's dequantization of it
as `<name>.ref` (F32); plus metadata of every value type.

usage: reference.py OUT.gguf SEED"""
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

# Where each type keeps its f16 scales (byte offsets in a block): random bytes there could be
# NaN or infinite, which no real file holds.
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
ROWS, BLOCKS_PER_ROW = 3, 2


def random_tensor(rng, qtype):
    block_len, block_bytes = GGML_QUANT_SIZES[qtype]
    cols = block_len * BLOCKS_PER_ROW if block_len > 1 else 64
    if qtype == T.F32:
        return rng.standard_normal((ROWS, cols)).astype(np.float32)
    if qtype == T.F16:
        return rng.standard_normal((ROWS, cols)).astype(np.float16)
    if qtype == T.BF16:
        f = rng.standard_normal((ROWS, cols)).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(ROWS, -1)
    blocks = rng.integers(0, 256, (ROWS * BLOCKS_PER_ROW, block_bytes), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        scale = (rng.standard_normal(len(blocks)) * 0.05).astype(np.float16)
        blocks[:, at:at + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(ROWS, -1)


def main(out, seed):
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(out, arch="reference")
    w.add_uint32("reference.u32", 7)
    w.add_int32("reference.i32", -7)
    w.add_float32("reference.f32", 0.5)
    w.add_float64("reference.f64", -0.25)
    w.add_bool("reference.bool", True)
    w.add_string("reference.string", "héllo\nwörld")
    w.add_array("reference.strings", ["a", "bc", ""])
    w.add_array("reference.ints", [1, 2, 3])
    for qtype in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
                  T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]:
        data = random_tensor(rng, qtype)
        if qtype in (T.F32, T.F16):
            w.add_tensor(qtype.name, data)
            ref = data.astype(np.float32)
        else:
            w.add_tensor(qtype.name, data, raw_dtype=qtype)
            ref = gguf.quants.dequantize(data, qtype).astype(np.float32)
        w.add_tensor(qtype.name + ".ref", np.ascontiguousarray(ref))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
