"""The server's protocol (serve/protocol.py): /openapi.json describes the request bodies with their
bounds; hostile bodies get 400 naming the field; long prompts are tokenized off the event loop
(GET /health stays fast meanwhile) and capped by max_prompt_tokens."""

import json
import math
import random
import threading
import time

import httpx
import pytest
from serve_helpers import running_server

from lmforge.cli import build_parser
from lmforge.engine import Engine, EngineConfig
from lmforge.engine.sampler import MAX_LOGPROBS
from lmforge.errors import UserError
from lmforge.serve.server import create_app

MODEL = "tiny"
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(tiny, tokenizer):
    engine = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.02, block_size=8))
    with running_server(create_app(engine, MODEL)) as url:
        yield url


def post(url: str, path: str, body) -> httpx.Response:
    """POST a body given as raw JSON text (NaN, lone surrogates: what json.dumps would not write) or an object."""
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    return httpx.post(url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=60)


def error_of(r: httpx.Response) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    return err


# --- the schema ----------------------------------------------------------------------------------
def test_openapi_describes_the_three_request_bodies_with_their_bounds(server):
    spec = httpx.get(server + "/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, name in [("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest"),
                       ("/v1/embeddings", "EmbeddingRequest")]:  # fmt: skip
        op = spec["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"] == f"#/components/schemas/{name}"
        assert schemas[name]["additionalProperties"] is False
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ErrorResponse"
        assert "422" not in op["responses"]  # validation errors are 400 here
    assert "text/event-stream" in spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]

    def prop(model: str, field: str) -> dict:  # the non-null form of an optional field
        p = schemas[model]["properties"][field]
        return next((a for a in p.get("anyOf", [p]) if a.get("type") != "null"), p)

    c = schemas["CompletionRequest"]
    assert set(c["required"]) == {"model", "prompt"}
    assert (prop("CompletionRequest", "temperature")["minimum"], prop("CompletionRequest", "temperature")["maximum"]) == (0, 2)
    assert (prop("CompletionRequest", "n")["minimum"], prop("CompletionRequest", "n")["maximum"]) == (1, 128)
    assert (prop("CompletionRequest", "presence_penalty")["minimum"], prop("CompletionRequest", "presence_penalty")["maximum"]) == (-2, 2)
    assert prop("CompletionRequest", "top_p")["exclusiveMinimum"] == 0 and prop("CompletionRequest", "top_p")["maximum"] == 1
    seed = prop("CompletionRequest", "seed")
    assert seed["type"] == "integer" and seed["minimum"] == -(2**63) and seed["exclusiveMaximum"] == 2**63
    assert prop("CompletionRequest", "logprobs")["maximum"] == MAX_LOGPROBS
    assert [p["type"] for p in c["properties"]["prompt"]["oneOf"]] == ["string", "array", "array"]
    assert c["properties"]["suffix"]["type"] == "null"  # unsupported: null only
    chat = schemas["ChatCompletionRequest"]
    assert set(chat["required"]) == {"model", "messages"} and chat["properties"]["messages"]["minItems"] == 1
    assert prop("ChatCompletionRequest", "top_logprobs")["maximum"] == MAX_LOGPROBS
    assert prop("ChatCompletionRequest", "max_tokens")["minimum"] == 1
    assert schemas["FunctionDef"]["properties"]["name"]["pattern"] == "^[A-Za-z0-9_-]{1,64}$"
    assert prop("EmbeddingRequest", "encoding_format")["enum"] == ["float", "base64"]


