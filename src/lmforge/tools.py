"""Tool calling, OpenAI-style: tools in the prompt, calls constrained to each tool's JSON Schema.

    tools = parse_tools(request["tools"], request.get("tool_choice"))      # checked; errors name the field
    messages = tools.render(messages, tokenizer)                          # tools described to the model
    grammar = tools.grammar()                                             # what the reply may be
    content, calls = parse_tool_calls(text)                               # the reply as OpenAI tool_calls

A call is written the way Hermes/Qwen-style models write it, ``<tool_call>{"name": ..., "arguments":
{...}}</tool_call>``; the grammar (a Lark grammar with each tool's schema inlined, compiled by
llguidance in ``engine/constraints.py``) makes every call name a real tool and carry arguments that
validate against that tool's schema. With ``tool_choice="auto"`` the reply is either plain text
(which may not open with ``<``) or calls; ``"required"`` allows only calls; a named function
allows only calls of it; ``"none"`` leaves the reply free and the tools out of the prompt.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from lmforge.engine.constraints import ConstraintError, Grammar, compile_grammar
from lmforge.errors import UserError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names
_NAME = re.compile(NAME_PATTERN)
_CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.S)


class ToolError(UserError, ValueError):
    """A tools / tool_choice request that can't be honoured; ``param`` names the field (HTTP 400)."""

    def __init__(self, message: str, param: str | None = "tools"):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict


@dataclass
class ToolSet:
    tools: list[Tool]
    choice: str  # "none" | "auto" | "required" | "function"
    forced: str | None = None  # the function's name when choice == "function"
    parallel: bool = True
    _grammar: Grammar | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def callable_tools(self) -> list[Tool]:
        return [t for t in self.tools if self.forced in (None, t.name)]

    def grammar(self) -> Grammar | None:
        """What the reply may be (None: anything)."""
        if not self.active:
            return None
        if self._grammar is None:
            calls = " | ".join(f'"{CALL_OPEN}" %json {json.dumps(_call_schema(t), sort_keys=True)} "{CALL_CLOSE}"' for t in self.callable_tools())
            rules = [f"call: {calls}", 'calls: call ("\\n" call)*' if self.parallel else "calls: call"]
            if self.choice == "auto":
                rules.insert(0, "start: TEXT | calls")
                rules.append(r"TEXT: /[^<][\s\S]*/")
            else:
                rules.insert(0, "start: calls")
            try:
                self._grammar = compile_grammar(grammar="\n".join(rules), param="tools")
            except ConstraintError as e:
                raise ToolError(str(e)) from None
        return self._grammar

    def render(self, messages: list[dict], tokenizer) -> list[dict]:
        """Messages for the chat template: past calls and tool results as text, and — for a template that
        doesn't render tools itself — a system message that lists the tools and how to call them."""
        out = [_as_text(m) for m in messages]
        if not self.active:
            return out
        template = tokenizer.chat_template or ""
        if "tools" in template:  # the model's own template describes tools (pass tools= when rendering)
            return out
        listing = "\n".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}) for t in self.callable_tools())
        how = ("You must call a function." if self.choice != "auto" else "Call a function when it helps; otherwise answer normally.")
        note = (f"You can call these functions:\n{listing}\n{how} To call one, reply with "
                f'{CALL_OPEN}{{"name": <function name>, "arguments": <JSON object>}}{CALL_CLOSE}')  # fmt: skip
        if out and out[0]["role"] == "system":
            return [{**out[0], "content": f"{out[0]['content']}\n\n{note}"}, *out[1:]]
        return [{"role": "system", "content": note}, *out]

    def openai_tools(self) -> list[dict]:
        """The tools as a chat template's ``tools`` variable expects them."""
        return [{"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}} for t in self.tools]


def _call_schema(tool: Tool) -> dict:
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
            "required": ["name", "arguments"], "additionalProperties": False,
            "x-guidance": {"whitespace_flexible": False}}  # compact JSON: no endless whitespace  # fmt: skip


def _as_text(message: dict) -> dict:
    """An assistant turn that called tools, or a tool's result, as plain text a chat template can render."""
    m = dict(message)
    if m.get("role") == "assistant" and m.get("tool_calls"):
        calls = [json.dumps({"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments", "{}"))}) for c in m["tool_calls"]]
        m["content"] = (m.get("content") or "") + "\n".join(f"{CALL_OPEN}{c}{CALL_CLOSE}" for c in calls)
        m.pop("tool_calls")
    elif m.get("role") == "tool":
        m.pop("tool_call_id", None)
    if m.get("content") is None:
        m["content"] = ""
    return m


def _arguments(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def parse_tools(tools, tool_choice=None, parallel_tool_calls: bool | None = None) -> ToolSet:
    """Check OpenAI ``tools`` / ``tool_choice``; every problem is one sentence naming the field."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise ToolError("'tool_choice' needs 'tools'.", "tool_choice")
        return ToolSet([], "none")
    if not isinstance(tools, list):
        raise ToolError("'tools' must be a list of {'type': 'function', 'function': {...}} objects.")
    parsed, seen = [], {}
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise ToolError(f"'{where}' must be {{'type': 'function', 'function': {{'name': ..., 'parameters': {{...}}}}}}.")
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"'{where}.function.name' must be 1-64 letters, digits, '_' or '-', got {name!r}.")
        if name in seen:
            raise ToolError(f"'{where}.function.name' {name!r} is already the name of tools[{seen[name]}]; tool names must be unique.")
        seen[name] = i
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolError(f"'{where}.function.parameters' must be a JSON Schema object.")
        try:
            compile_grammar(json_schema=params)
        except ConstraintError as e:
            raise ToolError(f"'{where}.function.parameters' ({name}): {e}") from None
        desc = f.get("description") or ""
        if not isinstance(desc, str):
            raise ToolError(f"'{where}.function.description' must be a string.")
        parsed.append(Tool(name, desc, params))
    choice, forced = "auto", None
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ToolError(f"'tool_choice' must be 'none', 'auto', 'required' or {{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}.", "tool_choice")  # fmt: skip
        choice = tool_choice
    elif isinstance(tool_choice, dict):
        forced = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
        if forced not in seen:
            raise ToolError(f"'tool_choice' names no tool of this request ({forced!r}); tools: {', '.join(seen) or 'none'}.", "tool_choice")  # fmt: skip
        choice = "function"
    elif tool_choice is not None:
        raise ToolError("'tool_choice' must be a string or an object.", "tool_choice")
    if choice in ("required", "function") and not parsed:
        raise ToolError(f"'tool_choice' {choice!r} needs at least one tool.", "tool_choice")
    return ToolSet(parsed, choice, forced, parallel=parallel_tool_calls is not False)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a reply: OpenAI's ``tool_calls`` with fresh ids and JSON-string arguments.

    Text that holds no complete call is content; calls come back in order, and content is None when
    the reply was calls only (as OpenAI returns it).
    """
    calls = []
    for match in _CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}})  # fmt: skip
    if not calls:
        return text, []
    rest = _CALL.sub("", text).strip()
    return (rest or None), calls
