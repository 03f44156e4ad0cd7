"""`slm serve` request fields, through the official openai SDK: every field is implemented or refused
with 400 naming it (never ignored); the affinity key header. On the tiny model: no test here needs
sensible text."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import ROOT
from test_http import _raw, _start_serve, _stop_serve

MODEL = "tiny"
CHAT = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(ROOT / "target" / "test-models" / "tiny", models / MODEL)
    url, proc, log = _start_serve(models, models.parent / "serve.log")
    yield url
    _stop_serve(proc, log)


@pytest.fixture(scope="module")
def client(tiny_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{tiny_server}/v1", api_key="unused", max_retries=0, timeout=120)


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

# (field, value): each asks for something this server does not do.
CHAT_REFUSED = [
    ("functions", [TOOL["function"]]),  # the legacy form of tools (tests/python/test_tools.py)
    ("function_call", "auto"),
    ("n", 2),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {}),
    ("service_tier", "flex"),
    ("reasoning_effort", "low"),
    ("verbosity", "low"),
    ("store", True),
    ("prompt_cache_retention", "24h"),
    ("frobnicate", 1),  # unknown
    ("prompt", "a"),  # a /v1/completions field
]

COMPLETION_REFUSED = [
    ("best_of", 2),
    ("echo", True),
    ("suffix", "x"),
    ("n", 3),
    ("tools", [TOOL]),
    ("messages", CHAT),  # a chat field
    ("frobnicate", None),  # unknown, even null
]


@pytest.mark.parametrize("field,value", CHAT_REFUSED, ids=[f for f, _ in CHAT_REFUSED])
def test_chat_refuses_what_it_does_not_do(client, field, value):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, extra_body={field: value})
    assert e.value.status_code == 400 and e.value.param == field, e.value.body
    assert e.value.type == "invalid_request_error"
    assert "not supported by this server" in e.value.message


@pytest.mark.parametrize("field,value", COMPLETION_REFUSED, ids=[f for f, _ in COMPLETION_REFUSED])
def test_completions_refuse_what_they_do_not_do(client, field, value):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="a b", max_tokens=2, extra_body={field: value})
    assert e.value.param == field, e.value.body
    assert "not supported by this server" in e.value.message


def test_the_sdk_s_own_arguments_are_refused_too(client):
    """As a user writes it, without extra_body: `tools=` used to be ignored (it is implemented now)."""
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, functions=[TOOL["function"]])
    assert e.value.param == "functions" and "function calling" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, tool_choice="required")
    assert e.value.param == "tool_choice" and "only allowed when tools are specified" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, response_format={"type": "grammar"})
    assert e.value.param == "response_format.type"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi", "name": "bob"}])
    assert e.value.param == "messages[0].name"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    assert e.value.param == "messages[0].content"


def test_fields_that_ask_for_nothing_more_are_accepted(client):
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=3, n=1, store=False, user="u-1",
        metadata={"team": "a"}, safety_identifier="s", tools=None, extra_body={"tool_choice": None})
    assert r.usage.completion_tokens <= 3
    r = client.completions.create(model=MODEL, prompt="a b", max_tokens=3, echo=False, best_of=1, n=1)
    assert r.usage.completion_tokens <= 3


def test_the_affinity_key_header(client, tiny_server):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=2)
    raw = client.chat.completions.with_raw_response.create(prompt_cache_key="tenant-7", user="u", **kw)
    assert raw.headers["x-slm-affinity-key"] == "tenant-7"
    raw = client.chat.completions.with_raw_response.create(user="u 1", **kw)
    assert raw.headers["x-slm-affinity-key"] == "u%201"
    raw = client.chat.completions.with_raw_response.create(**kw)
    assert "x-slm-affinity-key" not in raw.headers
    with client.chat.completions.with_streaming_response.create(stream=True, prompt_cache_key="t/é", **kw) as r:
        assert r.headers["x-slm-affinity-key"] == "t/%C3%A9"
        assert "[DONE]" in r.read().decode()
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="a", max_tokens=1,
                                                     extra_body={"prompt_cache_key": "k"})
    assert raw.headers["x-slm-affinity-key"] == "k"
    # An error after parsing carries it too (a proxy's retry goes to the same replica).
    status, headers, body = _raw(tiny_server, "POST", "/v1/chat/completions", json.dumps(
        {"model": "absent", "messages": CHAT, "prompt_cache_key": "k2"}).encode())
    assert status == 404 and headers["x-slm-affinity-key"] == "k2", body


# --- log probabilities and logit bias -------------------------------------------------------------

def _byte_level_id(tok, data: bytes) -> int | None:
    """The id of the vocabulary entry spelling `data` in GPT-2's byte-level alphabet."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    alphabet, extra = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(0x100 + extra)
            extra += 1
    return tok.token_to_id("".join(alphabet[b] for b in data))


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(ROOT / "target" / "test-models" / "tiny" / "tokenizer.json"))