# --- hostile bodies ------------------------------------------------------------------------------
OK_COMPLETION = '"model": "tiny", "prompt": "Hello", "max_tokens": 2'
OK_CHAT = '"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2'
TOOL = '{"type": "function", "function": {"name": "f", "description": %s, "parameters": %s}}'
HOSTILE = [  # (endpoint, raw JSON body, param, the message's start)
    # lone surrogates in every string a tokenizer, template or grammar compiler would see
    ("/v1/completions", '{"model": "tiny", "prompt": "ab\\ud800"}', "prompt", "'prompt' must be valid Unicode"),
    ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "\\udc00"]}', "prompt", "'prompt[1]' must be valid Unicode"),
    ("/v1/completions", '{%s, "stop": "\\ud83d"}' % OK_COMPLETION, "stop", "'stop' must be valid Unicode"),
    ("/v1/completions", '{%s, "stop": ["a", "x\\udfff"]}' % OK_COMPLETION, "stop", "'stop[1]' must be valid Unicode"),
    ("/v1/completions", '{%s, "guided_regex": "[a\\ud800]"}' % OK_COMPLETION, "guided_regex", "'guided_regex' must be valid Unicode"),
    ("/v1/completions", '{%s, "guided_grammar": "start: \\"\\ud800\\""}' % OK_COMPLETION, "guided_grammar", "'guided_grammar' must be"),
    ("/v1/completions", '{%s, "guided_json": "{\\"type\\": \\"string\\"}\\ud800"}' % OK_COMPLETION, "guided_json", "'guided_json' must be valid"),
    ("/v1/completions", '{%s, "guided_json": {"type": "object", "properties": {"\\ud800": {}}}}' % OK_COMPLETION, "guided_json",
     "'guided_json' must be valid Unicode"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages",
     "'messages[0].content' must be valid Unicode"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "messages", "'messages[0].content[0].text' must be valid Unicode"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "us\\ud800er", "content": "hi"}]}', "messages",
     "'messages[0].role' must be valid Unicode"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "hi", "name": "\\ud800"}]}', "messages",
     "'messages[0].name' must be valid Unicode"),
    ("/v1/chat/completions", '{%s, "tools": [%s]}' % (OK_CHAT, TOOL % ('"\\ud800"', '{}')), "tools",
     "'tools[0].function.description' must be valid Unicode"),
    ("/v1/chat/completions", '{%s, "tools": [%s]}' % (OK_CHAT, TOOL % ('"d"', '{"type": "object", "description": "\\ud800"}')),
     "tools", "'tools[0].function.parameters' must be valid Unicode"),
    ("/v1/chat/completions", '{%s, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["\\ud800"]}}}}'
     % OK_CHAT, "response_format", "'response_format.json_schema.schema' must be valid Unicode"),
    ("/v1/embeddings", '{"model": "tiny", "input": ["\\ud800"]}', "input", "'input[0]' must be valid Unicode"),
    # integers: past 64 bits, huge, or booleans
    ("/v1/completions", '{%s, "seed": %d}' % (OK_COMPLETION, 2**63), "seed", "'seed' must be less than 9223372036854775808, got"),
    ("/v1/completions", '{%s, "seed": %d}' % (OK_COMPLETION, -(2**63) - 1), "seed", "'seed' must be at least -9223372036854775808"),
    ("/v1/completions", '{%s, "n": %d}' % (OK_COMPLETION, 10**30), "n", "'n' must be at most 128, got 1000000000000000000000000000000"),
    ("/v1/completions", '{"model": "tiny", "prompt": "Hi", "max_tokens": %d}' % 10**30, "max_tokens", "'max_tokens' must be at most"),
    ("/v1/chat/completions", '{%s, "max_completion_tokens": %d}' % (OK_CHAT, 10**30), "max_completion_tokens", "'max_completion_tokens' must be at most"),
    ("/v1/completions", '{%s, "top_k": %d}' % (OK_COMPLETION, 10**30), "top_k", "'top_k' must be at most"),
    ("/v1/completions", '{"model": "tiny", "prompt": [1, %d]}' % 10**30, "prompt", "'prompt[1]' must be at most"),
    ("/v1/completions", '{"model": "tiny", "prompt": [[1], [2, -3]]}', "prompt", "'prompt[1][1]' must be at least 0"),
    ("/v1/completions", '{%s, "stop_token_ids": [%d]}' % (OK_COMPLETION, 10**30), "stop_token_ids", "'stop_token_ids[0]' must be at most"),
    ("/v1/completions", '{%s, "stop_token_ids": [49152]}' % OK_COMPLETION, "stop_token_ids", "'stop_token_ids[0]' is 49152, outside the vocabulary"),
    ("/v1/completions", '{"model": "tiny", "prompt": [49152]}', "prompt", "token id 49152 in the prompt is outside the vocabulary"),
    ("/v1/completions", '{%s, "seed": 1%s}' % (OK_COMPLETION, "0" * 4000), "seed", "'seed' must be less than 9223372036854775808, got an integer of 4001 digits"),
    ("/v1/completions", '{%s, "seed": 1%s}' % (OK_COMPLETION, "0" * 5000), None, "the request body is not valid JSON (Exceeds the limit"),
    ("/v1/completions", '{%s, "n": true}' % OK_COMPLETION, "n", "'n' must be an integer, got true"),
    ("/v1/completions", '{"model": "tiny", "prompt": "Hi", "max_tokens": false}', "max_tokens", "'max_tokens' must be an integer"),
    ("/v1/completions", '{%s, "seed": true}' % OK_COMPLETION, "seed", "'seed' must be an integer"),
    ("/v1/completions", '{%s, "logprobs": true}' % OK_COMPLETION, "logprobs", "'logprobs' must be an integer"),
    ("/v1/completions", '{"model": "tiny", "prompt": [true, 2]}', "prompt", "'prompt[0]' must be an integer"),
    ("/v1/completions", '{%s, "n": 2.0}' % OK_COMPLETION, "n", "'n' must be an integer, got 2.0"),
    ("/v1/completions", '{%s, "stream": 1}' % OK_COMPLETION, "stream", "'stream' must be true or false, got 1"),
    ("/v1/chat/completions", '{%s, "logprobs": 1}' % OK_CHAT, "logprobs", "'logprobs' must be true or false"),
    ("/v1/embeddings", '{"model": "tiny", "input": "x", "dimensions": true}', "dimensions", "'dimensions' must be an integer"),
    # numbers that are not finite
    ("/v1/completions", '{%s, "temperature": NaN}' % OK_COMPLETION, "temperature", "'temperature' must be a finite number, got NaN"),
    ("/v1/completions", '{%s, "top_p": Infinity}' % OK_COMPLETION, "top_p", "'top_p' must be a finite number, got Infinity"),
    ("/v1/chat/completions", '{%s, "presence_penalty": -Infinity}' % OK_CHAT, "presence_penalty", "'presence_penalty' must be a finite number"),
    ("/v1/completions", '{%s, "guided_json": {"type": "number", "maximum": NaN}}' % OK_COMPLETION, "guided_json",
     "'guided_json' must hold finite numbers only"),
    ("/v1/completions", '{%s, "temperature": 3}' % OK_COMPLETION, "temperature", "'temperature' must be at most 2, got 3"),
    # nesting: past what JSON parsing takes, and past what a grammar compiler takes
    ("/v1/completions", "[" * 100_000 + "]" * 100_000, None, "the request body nests arrays or objects too deeply"),
    ("/v1/completions", '{"model": "tiny", "prompt": %s}' % ("[" * 100_000 + "]" * 100_000), None, "the request body nests"),
    ("/v1/completions", '{%s, "guided_json": %s}' % (OK_COMPLETION, '{"items": ' * 150 + "{}" + "}" * 150), "guided_json",
     "invalid JSON schema: recursion limit exceeded"),
    ("/v1/completions", '{%s, "guided_json": "%s"}' % (OK_COMPLETION, "[" * 100_000 + "]" * 100_000), "guided_json",
     "the JSON schema nests arrays and objects too deeply"),
    ("/v1/chat/completions", '{%s, "tools": [%s]}' % (OK_CHAT, TOOL % ('"d"', '{"items": ' * 150 + "{}" + "}" * 150)), "tools",
     "'tools[0].function.parameters' (f): invalid JSON schema: recursion limit exceeded"),
    # not an object, not JSON, unknown or unsupported fields
    ("/v1/completions", "[1, 2]", None, "the request body must be a JSON object"),
    ("/v1/chat/completions", '"hello"', None, "the request body must be a JSON object"),
    ("/v1/embeddings", "null", None, "the request body must be a JSON object"),
    ("/v1/completions", '{"model": "tiny", "prompt": ', None, "the request body is not valid JSON"),
    ("/v1/completions", '{%s, "temprature": 0.5}' % OK_COMPLETION, "temprature", "'temprature' is not a known parameter"),
    ("/v1/completions", '{%s, "\\ud800": 1}' % OK_COMPLETION, None, "the request body has a key that is not valid Unicode"),
    ("/v1/chat/completions", '{%s, "stream": true, "stream_options": {"include_usage": true, "every": 1}}' % OK_CHAT,
     "stream_options", "'stream_options.every' is not a known parameter"),
    ("/v1/completions", '{%s, "logit_bias": {"50256": -100}}' % OK_COMPLETION, "logit_bias", "'logit_bias' is not supported by this server"),
    ("/v1/completions", '{%s, "suffix": "end"}' % OK_COMPLETION, "suffix", "'suffix' is not supported by this server"),
    ("/v1/chat/completions", '{%s, "modalities": ["text", "audio"]}' % OK_CHAT, "modalities", "'modalities' is not supported"),
    ("/v1/chat/completions", '{%s, "reasoning_effort": "high"}' % OK_CHAT, "reasoning_effort", "'reasoning_effort' is not supported"),
    ("/v1/completions", '{%s, "n": 2, "best_of": 3}' % OK_COMPLETION, "best_of", "'best_of' is not supported by this server unless"),
    ("/v1/completions", '{"model": "tiny", "prompt": 5}', "prompt", "'prompt' must be a string, an array of token ids, or an array of those, got 5"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": []}', "messages", "'messages' must not be empty"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"content": "hi"}]}', "messages", "'messages[0].role' is required"),
    ("/v1/chat/completions", '{%s, "stream_options": {"include_usage": true}}' % OK_CHAT, "stream_options",
     "'stream_options' is only allowed with stream: true"),
    ("/v1/chat/completions", '{%s, "guided_regex": "a", "guided_grammar": "start: \\"a\\""}' % OK_CHAT, "guided_grammar",
     "'guided_grammar' cannot be combined with 'guided_regex'"),
]  # fmt: skip


