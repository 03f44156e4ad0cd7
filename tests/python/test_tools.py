"""Tool calling over HTTP (`tools`, `tool_choice`, `parallel_tool_calls`, `tool_calls`), end to end
through `slm serve` on the default model, as the official openai SDK and LangChain's ChatOpenAI use
it.

The model is a 135M one: it calls tools when told to (`required` or a named function), so most tests
force the call; the calls always name a listed tool and their arguments always validate against its
parameters, because they are constrained while generated. Covered: forced and named calls, one call
with `parallel_tool_calls=False`, `none` gives text, the round trip (the assistant's calls and the
tools' results sent back, then a text answer), streamed and non-streamed alike (OpenAI's chunk
framing checked on the raw events), log probabilities of a tool-call answer, the 400s (param names),
LangChain's `bind_tools` and `with_structured_output`. Temperature 0 throughout.
"""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
from pydantic import BaseModel

from conftest import ROOT
from test_http import _raw, _start_serve, _stop_serve

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 128
CALL_ID = re.compile(r"call_[A-Za-z0-9]{24}")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "description": "The city, e.g. Paris"},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current time in a time zone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                   "required": ["timezone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
RESULT = json.dumps({"city": "Paris", "temperature": 18, "unit": "celsius", "conditions": "sunny"})


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    url, proc, log = _start_serve(ROOT / "models", log_path)
    yield url
    _stop_serve(proc, log)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


def _check_calls(calls, tools=TOOLS, names=None):
    """Each call: an id, type function, a listed tool (one of `names`), arguments valid JSON against its
    parameters. Returns [(name, arguments dict)]."""
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    assert calls, "no tool calls"
    out = []
    for c in calls:
        assert CALL_ID.fullmatch(c.id), c.id
        assert c.type == "function"
        assert c.function.name in (names or by_name), c.function.name
        args = json.loads(c.function.arguments)
        jsonschema.validate(args, by_name[c.function.name]["parameters"])
        out.append((c.function.name, args))
    assert len({c.id for c in calls}) == len(calls), "ids repeat"
    return out


def _create(client, **kw):
    return client.chat.completions.create(**{"model": MODEL, "messages": ASK, "tools": TOOLS, "temperature": 0,
                                             "max_tokens": MAX_TOKENS, **kw})


def test_required_gives_valid_calls(client):
    r = _create(client, tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.role == "assistant" and choice.message.content is None
    assert choice.logprobs is None
    calls = _check_calls(choice.message.tool_calls)
    print(calls)
    assert r.usage.completion_tokens > 0


def test_a_named_function(client):
    for name in ("get_weather", "get_time"):
        r = _create(client, tool_choice={"type": "function", "function": {"name": name}})
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = _check_calls(choice.message.tool_calls, names=[name])
        assert {n for n, _ in calls} == {name}


def test_parallel_tool_calls_false_gives_one_call(client):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = _create(client, tool_choice=choice, parallel_tool_calls=False)
        assert r.choices[0].finish_reason == "tool_calls"
        assert len(r.choices[0].message.tool_calls) == 1, r.choices[0].message.tool_calls
        _check_calls(r.choices[0].message.tool_calls)


def test_none_gives_text(client):
    r = _create(client, tool_choice="none", max_tokens=24)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length"), choice
    assert choice.message.tool_calls is None
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    # Streamed: text chunks only.
    chunks = list(_create(client, tool_choice="none", max_tokens=24, stream=True))
    assert all(c.choices[0].delta.tool_calls is None for c in chunks if c.choices)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content


def test_auto_answers_text_or_valid_calls(client):
    r = _create(client, tool_choice="auto")
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        _check_calls(choice.message.tool_calls)
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content
    # Absent tool_choice is auto: the same answer.
    same = _create(client).choices[0]
    assert (same.finish_reason, same.message.content) == (choice.finish_reason, choice.message.content)
    if choice.message.tool_calls:
        _same(same.message.tool_calls, [{"name": c.function.name, "arguments": c.function.arguments}
                                        for c in choice.message.tool_calls])


def _answers(calls):
    """The tools' results, one message per call."""
    return [{"role": "tool", "tool_call_id": c.id, "content": RESULT} for c in calls]


def test_the_round_trip(client):
    """As the SDK's users write it: the assistant message appended as it came, then the results."""
    r = _create(client, tool_choice="required")
    message = r.choices[0].message
    messages = [*ASK, message, *_answers(message.tool_calls)]
    again = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=48)
    choice = again.choices[0]
    assert choice.finish_reason in ("stop", "length"), choice
    assert choice.message.tool_calls is None and choice.message.content.strip()
    print(choice.message.content)
    # Without tools at all (the conversation alone), and with auto: still an answer.
    for kw in ({}, {"tools": TOOLS, "tool_choice": "auto"}):
        r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=48, **kw)
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls"), r.choices[0]


