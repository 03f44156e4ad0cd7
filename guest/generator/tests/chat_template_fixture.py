"""Expected chat-template renderings, made with Python's jinja2 the way transformers renders
`apply_chat_template` (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `tojson` as json.dumps(ensure_ascii=False), `strftime_now`).

Regenerate (after scripts/setup, from the repository root):

    .venv/bin/python guest/generator/tests/chat_template_fixture.py

It writes guest/generator/tests/fixtures/chat_templates.json, read by tests/chat_template.rs.
"""

import json
import pathlib

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = pathlib.Path(__file__).resolve().parents[3]
OUT = pathlib.Path(__file__).parent / "fixtures" / "chat_templates.json"


def render(source, messages, bos, eos):
    def raise_exception(message):
        raise ValueError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return {"ok": env.from_string(source).render(
            messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)}
    except ValueError as e:
        return {"error": str(e)}


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "  Tell me a joke.\n\n"},
    ],
    [
        {"role": "system", "content": "Réponds en français. «Merci» 👋"},
        {"role": "user", "content": "Say <|im_start|> and \"quotes\" and {{ braces }}"},
        {"role": "assistant", "content": "OK"},
        {"role": "user", "content": ""},
    ],
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "fine"}],
]

# Templates written in the idioms of published Hugging Face chat templates.
SYNTHETIC = {
    "llama2-style": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "zephyr-style": (
        "{% for message in messages %}\n"
        "{% if message['role'] == 'user' %}\n"
        "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'system' %}\n"
        "{{ '<|system|>\\n' + message['content'] | trim + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n"
        "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n"
        "{% if loop.last and add_generation_prompt %}\n"
        "{{ '<|assistant|>' }}\n"
        "{% endif %}\n"
        "{% endfor %}"
    ),
    "json-and-loop-controls": (
        "{{- bos_token }}\n"
        "{%- for m in messages %}\n"
        "    {%- if m.role == 'system' %}{% continue %}{% endif %}\n"
        "    {{- m.role | upper }}: {{ m | tojson }}\n"
        "    {%- if loop.index > 2 %}{% break %}{% endif %}\n"
        "{% endfor %}\n"
        "{{- messages | length }} {{ messages[-1]['content'] | tojson(indent=2) }}"
    ),
}


def main():
    cfg_path = ROOT / "models" / "smollm2-135m-instruct" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cases = [{
        "name": "smollm2-135m-instruct",
        "model_template": cfg["chat_template"],
        "bos_token": cfg["bos_token"],
        "eos_token": cfg["eos_token"],
    }]
    for name, src in SYNTHETIC.items():
        cases.append({"name": name, "template": src, "bos_token": "<s>", "eos_token": "</s>"})
    for case in cases:
        src = case.get("template") or case["model_template"]
        case["renders"] = [
            {"messages": msgs, **render(src, msgs, case["bos_token"], case["eos_token"])} for msgs in CONVERSATIONS
        ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(cases, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
