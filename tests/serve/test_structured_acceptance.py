"""Structured output at scale: 20 JSON Schemas x 10 generations, through the library and through the server
(streamed and not), on a random decoder of SmolLM2's vocabulary — 100% must parse and validate."""

import json

import jsonschema
import openai
import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.engine import Engine, EngineConfig
from lmforge.inference import generate
from lmforge.models import build_model
from lmforge.serve.server import create_app
from lmforge.tokenizer import load_tokenizer

S = {"type": "string", "maxLength": 6}
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 5}}, "required": ["n"]},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["x"]},
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 130}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
     "y": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"kind": {"const": "event"}, "day": {"enum": ["mon", "tue"]}}, "required": ["kind", "day"]},
    {"type": "object", "properties": {"a": S, "b": S}, "required": ["a"]},  # b optional
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}}, "required": ["id"]},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}]}}, "required": ["v"]},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"q": {"type": "integer",
     "minimum": 1, "maximum": 9}}, "required": ["q"]}, "maxItems": 2}}, "required": ["items"]},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": -10, "maximum": 10}, "pass": {"type": "boolean"}},
     "required": ["score", "pass"]},
    {"type": "object", "properties": {"nothing": {"type": "null"}}, "required": ["nothing"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "items": {"type": "array", "items": {"enum": [0, 1]}, "maxItems": 2},
     "maxItems": 2}}, "required": ["matrix"]},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}, "note": S}, "required": ["level", "note"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"name": S, "admin": {"type": "boolean"}},
     "required": ["name", "admin"], "additionalProperties": False}}, "required": ["user"], "additionalProperties": False},
    {"type": "object", "properties": {"when": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}}, "required": ["when"]},
    {"type": "object", "properties": {"pair": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9},
     S], "items": False, "minItems": 2}}, "required": ["pair"]},
]  # fmt: skip
def _closed(schema):
    """Objects closed at every depth: extra keys are unbounded strings a random model could ramble in."""
    if isinstance(schema, dict):
        if schema.get("type") == "object":
            schema.setdefault("additionalProperties", False)
        for v in schema.values():
            _closed(v)
    elif isinstance(schema, list):
        for v in schema:
            _closed(v)


_closed(SCHEMAS)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("smollm2-135m", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, d_ff=128, max_seq_len=512)
    return build_model(cfg).eval()


@pytest.mark.slow
def test_200_library_generations_all_validate(model, tok):
    count = 0
    for i, schema in enumerate(SCHEMAS):
        texts = generate(model, tok, ["Give JSON:"] * 10, json_schema=schema, max_new_tokens=200, temperature=1.0, seed=i)
        for text in texts:
            jsonschema.validate(json.loads(text), schema)
            count += 1
    assert count == 200


@pytest.mark.slow
def test_200_server_generations_all_validate_streamed_and_not(model, tok):
    from serve_helpers import running_server

    engine = Engine(model, tok, EngineConfig(kv_cache_gb=0.1, block_size=16))
    with running_server(create_app(engine, "tiny")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        count = 0
        for i, schema in enumerate(SCHEMAS):
            fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
            msgs = [{"role": "user", "content": "Give JSON."}]
            if i % 2:  # streamed: 10 requests' chunks, joined per request
                for k in range(10):
                    chunks = client.chat.completions.create(model="tiny", messages=msgs, response_format=fmt, max_tokens=200,
                                                            seed=100 * i + k, stream=True)  # fmt: skip
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                    jsonschema.validate(json.loads(text), schema)
                    count += 1
            else:
                r = client.chat.completions.create(model="tiny", messages=msgs, response_format=fmt, max_tokens=200, seed=i, n=10)
                for c in r.choices:
                    jsonschema.validate(json.loads(c.message.content), schema)
                    count += 1
        assert count == 200
