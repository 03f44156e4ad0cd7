"""Reference data from llama.cpp (llama-cpp-python) on the GGUF: token ids and teacher-forced next tokens.

  python scripts/llamacpp_reference.py tokens MODEL.gguf > tests/fixtures/tokenizer_llamacpp.json
  python scripts/llamacpp_reference.py agreement MODEL.gguf ORACLE_DIR [TEXT_FILE]
  python scripts/llamacpp_reference.py logits MODEL.gguf... > tests/fixtures/tiny_llamacpp_logits.json
  python scripts/llamacpp_reference.py engine MODEL.gguf [TEXT_FILE] [--model-dir DIR] [--kv f16]
  python scripts/llamacpp_reference.py floor MODEL.gguf [TEXT_FILE]

`agreement` feeds held-out text to llama.cpp and to every layout scripts/slmconv wrote in ORACLE_DIR
(ONNX Runtime, whole prompt; for the default model .cache/model-variants/smollm2-135m-instruct, which
scripts/model_variants.py makes) and reports the share of positions where both pick the same next
token, and each one's perplexity.

`engine` holds our engine (`slm logits`, the GGUF converted as `slm` converts it) to llama.cpp on the
same file, as issue 14 measures faithfulness: next-token agreement teacher-forced over the first 500
tokens of the held-out text, and greedy continuations of 16 tokens from 10 prompts (20-token windows
of that text): how many leading tokens each shares with llama.cpp's. With `--model-dir`, our engine
runs that model directory (an Optimum export of the same weights, say) instead of the converted GGUF.
llama.cpp runs with an f32 KV cache unless `--kv f16` (its default cache) is given.

`floor` holds llama.cpp to itself the same way: its greedy continuations with its default f16 KV
cache, with flash attention, and at 1 thread, against its f32-cache run. How far two
configurations of llama.cpp part is the noise floor of the greedy measure: a close call between
two tokens goes either way with any change of rounding.

`logits` runs each (tiny) GGUF on a fixed prompt and greedy steps and records every step's logits
(host/tests/faithful.rs compares ours with them).

The fixtures are committed, so the default test run needs no llama.cpp build.
"""
from __future__ import annotations

import json
import sys

# A varied set: ASCII, digits, punctuation, code, whitespace runs, accents, CJK, emoji with joiners,
# special-token text, and a chat-formatted prompt.
TOKENIZER_CASES = [
    "Hello world",
    "Why is the sky blue?",
    " leading space and  double  spaces",
    "The year 2024 had 366 days; pi ≈ 3.14159.",
    "1234567890 + 0.5 = 1234567890.5",
    "Punctuation!?... (parentheses) [brackets] {braces} <angles> 'quotes' \"double\" — dash – en-dash",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "tabs\tand\nnewlines\r\n\n\n   trailing   ",
    "    indented\n        more indented",
    "Café, naïve, façade, Ångström, Straße, élève, mañana",
    "Привет, мир! Γειά σου κόσμε",
    "日本語のテキストと中文文本",
    "한국어 텍스트",
    "Emoji: 👍 😀 👨‍👩‍👧‍👦 🏳️‍🌈 👩🏽‍💻",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<|im_start|><|im_end|><|im_start|>",
    "I'm sure you've heard they'll say it's what we'd do.",
    "URL: https://example.com/path?query=1&b=2#frag",
    "ALL CAPS AND MiXeD cAsE",
    "",
    " ",
    "a",
    # Gemma's turn markers, BOS/EOS text, whitespace runs, byte fallback and combining marks.
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text<eos>",
    "   multiple   spaces\t\ttabs\n\n\nnewlines\n\n\n\n\n",
    "snake_case_name = CamelCaseName + kebab-case-name // comment",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 🀄 ꙮ",
    "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇ text",
]


def tokens(gguf_path: str) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_path, vocab_only=True, verbose=False)
    cases = [
        {"text": t, "ids": llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)} for t in TOKENIZER_CASES
    ]
    json.dump({"source": "llama.cpp via llama-cpp-python, tokenize(add_bos=False, special=True)", "cases": cases},
              sys.stdout, ensure_ascii=False, indent=1)
    print()


