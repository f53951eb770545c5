"""The server's request bodies as pydantic models: what FastAPI validates before an endpoint runs,
and what ``/openapi.json`` (and the ``/docs`` page) describes.

    CompletionRequest      POST /v1/completions
    ChatCompletionRequest  POST /v1/chat/completions
    EmbeddingRequest       POST /v1/embeddings

OpenAI's fields, plus vLLM-style extras (top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos,
skip_special_tokens, guided_json / guided_regex / guided_grammar). The rules:

* Unknown fields are refused; ``null`` means "not given" (the default), as OpenAI's clients expect.
* Types are strict: an integer is not ``true``, a number is finite (no NaN or Infinity), a string is
  valid Unicode (a lone surrogate such as ``"\\ud800"`` is refused, anywhere a tokenizer or grammar
  compiler would see it, JSON Schemas and tool definitions included).
* Fields OpenAI has and this server cannot honour (``logit_bias``, ``suffix``, ``audio``, ...) are
  accepted only when empty; anything else is "not supported", never silently ignored.
* What depends on the served model (token ids inside its vocabulary, prompts inside its context,
  schemas its grammar engine compiles) is checked by the endpoint, and also names the field.

A request's problems come back as pydantic errors whose location is the field's path; the server
turns the first into one sentence (serve/server.py, ``validation_error``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, StrictBool, Strict, Tag,
                      ValidationInfo, WithJsonSchema, field_validator, model_validator)  # fmt: skip
from pydantic_core import PydanticCustomError

from lmforge.engine.sampler import MAX_LOGPROBS
from lmforge.tools import NAME_PATTERN

MAX_N = 128  # the most samples (n) one request may ask for
INT32_MAX = 2**31 - 1  # bounds counts and token ids: no vocabulary or context comes near it
# a seed is a signed 64-bit integer, -2**63 <= seed < 2**63: seed + sample index (< MAX_N) always fits torch's
# generator (which takes -2**63 .. 2**64 - 1). Both bounds are powers of two, which OpenAPI's numbers (doubles) hold exactly.
SEED_MIN, SEED_END = -(2**63), 2**63


# --- checked scalars -----------------------------------------------------------------------------
def _valid_unicode(s: Any) -> Any:
    if isinstance(s, str) and not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PydanticCustomError("unicode", "must be valid Unicode, but character {position} is a lone surrogate ({char})",
                                      {"position": e.start, "char": f"U+{ord(s[e.start]):04X}"}) from None  # fmt: skip
    return s


def _text(**constraints: Any) -> Any:
    """A string of valid Unicode (checked before pydantic-core, which could not read it, sees it)."""
    return Annotated[str, Strict(), Field(**constraints), BeforeValidator(_valid_unicode)]


Text = _text()
NonEmptyText = _text(min_length=1)
Int = Annotated[int, Strict()]
Num = Annotated[float, Strict(), Field(allow_inf_nan=False)]
TokenId = Annotated[int, Strict(), Field(ge=0, le=INT32_MAX)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


def _json_value(value: Any) -> Any:
    """A JSON value (a schema, tool arguments) whose strings are valid Unicode and whose numbers are
    finite. json.dumps checks both at C speed (a request may carry megabytes of it); only a value that
    fails is walked to say where."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except RecursionError:  # deeper than json.loads could just take
        raise PydanticCustomError("json_depth", "nests arrays and objects too deeply") from None
    except ValueError:  # a lone surrogate (UnicodeEncodeError), NaN or Infinity
        _find_bad_json(value)
    return value


def _find_bad_json(value: Any) -> None:
    """Raise the error of the first lone surrogate or non-finite number in ``value``, naming its path."""
    todo: list[tuple[Any, tuple]] = [(value, ())]
    while todo:
        v, path = todo.pop()
        where = {"where": f" at {''.join(f'[{k}]' if isinstance(k, int) else f'.{k}' for k in path)!r}" if path else ""}
        if isinstance(v, float) and not math.isfinite(v):
            raise PydanticCustomError("json_number", "must hold finite numbers only, not {value}{where}",
                                      {"value": json.dumps(v), **where})  # fmt: skip
        keys = [k for k in v if isinstance(k, str)] if isinstance(v, dict) else []
        for s in ([v] if isinstance(v, str) else keys):
            if not s.isascii():
                try:
                    _valid_unicode(s)
                except PydanticCustomError as e:
                    raise PydanticCustomError("unicode", "must be valid Unicode, but holds a lone surrogate ({char}){where}",
                                              {"char": e.context["char"], **where}) from None  # fmt: skip
        if isinstance(v, dict):
            todo.extend((item, (*path, key)) for key, item in reversed(v.items()))
        elif isinstance(v, list):
            todo.extend((item, (*path, i)) for i, item in reversed(list(enumerate(v))))


JsonObject = Annotated[dict[str, Any], AfterValidator(_json_value)]
JsonValue = Annotated[Any, AfterValidator(_json_value)]


