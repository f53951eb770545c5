"""Constrained decoding masks: every sampled sequence obeys its schema / regex / grammar."""

import json
import re

import jsonschema
import pytest
import torch

from lmforge.engine.constraints import Constraint, ConstraintError, compile_grammar, mask_logits, unpack_bitmask
from lmforge.engine.output import OutputProcessor
from lmforge.engine.sampler import SamplingError, SamplingParams
from lmforge.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()  # the bundled SmolLM2 tokenizer (49,152 tokens)


def sample_constrained(tok, constraints, steps=200, seed=0, vocab=None):
    """Random logits, masked, sampled: what a model that knows nothing produces under the constraint."""
    g = torch.Generator().manual_seed(seed)
    V = vocab or tok.vocab_size
    outs = [[] for _ in constraints]
    live = list(range(len(constraints)))
    for _ in range(steps):
        logits = torch.randn(len(constraints), V, generator=g) * 3
        mask_logits(logits, constraints)
        for i in list(live):
            t = int(torch.multinomial(logits[i].softmax(-1), 1, generator=g))
            if t in tok.eos_ids:
                live.remove(i)
                continue
            constraints[i].advance(t)
            outs[i].append(t)
        if not live:
            break
    return [tok.decode(o) for o in outs], live


SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 7}}, "required": ["n"],
     "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "tags": {"type": "array",
     "items": {"enum": ["a", "b"]}, "maxItems": 3}}, "required": ["color", "tags"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["bool", "bounded-int", "enum-array"])
def test_random_logits_under_a_schema_give_valid_json(tok, schema):
    grammar = compile_grammar(json_schema=schema)
    states = [Constraint(grammar, tok) for _ in range(4)]  # a batch of four rows, masked together
    texts, unfinished = sample_constrained(tok, states)
    assert not unfinished
    for text, state in zip(texts, states):
        jsonschema.validate(json.loads(text), schema)
        assert state.is_done


def test_unconstrained_rows_are_left_alone_and_regex_rows_match(tok):
    grammar = compile_grammar(regex=r"[0-9]{3}-[a-c]{2}")
    logits = torch.randn(3, tok.vocab_size)
    before = logits.clone()
    states = [None, Constraint(grammar, tok), None]
    mask_logits(logits, states)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert torch.isinf(logits[1]).sum() > tok.vocab_size - 100  # only digits' tokens survive
    texts, unfinished = sample_constrained(tok, [Constraint(grammar, tok) for _ in range(3)], seed=1)
    assert not unfinished and all(re.fullmatch(r"[0-9]{3}-[a-c]{2}", t) for t in texts)


def test_lark_grammar_and_a_wider_logits_row(tok):
    grammar = compile_grammar(grammar='start: "yes" | "no"')
    texts, _ = sample_constrained(tok, [Constraint(grammar, tok, vocab_size=tok.vocab_size + 64)], vocab=tok.vocab_size + 64)
    assert texts[0] in ("yes", "no")


def test_forbidden_token_is_refused(tok):
    state = Constraint(compile_grammar(regex="abc"), tok)
    with pytest.raises(RuntimeError, match="violates"):
        state.advance(tok.encode("zzz", add_special_tokens=False)[0])


def test_bitmask_unpacking():
    bits = torch.tensor([[0b101, -1]], dtype=torch.int32)  # tokens 0 and 2; then all of 32..63
    allowed = unpack_bitmask(bits, 40)
    assert allowed[0, :3].tolist() == [True, False, True] and allowed[0, 3:32].sum() == 0 and allowed[0, 32:].all()


def test_grammars_are_compiled_once():
    schema = {"type": "object", "properties": {"x": {"type": "string"}}}
    a = compile_grammar(json_schema=schema)
    assert compile_grammar(json_schema=dict(schema)) is a and compile_grammar(json_schema=json.dumps(schema)) is a


def test_properties_come_in_the_schemas_order(tok):
    schema = {"type": "object", "properties": {"zeta": {"const": 1}, "alpha": {"const": 2}}, "required": ["zeta", "alpha"],
              "additionalProperties": False}  # fmt: skip
    (text,), _ = sample_constrained(tok, [Constraint(compile_grammar(json_schema=schema), tok)])
    assert text == '{"zeta":1,"alpha":2}'


def _nested_schema(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(json_schema={"type": "objectx"}), "invalid JSON schema"),
        (dict(json_schema={"type": "array", "uniqueItems": True}), "uniqueItems"),
        (dict(json_schema="{not json"), "not valid JSON"),
        (dict(regex="[a-"), "unclosed character class"),
        (dict(regex="(?=a)b"), "look-around"),
        (dict(grammar="start: undefined_rule"), "invalid grammar"),
        # specs that used to escape as ValueError / UnicodeEncodeError (a server's 500): found by fuzzing
        (dict(json_schema={"enum": [float("nan")]}), "NaN or Infinity"),
        (dict(json_schema='{"type": "number", "maximum": Infinity}'), "NaN or Infinity"),
        (dict(json_schema=_nested_schema(200)), "invalid JSON schema: recursion limit"),
        (dict(json_schema=_nested_schema(5000)), "nested too deeply"),
        (dict(regex="a\ud800"), "lone UTF-16 surrogate"),
        (dict(grammar='start: "\ud800"'), "lone UTF-16 surrogate"),
        (dict(), "exactly one"),
        (dict(regex="a", grammar='start: "a"'), "exactly one"),
    ],
)
def test_bad_specs_say_what_is_wrong(kwargs, message):
    with pytest.raises(ConstraintError, match=message) as e:
        compile_grammar(**kwargs, param="response_format")
    assert e.value.param == "response_format"


def test_a_regex_that_cannot_match_is_refused(tok):
    with pytest.raises(ConstraintError, match="can't match"):
        Constraint(compile_grammar(regex=r"[^\x00-\x{10FFFF}]"), tok)
    # a request's: a SamplingError, like every other bad request parameter (it used to escape add_request
    # as a ConstraintError, which the server answered with 500)
    params = SamplingParams(constraint=compile_grammar(grammar="start: start"))
    with pytest.raises(SamplingError, match="can't match") as e:
        OutputProcessor(params, frozenset(), 4, tok)
    assert e.value.param == "constraint"
