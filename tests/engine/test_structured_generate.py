"""Structured output through the one sampler: lmforge.generate with json_schema / regex / grammar, and the
serving engine, on a tiny random decoder of SmolLM2's vocabulary (it knows nothing, so only the mask
makes the text valid)."""

import json
import re

import jsonschema
import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.engine import Engine, EngineConfig
from lmforge.engine.constraints import compile_grammar
from lmforge.engine.sampler import SamplingError, SamplingParams
from lmforge.inference import complete, generate
from lmforge.models import build_model
from lmforge.tokenizer import load_tokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0,
          "maximum": 120}, "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2}},
          "required": ["name", "age", "pets"], "additionalProperties": False}  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("smollm2-135m", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, d_ff=128, max_seq_len=512)
    return build_model(cfg).eval()


def test_generate_follows_a_json_schema_for_every_row(model, tok):
    prompts = ["A person:", "Another person:", "Someone:"]
    texts = generate(model, tok, prompts, json_schema=SCHEMA, max_new_tokens=120, temperature=1.0, seed=3)
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    greedy = complete(model, tok, "A person:", json_schema=SCHEMA, max_new_tokens=120, temperature=0)
    jsonschema.validate(json.loads(greedy.text), SCHEMA)
    assert greedy.finish_reason == "stop"


def test_regex_and_grammar(model, tok):
    text = generate(model, tok, "Phone:", regex=r"\d{3}-\d{4}", max_new_tokens=20, temperature=1.0, seed=0)
    assert re.fullmatch(r"\d{3}-\d{4}", text)
    text = generate(model, tok, "Answer:", grammar='start: "yes" | "no" | "maybe"', max_new_tokens=10, temperature=1.0, seed=1)
    assert text in ("yes", "no", "maybe")


def test_unconstrained_rows_of_the_same_batch_are_untouched(model, tok):
    free = generate(model, tok, "Hello", max_new_tokens=8, temperature=0)
    engine = Engine(model, tok, EngineConfig(kv_cache_gb=0.02, block_size=8))
    ids = tok.encode("Hello")
    constrained = SamplingParams(max_new_tokens=8, temperature=0, constraint=compile_grammar(regex="[a-z]+"))
    [[a], [b]] = engine.generate([ids, ids], [SamplingParams(max_new_tokens=8, temperature=0), constrained])
    assert a.text == free
    assert re.fullmatch("[a-z]+", b.text)


def test_what_cannot_be_constrained_says_so(model, tok):
    with pytest.raises(SamplingError, match="beam search"):
        generate(model, tok, "Hi", regex="a+", num_beams=2, temperature=0, max_new_tokens=4)
    with pytest.raises(SamplingError, match="unknown generation parameter"):
        generate(model, tok, "Hi", json_shema={})