def _stream(client, **kw):
    """A streamed request: the chunks and the calls put together from them, checking OpenAI's framing
    on the way: one call per chunk; a call's first chunk carries index, id, type and name with
    arguments "", the others index and arguments alone; the last choice chunk is `delta: {}` with the
    finish reason."""
    chunks = list(_create(client, stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    choices = [c.choices[0] for c in chunks[:-1]]
    assert choices[0].delta.role == "assistant"
    assert all(c.delta.role is None for c in choices[1:])
    calls = {}
    for c in choices[:-1]:
        assert c.finish_reason is None
        if not c.delta.tool_calls:
            continue
        assert c.delta.content is None
        (d,) = c.delta.tool_calls
        if d.index not in calls:
            assert d.index == len(calls), "indexes in order"
            assert CALL_ID.fullmatch(d.id) and d.type == "function" and d.function.name, d
            assert d.function.arguments == "", d
            calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
        else:
            assert d.id is None and d.type is None and d.function.name is None, d
            assert d.function.arguments, d
            calls[d.index]["arguments"] += d.function.arguments
    last = choices[-1]
    assert last.delta.content is None and last.delta.tool_calls is None and last.delta.role is None
    return chunks, last.finish_reason, [calls[i] for i in sorted(calls)]


def _same(calls, streamed):
    """Non-streamed calls equal streamed ones, but for their ids (random per request)."""
    assert [(c.function.name, c.function.arguments) for c in calls] == \
        [(c["name"], c["arguments"]) for c in streamed]


def test_streamed_equals_non_streamed(client):
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        r = _create(client, tool_choice=choice)
        _, finish, streamed = _stream(client, tool_choice=choice)
        assert finish == r.choices[0].finish_reason == "tool_calls"
        _same(r.choices[0].message.tool_calls, streamed)


def test_the_round_trip_streamed(client):
    _, finish, calls = _stream(client, tool_choice="required")
    assert finish == "tool_calls"
    assistant = {"role": "assistant", "content": None, "tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls]}
    answers = [{"role": "tool", "tool_call_id": c["id"], "content": RESULT} for c in calls]
    kw = dict(model=MODEL, messages=[*ASK, assistant, *answers], tools=TOOLS, tool_choice="none",
              temperature=0, max_tokens=48)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].delta.tool_calls is None for c in chunks if c.choices)


def _events(server, body):
    """The raw `data:` events of a streamed request, as JSON (without [DONE])."""
    status, headers, raw = _raw(server, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200 and headers["content-type"] == "text/event-stream", raw
    data = [line[len("data: "):] for line in raw.decode().split("\n\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_the_raw_framing(client, server):
    """The exact keys OpenAI sends: `content: null` next to the role and the first call, `arguments: ""`
    in a call's first chunk, nothing else in the others; non-streamed `content: null`."""
    body = dict(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=MAX_TOKENS,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    events = _events(server, {**body, "stream": True})
    first = events[0]["choices"][0]
    assert first["delta"] == {"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": first["delta"]["tool_calls"][0]["id"], "type": "function",
         "function": {"name": "get_weather", "arguments": ""}}]}, first
    assert first["finish_reason"] is None and first["logprobs"] is None
    arguments = ""
    for e in events[1:-1]:
        (c,) = e["choices"]
        assert c["finish_reason"] is None and c["logprobs"] is None
        (d,) = c["delta"]["tool_calls"]
        assert c["delta"] == {"tool_calls": [d]} and set(d) in ({"index", "function"}, {"index", "id", "type", "function"})
        if "id" not in d:
            assert set(d["function"]) == {"arguments"}, d
            arguments += d["function"]["arguments"]
    assert events[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "tool_calls", "logprobs": None}]
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    status, _, raw = _raw(server, "POST", "/v1/chat/completions", json.dumps(body).encode())
    r = json.loads(raw)
    assert status == 200 and r["object"] == "chat.completion", r
    message = r["choices"][0]["message"]
    assert set(message) == {"role", "content", "tool_calls"} and message["content"] is None, message
    assert r["choices"][0]["finish_reason"] == "tool_calls" and r["choices"][0]["logprobs"] is None
    assert "".join(c["function"]["arguments"] for c in message["tool_calls"]) == arguments


def test_logprobs_of_a_tool_call_answer(client):
    """Asked for, they are `{"content": null, "refusal": null}`: a tool call is not message content. The
    same streamed, on every chunk."""
    r = _create(client, tool_choice="required", logprobs=True, top_logprobs=2)
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].logprobs.content is None and r.choices[0].logprobs.refusal is None
    chunks, _, calls = _stream(client, tool_choice="required", logprobs=True, top_logprobs=2)
    _same(r.choices[0].message.tool_calls, calls)
    for c in chunks[:-1]:
        assert c.choices[0].logprobs.content is None, c
    # A text answer with tools still has its tokens.
    r = _create(client, tool_choice="none", logprobs=True, max_tokens=8)
    assert len(r.choices[0].logprobs.content) > 0


BAD = [
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "x", "parameters": "{}"}}]},
     "tools[1].function.parameters"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "x"}, "x": 1}]}, "tools[1].x"),
    ({"tools": []}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "send_email"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"tools": [WEATHER], "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    # The generator's refusals: a schema that is not one, tools with a response format.
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "frobnicate"}}}]}, "tools"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tools"),
]