def _union(kind: Callable[[Any], str | None], message: str, **members: Any) -> Any:
    """A union validated as the one member ``kind`` picks from the JSON shape, so that an error is that
    member's (the tags never show in a field's path: see ``validation_error`` in server.py)."""
    tagged = tuple(Annotated[t, Tag(name)] for name, t in members.items())
    return Annotated[Union[tagged], Discriminator(kind, custom_error_type="union_type", custom_error_message=message)]


def _text_or_list(v: Any) -> str | None:
    return "string" if isinstance(v, str) else "array" if isinstance(v, list) else None


def _prompt_kind(v: Any) -> str | None:
    if isinstance(v, list):
        return "token_ids" if not v or isinstance(v[0], int) else "batch"
    return "string" if isinstance(v, str) else None


def _prompt_item_kind(v: Any) -> str | None:
    return "string" if isinstance(v, str) else "token_ids" if isinstance(v, list) else None


PromptItem = _union(_prompt_item_kind, "must be a string or an array of token ids", string=NonEmptyText, token_ids=TokenIds)
Prompt = _union(_prompt_kind, "must be a string, an array of token ids, or an array of those",
                string=NonEmptyText, token_ids=TokenIds, batch=Annotated[list[PromptItem], Field(min_length=1)])  # fmt: skip
Stop = _union(_text_or_list, "must be a non-empty string or an array of them", string=NonEmptyText, array=list[NonEmptyText])


def _unsupported(schema: dict | None = None, allowed: Callable[[Any], bool] = lambda v: False) -> Any:
    """An OpenAI field this server cannot honour: accepted only empty, in the form ``schema`` describes
    (None: only null)."""

    def check(v: Any) -> Any:
        if not allowed(v):
            raise PydanticCustomError("unsupported", "is not supported by this server")
        return v

    json_schema = {"anyOf": [schema, {"type": "null"}]} if schema else {"type": "null"}
    return Annotated[Any, AfterValidator(check), WithJsonSchema(json_schema)]


Unsupported = _unsupported()
LogitBias = _unsupported({"type": "object", "maxProperties": 0}, lambda v: v == {})
Functions = _unsupported({"type": "array", "maxItems": 0}, lambda v: v == [])
FunctionCallMode = _unsupported({"enum": ["none"]}, lambda v: v == "none")
Modalities = _unsupported({"type": "array", "items": {"enum": ["text"]}, "minItems": 1, "maxItems": 1}, lambda v: v == ["text"])


# --- objects -------------------------------------------------------------------------------------
class _Object(BaseModel):
    """A JSON object of the API: ``null`` fields count as not given."""

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class _Request(_Object):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: StrictBool | None = Field(False, description="a last event with the request's token usage")
    continuous_usage_stats: StrictBool | None = Field(None, description="accepted for vLLM clients; ignored")


class TextFormat(_Object):
    type: Literal["text"]


class JsonObjectFormat(_Object):
    type: Literal["json_object"]


class JsonSchemaSpec(_Object):
    name: Text | None = None
    description: Text | None = None
    schema_: JsonObject = Field(alias="schema", description="the JSON Schema every reply must validate against")
    strict: StrictBool | None = None


class JsonSchemaFormat(_Object):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]
GuidedJson = _union(lambda v: "object" if isinstance(v, dict) else "string" if isinstance(v, str) else None,
                    "must be a JSON Schema (an object, or a string holding one)", object=JsonObject, string=Text)  # fmt: skip
CONSTRAINTS = ("response_format", "guided_json", "guided_regex", "guided_grammar")


class _Generation(_Request):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: Text = Field(description="the served model's name (GET /v1/models)")
    temperature: Num | None = Field(1.0, ge=0, le=2, description="0: greedy")
    top_p: Num | None = Field(1.0, gt=0, le=1, description="nucleus sampling; 1: off")
    top_k: Int | None = Field(0, ge=0, le=INT32_MAX, description="keep the k most likely tokens; 0: off")
    min_p: Num | None = Field(0.0, ge=0, le=1, description="drop tokens less likely than min_p x the most likely; 0: off")
    presence_penalty: Num | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: Num | None = Field(0.0, ge=-2, le=2)
    repetition_penalty: Num | None = Field(1.0, gt=0, description="CTRL's penalty on seen tokens; 1: off")
    seed: Int | None = Field(None, ge=SEED_MIN, lt=SEED_END, description="fixes the draws of this request")
    n: Int | None = Field(1, ge=1, le=MAX_N, description="samples per prompt")
    stop: Stop | None = Field(None, description="text ends right before the first of these strings")
    stop_token_ids: list[TokenId] | None = Field(None, description="generation ends after any of these tokens")
    ignore_eos: StrictBool | None = False
    skip_special_tokens: StrictBool | None = True
    response_format: ResponseFormat | None = None
    guided_json: GuidedJson | None = Field(None, description="a JSON Schema the reply must match")
    guided_regex: Text | None = Field(None, description="a regular expression the reply must match")
    guided_grammar: Text | None = Field(None, description="a Lark grammar the reply must match")
    stream: StrictBool | None = Field(False, description="server-sent events, ending in 'data: [DONE]'")
    stream_options: StreamOptions | None = None
    logit_bias: LogitBias = None
    user: str | None = Field(None, description="ignored")
    metadata: dict[str, Any] | None = Field(None, description="ignored")
    store: StrictBool | None = Field(None, description="ignored")
    service_tier: str | None = Field(None, description="ignored")

    @field_validator("guided_json", "guided_regex", "guided_grammar")
    @classmethod
    def _one_constraint(cls, value: Any, info: ValidationInfo) -> Any:
        for name in CONSTRAINTS[: CONSTRAINTS.index(info.field_name)]:
            other = info.data.get(name)
            if other is not None and getattr(other, "type", None) != "text":
                raise PydanticCustomError("conflict", "cannot be combined with '{other}': give one constraint", {"other": name})
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_streamed(cls, value: Any, info: ValidationInfo) -> Any:
        if not info.data.get("stream"):
            raise PydanticCustomError("conflict", "is only allowed with stream: true")
        return value


