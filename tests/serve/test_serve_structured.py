"""Structured output and tool calls through the server, with the official openai client (streamed and not)."""

import json
import re

import httpx
import jsonschema
import openai
import pytest
from serve_helpers import running_server

from lmforge.engine import Engine, EngineConfig
from lmforge.serve.server import create_app

MODEL = "tiny"
SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "temp": {"type": "integer", "minimum": -30,
          "maximum": 45}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2}},
          "required": ["city", "temp", "tags"], "additionalProperties": False}  # fmt: skip
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
           "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"], "additionalProperties": False}}}  # fmt: skip
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
       "a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "integer", "minimum": 0, "maximum": 9}},
       "required": ["a", "b"], "additionalProperties": False}}}  # fmt: skip
PARAMS = {"get_weather": WEATHER["function"]["parameters"], "add": ADD["function"]["parameters"]}
MSGS = [{"role": "user", "content": "Weather in Paris, and 2+3?"}]


@pytest.fixture(scope="module")
def server(tiny, tokenizer):
    engine = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.05, block_size=8))
    with running_server(create_app(engine, MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_response_format_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model=MODEL, messages=MSGS, response_format=fmt, max_tokens=200, temperature=1.0, seed=1, n=3)
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    chunks = client.chat.completions.create(model=MODEL, messages=MSGS, response_format=fmt, max_tokens=200, stream=True, seed=2)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_guided_regex(client):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, response_format={"type": "json_object"}, max_tokens=120,
                                       temperature=0.7, seed=0)  # fmt: skip
    if r.choices[0].finish_reason == "stop":  # any JSON object may be long; when it ends, it is one
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")
    c = client.completions.create(model=MODEL, prompt="Code:", max_tokens=12, extra_body={"guided_regex": "[A-Z]{2}-[0-9]{3}"})
    assert re.fullmatch("[A-Z]{2}-[0-9]{3}", c.choices[0].text)


def check_calls(calls, names):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


@pytest.mark.parametrize("choice, names", [("required", {"get_weather", "add"}),
                                           ({"type": "function", "function": {"name": "add"}}, {"add"})])  # fmt: skip
def test_tool_calls(client, choice, names):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, tools=[WEATHER, ADD], tool_choice=choice, max_tokens=120, seed=3)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    check_calls(msg.tool_calls, names)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MSGS, tools=[WEATHER, ADD], tool_choice=choice,
                                                 max_tokens=120, seed=4, stream=True))  # fmt: skip
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    check_calls([d for d in deltas], names)
    # the calls and their results go back in as history
    history = MSGS + [{"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in msg.tool_calls]},
                      {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "18 C"}]  # fmt: skip
    follow = client.chat.completions.create(model=MODEL, messages=history, max_tokens=5)
    assert follow.choices[0].message.content is not None


def test_tool_choice_auto_gives_text_or_valid_calls(client):
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=MSGS, tools=[WEATHER, ADD], tool_choice="auto", max_tokens=40, seed=seed)
        msg = r.choices[0].message
        if msg.tool_calls:
            check_calls(msg.tool_calls, {"get_weather", "add"})
        else:
            assert not msg.content.startswith("<")


@pytest.mark.parametrize("extra, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}}, "response_format", "invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format", "uniqueItems"),
    ({"response_format": {"type": "yaml"}}, "response_format", "'response_format.type' must be one of 'text', 'json_object', 'json_schema'"),
    ({"guided_regex": "(?=a)b"}, "guided_regex", "look-around"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "must be unique"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "names no tool"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format", "cannot be combined with tools"),
])  # fmt: skip
def test_bad_constraints_are_400_naming_the_field(server, extra, param, words):
    r = httpx.post(server + "/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"]