# The prompt and the number of greedy steps of the `logits` fixture.
LOGITS_PROMPT = [5, 17, 99, 3, 42, 7, 64, 120, 2, 33]
LOGITS_STEPS = 8


def logits(*gguf_paths: str) -> None:
    import os

    from llama_cpp import Llama

    report = {"source": "llama.cpp via llama-cpp-python, f32 KV cache, 1 thread", "prompt": LOGITS_PROMPT,
              "steps": LOGITS_STEPS, "models": {}}
    for path in gguf_paths:
        llm = Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)
        llm.eval(LOGITS_PROMPT)
        rows = [list(map(float, llm.scores[len(LOGITS_PROMPT) - 1]))]
        tokens = []
        for _ in range(LOGITS_STEPS):
            token = max(range(len(rows[-1])), key=rows[-1].__getitem__)
            tokens.append(token)
            llm.eval([token])
            rows.append(list(map(float, llm.scores[llm.n_tokens - 1])))
        name = os.path.basename(path).removesuffix(".gguf")
        report["models"][name] = {"tokens": tokens, "logits": rows}
    json.dump(report, sys.stdout)
    print()


def agreement(gguf_path: str, model_dir: str, text_file: str = "tests/fixtures/heldout.txt") -> None:
    import os

    import numpy as np
    from llama_cpp import Llama
    from tokenizers import Tokenizer

    sys.path.insert(0, os.path.join(os.path.dirname(__file__)))
    from slmconv.ort_eval import OrtModel, perplexity

    ids = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json")).encode(
        open(text_file, encoding="utf-8").read(), add_special_tokens=False).ids
    # f32 KV cache: llama.cpp defaults to f16, which adds its own rounding to the comparison.
    llm = Llama(model_path=gguf_path, n_ctx=len(ids) + 8, logits_all=True, verbose=False, n_threads=2,
                type_k=0, type_v=0)
    llm.eval(ids)
    ref = np.array(llm.scores[: len(ids)])
    report = {"tokens": len(ids), "llama.cpp": {"perplexity": perplexity(ref, ids)}}
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    for layout, file in cfg["edge_slm"]["variants"].items():
        logits = OrtModel(model_dir, os.path.join(model_dir, file), all_logits=True).prompt_logits(ids)
        report[layout] = {
            "file": file,
            "agreement_with_llama_cpp": float((logits.argmax(-1) == ref.argmax(-1)).mean()),
            "perplexity": perplexity(logits, ids),
        }
    json.dump(report, sys.stdout, indent=1)
    print()


def engine(gguf_path: str, text_file: str = "tests/fixtures/heldout.txt", slm: str = "target/release/slm",
           model_dir: str | None = None, kv: str = "f32") -> None:
    import os
    import subprocess
    import tempfile

    import numpy as np
    from llama_cpp import Llama

    cache = {"f32": dict(type_k=0, type_v=0), "f16": {}}[kv]
    llm = Llama(model_path=gguf_path, n_ctx=1024, logits_all=True, verbose=False, n_threads=2, **cache)
    text = open(text_file, encoding="utf-8").read()
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True)[:500]
    llm.eval(ids)
    vocab = llm.n_vocab()
    ref = np.array(llm.scores[: len(ids)]).argmax(-1)

    tmp = tempfile.mkdtemp()
    if model_dir is None:
        name = os.path.basename(gguf_path).removesuffix(".gguf")
        os.symlink(os.path.abspath(gguf_path), os.path.join(tmp, name + ".gguf"))
    else:
        # Someone else's model directory of the same weights (an Optimum export).
        name = os.path.basename(os.path.abspath(model_dir))
        os.symlink(os.path.abspath(model_dir), os.path.join(tmp, name))

    def ours(prompt: list[int], steps: int, follow: list[int] | None = None) -> tuple[np.ndarray, list[int]]:
        out = os.path.join(tmp, "logits.f32")
        cmd = [slm, "--quiet", "--models", tmp, "logits", "--model", name, "--runs", "1", "--ids", json.dumps(prompt),
               "--steps", str(steps), "--out", out]
        if follow is not None:
            cmd += ["--follow", json.dumps(follow)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows = np.fromfile(out, dtype=np.float32).reshape(-1, vocab)
        return rows, json.loads(line).get("tokens", [])

    # `slm logits` takes a prompt of 2 or more ids: rows are positions 1.. of the text.
    rows, _ = ours(ids[:2], len(ids) - 2, ids[2:])
    agreement = float((rows.argmax(-1) == ref[1:]).mean())

    shared = []
    for prompt, theirs in zip(greedy_prompts(ids), greedy_continuations(llm, ids)):
        rows, _ = ours(prompt, 15)
        shared.append(shared_leading([int(t) for t in rows.argmax(-1)], theirs))
    report = {
        "model": os.path.basename(gguf_path) + ("" if model_dir is None else f" as {model_dir}"),
        "llama_cpp_kv_cache": kv,
        "teacher_forced_tokens": len(ids) - 1,
        "next_token_agreement": round(agreement, 4),
        "greedy_16_shared_leading_tokens": shared,
        "prompts_sharing_at_least_4": sum(n >= 4 for n in shared),
        "median_shared": float(np.median(shared)),
    }
    json.dump(report, sys.stdout, indent=1)
    print()


def greedy_prompts(ids: list[int]) -> list[list[int]]:
    """The 10 prompts of the greedy measure: BOS and 20-token windows of the text, 40 apart."""
    return [[ids[0]] + ids[start + 1 : start + 21] for start in range(0, 10 * 40, 40)]


def greedy_continuations(llm, ids: list[int]) -> list[list[int]]:
    """llama.cpp's greedy 16 tokens after each prompt."""
    import numpy as np

    out = []
    for prompt in greedy_prompts(ids):
        llm.reset()
        llm.eval(prompt)
        tokens = []
        for _ in range(16):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            tokens.append(token)
            llm.eval([token])
        out.append(tokens)
    return out


def shared_leading(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def floor(gguf_path: str, text_file: str = "tests/fixtures/heldout.txt") -> None:
    import os

    import numpy as np
    from llama_cpp import Llama

    text = open(text_file, encoding="utf-8").read()
    configs = {
        "f32 KV cache": dict(type_k=0, type_v=0),
        "f16 KV cache (llama.cpp's default)": {},
        "f32 KV cache, flash attention": dict(type_k=0, type_v=0, flash_attn=True),
        "f32 KV cache, 1 thread": dict(type_k=0, type_v=0, n_threads=1),
    }
    runs = {}
    for name, config in configs.items():
        llm = Llama(model_path=gguf_path, n_ctx=1024, logits_all=True, verbose=False, **{"n_threads": 2, **config})
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True)[:500]
        runs[name] = greedy_continuations(llm, ids)
        del llm
    base = runs["f32 KV cache"]
    report = {"model": os.path.basename(gguf_path), "against": "llama.cpp, f32 KV cache"}
    for name, run in list(runs.items())[1:]:
        shared = [shared_leading(a, b) for a, b in zip(base, run)]
        report[name] = {
            "greedy_16_shared_leading_tokens": shared,
            "prompts_sharing_at_least_4": sum(n >= 4 for n in shared),
            "median_shared": float(np.median(shared)),
        }
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    kwargs = {}
    if "--model-dir" in args:
        at = args.index("--model-dir")
        kwargs["model_dir"] = args[at + 1]
        del args[at : at + 2]
    if "--kv" in args:
        at = args.index("--kv")
        kwargs["kv"] = args[at + 1]
        del args[at : at + 2]
    commands = {"tokens": tokens, "agreement": agreement, "logits": logits, "engine": engine, "floor": floor}
    commands[cmd](*args, **kwargs)