def _check_greedy(entries, top_n):
    for e in entries:
        assert e.logprob <= 0
        assert len(e.top_logprobs) == top_n
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # Greedy and unbiased: the emitted token is the most likely.
        assert (e.top_logprobs[0].token, e.top_logprobs[0].logprob) == (e.token, e.logprob)
        assert e.top_logprobs[0].bytes == e.bytes


def test_chat_logprobs_at_temperature_0(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=16, temperature=0, logprobs=True, top_logprobs=5)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert content and len(content) <= r.usage.completion_tokens
    _check_greedy(content, 5)
    for e in content:
        assert e.token == bytes(e.bytes).decode("utf-8", errors="replace")
    # Streamed: the same entries, chunk by chunk.
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    # Without logprobs: none, and the same text.
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content
    none = client.chat.completions.create(**{**kw, "top_logprobs": 0})
    assert [e.top_logprobs for e in none.choices[0].logprobs.content] == [[]] * len(content)


def test_logprobs_on_the_real_model_spell_the_answer(tmp_path):
    """Each token's bytes, concatenated, are the answer's text (no special token, no stop)."""
    from openai import OpenAI

    url, proc, log = _start_serve(ROOT / "models", tmp_path / "serve.log")
    try:
        c = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=12,
                                      messages=[{"role": "user", "content": "What is the capital of Germany?"}],
                                      logprobs=True, top_logprobs=3)
        content = r.choices[0].logprobs.content
        assert "Berlin" in r.choices[0].message.content
        assert b"".join(bytes(e.bytes) for e in content).decode() == r.choices[0].message.content
        assert "".join(e.token for e in content) == r.choices[0].message.content
        _check_greedy(content, 3)
        assert any(e.token.strip() == "Berlin" and e.logprob > -1 for e in content)
    finally:
        _stop_serve(proc, log)


def test_completions_logprobs_shape(client):
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=10, temperature=0, logprobs=3)
    r = client.completions.create(**kw)
    lp = r.choices[0].logprobs
    n = len(lp.tokens)
    assert 0 < n <= r.usage.completion_tokens
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 4  # the 3 most likely, and the chosen token
        assert top[token] == logprob
        assert max(top.values()) == logprob  # greedy
    assert lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] <= len(r.choices[0].text)
    chunks = list(client.completions.create(stream=True, **kw))
    streamed = {k: [x for c in chunks if c.choices and c.choices[0].logprobs for x in getattr(c.choices[0].logprobs, k)]
                for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert streamed == {k: getattr(lp, k) for k in streamed}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_logit_bias_bans_and_forces(client, tiny_tokenizer):
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=4, temperature=0)
    greedy = client.completions.create(logprobs=2, **kw)
    first = greedy.choices[0].logprobs
    banned = _byte_level_id(tiny_tokenizer, first.tokens[0].encode())
    assert banned is not None, first.tokens[0]
    runner_up = min(first.top_logprobs[0].items(), key=lambda kv: -kv[1] if kv[0] != first.tokens[0] else 1e9)
    r = client.completions.create(logprobs=2, logit_bias={str(banned): -100}, **kw)
    lp = r.choices[0].logprobs
    assert r.choices[0].text != greedy.choices[0].text
    # The second most likely comes out; log probabilities are the model's, before the bias.
    assert (lp.tokens[0], lp.token_logprobs[0]) == runner_up
    assert lp.top_logprobs[0][first.tokens[0]] == first.token_logprobs[0]
    # +100 forces a token, every time.
    forced = tiny_tokenizer.token_to_id("Ġhello")
    r = client.completions.create(logit_bias={str(forced): 100}, **kw)
    assert r.choices[0].text == " hello" * 4
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0.9, seed=1,
                                          logit_bias={str(forced): 100})
    assert chat.choices[0].message.content == " hello" * 3


def test_frequency_penalty_discourages_repeats(client):
    kw = dict(model=MODEL, prompt="a b a b", max_tokens=40, temperature=0, logprobs=0)
    plain = client.completions.create(**kw).choices[0].logprobs.tokens
    penalised = client.completions.create(frequency_penalty=2, presence_penalty=2, **kw).choices[0].logprobs.tokens
    assert penalised != plain
    assert len(set(penalised)) >= len(set(plain))


@pytest.mark.parametrize("endpoint,fields,param", [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logit_bias": {"49152": 1}}, "logit_bias"),  # the vocabulary has 49152 tokens
    ("chat", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("chat", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("chat", {"frequency_penalty": 2.5}, "frequency_penalty"),
    ("chat", {"presence_penalty": -3}, "presence_penalty"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"logit_bias": {"-1": 1}}, "logit_bias"),
])
def test_bad_logprob_and_bias_values_name_the_field(client, endpoint, fields, param):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "chat":
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, extra_body=fields)
        else:
            client.completions.create(model=MODEL, prompt="a", max_tokens=2, extra_body=fields)
    assert e.value.param == param, e.value.body