@pytest.mark.parametrize("endpoint, raw, param, start", HOSTILE, ids=[f"{i}-{h[2]}" for i, h in enumerate(HOSTILE)])
def test_hostile_bodies_get_400_naming_the_field(server, endpoint, raw, param, start):
    err = error_of(post(server, endpoint, raw))
    assert err["param"] == param and err["message"].startswith(start), err
    assert "\n" not in err["message"]  # one sentence


def test_the_server_still_serves_after_the_hostile_bodies(server):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63)])
def test_seeds_at_the_64_bit_bounds_work_with_every_sample(server, seed):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 1.0, "n": 128, "seed": seed}
    first, again = post(server, "/v1/completions", body), post(server, "/v1/completions", body)
    assert first.status_code == 200, first.text
    texts = [c["text"] for c in first.json()["choices"]]
    assert len(texts) == 128 and texts == [c["text"] for c in again.json()["choices"]]


def test_null_means_not_given(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": None, "stop": None, "n": None, "seed": None,
            "logit_bias": None, "suffix": None, "stream_options": None, "user": None}  # fmt: skip
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200 and len(r.json()["choices"]) == 1
    assert error_of(post(server, "/v1/completions", {"model": None, "prompt": "Hello"}))["message"] == "'model' is required."


# --- prompt length and the event loop ------------------------------------------------------------
def test_max_prompt_tokens_caps_each_prompt(tiny, tokenizer):
    engine = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.02, block_size=8))
    with running_server(create_app(engine, MODEL, max_prompt_tokens=8)) as url:
        words = "one two three four five six seven eight nine ten"
        n = len(tokenizer.encode(words))
        err = error_of(post(url, "/v1/completions", {"model": MODEL, "prompt": words}))
        assert err["param"] == "prompt" and f"has {n} tokens" in err["message"] and "at most 8 tokens" in err["message"]
        err = error_of(post(url, "/v1/completions", {"model": MODEL, "prompt": ["one", list(range(1, 10))]}))
        assert err["message"].startswith("prompt[1] has 9 tokens") and "--max-prompt-tokens" in err["message"]
        err = error_of(post(url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": words}]}))
        assert err["param"] == "messages" and "at most 8 tokens" in err["message"]
        ok = post(url, "/v1/completions", {"model": MODEL, "prompt": list(range(1, 9)), "max_tokens": 2})
        assert ok.status_code == 200, ok.text
    with pytest.raises(UserError, match="--max-prompt-tokens"):
        create_app(engine, MODEL, max_prompt_tokens=0)
    assert build_parser().parse_args(["serve", "--max-prompt-tokens", "4096"]).max_prompt_tokens == 4096


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_health_stays_fast_while_a_body_at_the_size_limit_is_tokenized(tiny, tokenizer, monkeypatch, endpoint):
    """A latency bound on the event loop: tokenizing a 2 MiB prompt (seconds of work) happens in a
    thread that lets go of the GIL, so /health is answered at once all the while."""
    limit = 2 << 20
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dogs", "while", "ravens", "watch", "closely"]
    text = " ".join(rng.choice(words) for _ in range(limit // 4))
    key = "prompt" if endpoint == "/v1/completions" else "messages"

    def body_with(text: str) -> str:
        return json.dumps({"model": MODEL, key: text if key == "prompt" else [{"role": "user", "content": text}], "max_tokens": 1})

    body = body_with(text[: limit - len(body_with(""))])
    assert len(body.encode()) == limit

    encoding: dict[str, float] = {}
    real_encode = tokenizer.encode

    def timed_encode(text, *args, **kwargs):  # when the long prompt's tokenization starts and ends
        long = len(text) > limit // 2
        if long:
            encoding["start"] = time.perf_counter()
        try:
            return real_encode(text, *args, **kwargs)
        finally:
            if long:
                encoding["end"] = time.perf_counter()

    monkeypatch.setattr(tokenizer, "encode", timed_encode)
    engine = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.02, block_size=8))
    samples = []  # (when the call was due, when it was answered): a stalled process, client or server, counts
    with running_server(create_app(engine, MODEL, max_body_bytes=limit)) as url, httpx.Client(base_url=url, timeout=30) as c:
        c.get("/health")  # connected
        reply: list[httpx.Response] = []
        poster = threading.Thread(target=lambda: reply.append(post(url, endpoint, body)))
        start = time.perf_counter()
        poster.start()
        while len(samples) < 50 or "end" not in encoding:  # one call every 20 ms until the tokenizing is over
            due = start + len(samples) * 0.02
            time.sleep(max(0.0, due - time.perf_counter()))
            assert c.get("/health").status_code == 200
            samples.append((due, time.perf_counter()))
            assert due - start < 120 and (poster.is_alive() or "start" in encoding), "the long prompt was never tokenized"
        poster.join(timeout=120)
    err = error_of(reply[0])  # 2 MiB of words is far more tokens than the tiny model's 512-token context
    assert err["param"] == key and "at most 512 tokens per prompt" in err["message"]
    during = [b - a for a, b in samples if encoding["start"] <= a <= encoding["end"]]
    latencies = sorted(b - a for a, b in samples)
    p99 = latencies[math.ceil(0.99 * len(latencies)) - 1]
    print(f"\n{endpoint}: tokenizing took {encoding['end'] - encoding['start']:.2f} s; /health over {len(samples)} calls "
          f"({len(during)} while tokenizing): p50 {latencies[len(latencies) // 2] * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
          f"max {latencies[-1] * 1e3:.1f} ms")
    assert len(during) >= 10, "too few /health calls overlapped the tokenization to measure anything"
    assert p99 < 0.1
