"""Prints, for every tensor of a GGUF file, its type and a checksum of its values as the `gguf`
package dequantizes them (of its first ROWS rows: a 262k-token embedding would take minutes):
sum over i of bits(value_i) * (i + 1), wrapping at 2^64. tests/gguf.rs computes the same over
slm-gguf's values: equal sums mean equal bits, position by position.

usage: checksums.py FILE.gguf  ->  one line per tensor: NAME TYPE CHECKSUM"""
import sys

import numpy as np
import gguf

CHUNK = 1 << 20
ROWS = 1024


def checksum(values: np.ndarray) -> int:
    bits = np.ascontiguousarray(values, dtype="<f4").reshape(-1).view(np.uint32)
    total = np.uint64(0)
    with np.errstate(over="ignore"):
        for start in range(0, len(bits), CHUNK):
            part = bits[start:start + CHUNK].astype(np.uint64)
            weights = np.arange(start + 1, start + 1 + len(part), dtype=np.uint64)
            total = total + np.sum(part * weights, dtype=np.uint64)
    return int(total)


def main(path):
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data[:ROWS], t.tensor_type)
        print(t.name, t.tensor_type.name, checksum(values))


if __name__ == "__main__":
    main(sys.argv[1])