@pytest.mark.parametrize("fields,param", BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_bad_tools_are_refused(client, fields, param):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, extra_body=fields)
    assert e.value.status_code == 400 and e.value.param == param, e.value.body
    assert e.value.type == "invalid_request_error"


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
BAD_MESSAGES = [
    ([{"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], "messages[1].role"),
    ([{"role": "assistant", "tool_calls": [CALL]}], "messages[1].tool_calls"),
    ([{"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "call_2", "content": "x"}],
     "messages[2].tool_call_id"),
    ([{"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "x"}], "messages[2].tool_call_id"),
    ([{"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "get_weather"}}]},
      {"role": "tool", "tool_call_id": "call_1", "content": "x"}], "messages[1].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [{**CALL, "index": 0}]},
      {"role": "tool", "tool_call_id": "call_1", "content": "x"}], "messages[1].tool_calls[0].index"),
    ([{"role": "user", "content": "x", "tool_call_id": "call_1"}], "messages[1].tool_call_id"),
]


@pytest.mark.parametrize("more,param", BAD_MESSAGES, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_MESSAGES)])
def test_bad_tool_messages_are_refused(client, more, param):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[*ASK, *more], tools=[WEATHER], max_tokens=2)
    assert e.value.status_code == 400 and e.value.param == param, e.value.body


def test_completions_take_no_tools(client):
    import openai

    for field, value in (("tools", [WEATHER]), ("tool_choice", "none"), ("parallel_tool_calls", False)):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="a", max_tokens=2, extra_body={field: value})
        assert e.value.param == field, e.value.body


# --- LangChain ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(server):
    from langchain_openai import ChatOpenAI

    # 512: with tool_choice="required" the greedy answer on AVX2-only CPUs makes several calls
    # before it stops (the float kernels round differently from AVX-512's, issue 17).
    return ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=512,
                      max_retries=0, timeout=300)


def test_langchain_bind_tools(llm):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return f"It is sunny and 18 degrees in {city}."

    class GetTime(BaseModel):
        """Get the current time in a time zone."""

        timezone: str

    bound = llm.bind_tools([get_weather, GetTime], tool_choice="required")
    ask = HumanMessage("What is the weather in Paris?")
    msg = bound.invoke([ask])
    assert msg.tool_calls, msg
    for call in msg.tool_calls:
        assert call["name"] in ("get_weather", "GetTime") and CALL_ID.fullmatch(call["id"]), call
        assert isinstance(call["args"], dict)
        if call["name"] == "get_weather":
            assert set(call["args"]) == {"city"} and isinstance(call["args"]["city"], str)
        else:
            GetTime(**call["args"])
    assert msg.response_metadata["finish_reason"] == "tool_calls"
    # A named tool, as bind_tools takes it.
    msg = llm.bind_tools([get_weather, GetTime], tool_choice="get_weather").invoke([ask])
    assert [c["name"] for c in msg.tool_calls] == ["get_weather"] * len(msg.tool_calls)
    # Run the tools and send the results back: a text answer.
    results = [get_weather.invoke(c) if c["name"] == "get_weather" else ToolMessage("12:00", tool_call_id=c["id"])
               for c in msg.tool_calls]
    assert all(isinstance(m, ToolMessage) for m in results)
    answer = llm.bind_tools([get_weather, GetTime], tool_choice="none").invoke([ask, msg, *results])
    assert not answer.tool_calls and isinstance(answer.content, str) and answer.content.strip()
    # Streamed, LangChain puts the chunks together into the same calls.
    streamed = None
    for chunk in llm.bind_tools([get_weather], tool_choice="get_weather").stream([ask]):
        streamed = chunk if streamed is None else streamed + chunk
    whole = llm.bind_tools([get_weather], tool_choice="get_weather").invoke([ask])
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(c["name"], c["args"]) for c in whole.tool_calls]


class CityInfo(BaseModel):
    name: str
    country: str


def test_langchain_structured_output(server):
    from langchain_openai import ChatOpenAI

    # As README advises for a 135M model: ask for JSON in a message and a mild frequency penalty.
    llm = ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=MAX_TOKENS,
                     frequency_penalty=0.5, max_retries=0, timeout=300)
    out = llm.with_structured_output(CityInfo).invoke(
        [("system", "Answer in JSON."), ("human", "Tell me about Paris: its name and country.")])
    assert isinstance(out, CityInfo), out
    # The function-calling method goes through tools.
    out = llm.with_structured_output(CityInfo, method="function_calling").invoke(
        [("system", "Answer in JSON."), ("human", "Tell me about Paris: its name and country.")])
    assert isinstance(out, CityInfo), out
