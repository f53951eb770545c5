"""Tool calling: request checks, the call grammar (random logits can only produce valid calls), prompts, parsing."""

import json

import jsonschema
import pytest
import torch

from lmforge.engine.constraints import Constraint, mask_logits
from lmforge.tokenizer import load_tokenizer
from lmforge.tools import ToolError, parse_tool_calls, parse_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                          "unit": {"enum": ["C", "F"]}}, "required": ["city"], "additionalProperties": False}}}  # fmt: skip
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
       "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}}}  # fmt: skip
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "add": ADD["function"]["parameters"]}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def sample(tok, grammar, seed, steps=300, unfinished_ok=False):
    g = torch.Generator().manual_seed(seed)
    state, out = Constraint(grammar, tok), []
    for _ in range(steps):
        logits = torch.randn(1, tok.vocab_size, generator=g) * 3
        mask_logits(logits, [state])
        t = int(torch.multinomial(logits[0].softmax(-1), 1, generator=g))
        if t in tok.eos_ids:
            return tok.decode(out)
        state.advance(t)
        out.append(t)
    assert unfinished_ok, f"no end after {steps} tokens: {tok.decode(out)!r}"
    return tok.decode(out)


def check_calls(calls, allowed):
    assert calls
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_") and c["function"]["name"] in allowed
        jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[c["function"]["name"]])


@pytest.mark.parametrize("seed", range(2))
def test_required_gives_only_valid_calls(tok, seed):
    tools = parse_tools([WEATHER, ADD], "required")
    content, calls = parse_tool_calls(sample(tok, tools.grammar(), seed))
    assert content is None
    check_calls(calls, {"get_weather", "add"})


@pytest.mark.parametrize("seed", range(2))
def test_a_named_function_is_the_only_one_called(tok, seed):
    tools = parse_tools([WEATHER, ADD], {"type": "function", "function": {"name": "add"}}, parallel_tool_calls=False)
    content, calls = parse_tool_calls(sample(tok, tools.grammar(), seed))
    assert len(calls) == 1
    check_calls(calls, {"add"})


def test_auto_is_text_or_valid_calls(tok):
    tools = parse_tools([WEATHER, ADD], "auto")
    for seed in range(3):
        text = sample(tok, tools.grammar(), seed, steps=40, unfinished_ok=True)  # plain text need not end
        content, calls = parse_tool_calls(text)
        if calls:
            check_calls(calls, {"get_weather", "add"})
        elif not text.startswith("<tool_call>"):
            assert not text.startswith("<")  # text may not open like a call
    assert parse_tools([WEATHER], "none").grammar() is None


def test_prompt_lists_the_tools_and_renders_past_calls(tok):
    tools = parse_tools([WEATHER], "auto")
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},  # fmt: skip
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    messages = tools.render(history, tok)
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.")
    assert '"get_weather"' in messages[0]["content"] and "<tool_call>" in messages[0]["content"]
    assert messages[2]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    text = tok.apply_chat_template(messages)
    assert "18 C, sunny" in text and text.endswith("<|im_start|>assistant\n")


def test_parse_tool_calls():
    assert parse_tool_calls("Just text.") == ("Just text.", [])
    content, calls = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
                                      '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>')  # fmt: skip
    assert content is None and [json.loads(c["function"]["arguments"]) for c in calls] == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    assert len({c["id"] for c in calls}) == 2
    assert parse_tool_calls("<tool_call>{broken</tool_call>")[1] == []


@pytest.mark.parametrize("tools, choice, param, message", [
    ([WEATHER, WEATHER], None, "tools", "tool names must be unique"),
    ([{"type": "function", "function": {"name": "bad name!"}}], None, "tools", "letters, digits"),
    ([{"type": "retrieval"}], None, "tools", "tools\\[0\\]"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}}}], None,
     "tools", "tools\\[0\\].function.parameters' \\(f\\).*uniqueItems"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice", "names no tool"),
    ([WEATHER], "sometimes", "tool_choice", "must be 'none', 'auto', 'required'"),
    (None, "required", "tool_choice", "needs 'tools'"),
    ([], "required", "tool_choice", "at least one tool"),
])  # fmt: skip
def test_bad_requests_name_the_field(tools, choice, param, message):
    with pytest.raises(ToolError, match=message) as e:
        parse_tools(tools, choice)
    assert e.value.param == param
