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
    ("tools", [TOOL]),
    ("tool_choice", "auto"),
    ("parallel_tool_calls", False),
    ("functions", [TOOL["function"]]),
    ("function_call", "auto"),
    ("response_format", {"type": "json_object"}),
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
    """As a user writes it, without extra_body: `tools=` used to be ignored."""
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, tools=[TOOL])
    assert e.value.param == "tools" and "tool calling" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, response_format={"type": "json_object"})
    assert e.value.param == "response_format"
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