class CompletionRequest(_Generation):
    """POST /v1/completions."""

    prompt: Prompt = Field(description="a string, token ids, or an array of either (one completion each)")
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="the k most likely alternatives per token")
    echo: StrictBool | None = Field(False, description="the prompt comes back before the completion (not streamed)")
    max_tokens: Int | None = Field(None, ge=0, le=INT32_MAX,
                                   description="default 16; 0 only with echo (the prompt's logprobs alone)")
    best_of: Int | None = Field(None, ge=1, le=MAX_N, description="only best_of == n")
    suffix: Unsupported = None

    @field_validator("echo")
    @classmethod
    def _echo_unstreamed(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("stream"):
            raise PydanticCustomError("conflict", "is supported without streaming only: drop 'stream' or 'echo'")
        return value

    @field_validator("max_tokens")
    @classmethod
    def _zero_only_with_echo(cls, value: int, info: ValidationInfo) -> int:
        if value == 0 and not info.data.get("echo"):
            raise PydanticCustomError("conflict", "must be at least 1 (0 only with echo: true), got 0")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int, info: ValidationInfo) -> int:
        if value != info.data.get("n", 1):
            raise PydanticCustomError("unsupported", "is not supported by this server unless it equals n")
        return value


class TextPart(_Object):
    type: Literal["text"] = Field(description="only text parts are supported")
    text: Text


class FunctionCall(_Object):
    name: Text
    arguments: JsonValue = Field("{}", description="a JSON string or object")


class ToolCall(_Object):
    id: Text | None = None
    type: Literal["function"] | None = "function"
    function: FunctionCall


Content = _union(_text_or_list, "must be a string or an array of text parts", string=Text, array=list[TextPart])


class Message(_Object):
    role: Text = Field(description="system, user, assistant, tool, ... (whatever the model's chat template knows)")
    content: Content | None = ""
    name: Text | None = None
    tool_call_id: Text | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's earlier calls")


ToolName = _text(pattern=NAME_PATTERN)


class FunctionDef(_Object):
    name: ToolName
    description: Text | None = None
    parameters: JsonObject | None = Field(None, description="a JSON Schema of the arguments")
    strict: StrictBool | None = None


class ToolDef(_Object):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Object):
    name: Text


class NamedToolChoice(_Object):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = _union(lambda v: "mode" if isinstance(v, str) else "function" if isinstance(v, dict) else None,
                    "must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
                    mode=Literal["none", "auto", "required"], function=NamedToolChoice)  # fmt: skip


class ChatCompletionRequest(_Generation):
    """POST /v1/chat/completions."""

    messages: Annotated[list[Message], Field(min_length=1)]
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = True
    logprobs: StrictBool | None = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="needs logprobs: true")
    max_tokens: Int | None = Field(None, ge=1, le=INT32_MAX, description="default: what the context leaves")
    max_completion_tokens: Int | None = Field(None, ge=1, le=INT32_MAX, description="max_tokens' new name; wins over it")
    functions: Functions = None
    function_call: FunctionCallMode = None
    modalities: Modalities = None
    audio: Unsupported = None
    prediction: Unsupported = None
    web_search_options: Unsupported = None
    reasoning_effort: Unsupported = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int, info: ValidationInfo) -> int:
        if not info.data.get("logprobs"):
            raise PydanticCustomError("conflict", "needs 'logprobs': true")
        return value


class EmbeddingRequest(_Request):
    """POST /v1/embeddings."""

    model: Text = Field(description="the embedding model's name (GET /v1/models)")
    input: Prompt = Field(description="a string, token ids, or an array of either (one embedding each)")
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: Int | None = Field(None, ge=1, le=INT32_MAX, description="only the model's own")
    user: str | None = Field(None, description="ignored")


# --- replies -------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail
