"""Tokenizes each case of a llama.cpp fixture (scripts/llamacpp_reference.py tokens) with a
tokenizer.json (the `tokenizers` package, as the guest's Rust `tokenizers` does) and reports every
case whose ids differ. Exit status 1 when any does.

usage: tokenizer_parity.py TOKENIZER_JSON FIXTURE_JSON"""
import json
import sys

from tokenizers import Tokenizer


def main(tokenizer_path, fixture_path):
    tokenizer = Tokenizer.from_file(tokenizer_path)
    cases = json.load(open(fixture_path, encoding="utf-8"))["cases"]
    differ = 0
    for case in cases:
        ours = tokenizer.encode(case["text"], add_special_tokens=False).ids
        if ours != case["ids"]:
            differ += 1
            print(f"differs: {case['text']!r}\n  llama.cpp {case['ids']}\n  ours      {ours}")
    print(f"{len(cases) - differ} of {len(cases)} cases equal")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main(*sys.argv[1:])
