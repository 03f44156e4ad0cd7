"""Run a converted model with ONNX Runtime: token-by-token with a KV cache, or a whole prompt at once.

Used by the checks (tests/python) and the one-off llama.cpp validation.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort


def _all_positions(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same model, with logits for every position (the last-position Slice becomes Identity)."""
    for node in proto.graph.node:
        if node.output and node.output[0].startswith("last_hidden"):
            node.op_type = "Identity"
            del node.input[1:]
            return proto
    raise ValueError("graph has no last_hidden slice")


class OrtModel:
    def __init__(self, model_dir: str, file: str = "model.onnx", all_logits: bool = False, threads: int = 0):
        cfg = json.load(open(os.path.join(model_dir, "config.json")))
        self.layers, self.kv_heads, self.head_dim = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        path = os.path.join(model_dir, file)
        source = _all_positions(onnx.load(path)).SerializeToString() if all_logits else path
        self.session = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_cache(self) -> dict[str, np.ndarray]:
        shape = (1, self.kv_heads, 0, self.head_dim)
        return {f"past_key_values.{i}.{k}": np.zeros(shape, np.float32)
                for i in range(self.layers) for k in ("key", "value")}

    def step(self, ids: list[int], start: int, cache: dict[str, np.ndarray]):
        """Feed `ids` at positions start.. with `cache`; returns (logits [n, vocab], new cache)."""
        feeds = {"input_ids": np.array([ids], np.int64),
                 "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None, :], **cache}
        out = dict(zip(self.output_names, self.session.run(None, feeds)))
        new_cache = {f"past_key_values.{i}.{k}": out[f"present.{i}.{k}"]
                     for i in range(self.layers) for k in ("key", "value")}
        return out["logits"][0], new_cache

    def prompt_logits(self, ids: list[int]) -> np.ndarray:
        """Logits after the whole prompt in one call: [positions, vocab] (1 row for a last-position model)."""
        logits, _ = self.step(ids, 0, self.empty_cache())
        return logits

    def stepwise_logits(self, ids: list[int]) -> np.ndarray:
        """Logits after each token, fed one at a time through the KV cache: [len(ids), vocab]."""
        cache, rows = self.empty_cache(), []
        for pos, t in enumerate(ids):
            logits, cache = self.step([t], pos, cache)
            rows.append(logits[-1])
        return np.stack(rows)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """Perplexity of ids[1:] given logits rows predicting them (row i predicts ids[i + 1])."""
    lp = log_softmax(logits[: len(ids) - 1])
    nll = -lp[np.arange(len(ids) - 1), np.array(ids[1:])]
    return float(np.exp(nll.mean()))
