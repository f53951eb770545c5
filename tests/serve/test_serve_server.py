"""The HTTP server on a tiny random decoder: the official openai client (sync and async, streamed and
not), raw HTTP for the error cases, disconnects, API keys, metrics, embeddings."""

import asyncio
import base64
import json
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from serve_helpers import running_server, tiny_model

import lmforge
from lmforge.engine import Engine, EngineConfig
from lmforge.serve.server import Embedder, create_app

MODEL = "tiny"
CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server(tiny, tokenizer):
    engine = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.02, block_size=8))
    with running_server(create_app(engine, MODEL)) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def wait_idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while engine.has_work() or engine.blocks.num_used:
        assert time.monotonic() < deadline, f"engine still busy: {engine.stats()}"
        time.sleep(0.01)


# --- the openai client ---------------------------------------------------------------------------
def test_models_lists_the_served_model(client):
    (m,) = client.models.list().data
    assert m.id == MODEL and m.object == "model"


def test_greedy_chat_through_the_server_equals_lmforge_generate(client, tiny, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    expected = lmforge.generate(tiny, tokenizer, CHAT, max_new_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected
    assert r.choices[0].message.role == "assistant"
    prompt_len = len(tokenizer.encode(tokenizer.apply_chat_template(CHAT), add_special_tokens=False))
    assert r.usage.prompt_tokens == prompt_len
    assert r.usage.total_tokens == prompt_len + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_streamed_chat_equals_the_unstreamed_one(client):
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_raw_stream_ends_with_done(server):
    url, _ = server
    body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_completions_n_seed_stop_logprobs(client, tokenizer):
    kw = dict(model=MODEL, prompt=["Hello", "Goodbye"], max_tokens=6, temperature=1.0, seed=11, n=2, logprobs=2)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert a.choices[0].text != a.choices[1].text  # the n samples differ
    lp = a.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == a.choices[0].text
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert a.usage.prompt_tokens == len(tokenizer.encode("Hello")) + len(tokenizer.encode("Goodbye"))
    assert a.usage.completion_tokens == 24
    stop = a.choices[0].text[2:4]
    s = client.completions.create(**{**kw, "prompt": "Hello", "n": 1, "stop": [stop]})
    assert s.choices[0].finish_reason == "stop" and s.choices[0].text == a.choices[0].text[: a.choices[0].text.index(stop)]


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5) for t in content)


def test_async_client_concurrent_streams(server):
    url, engine = server

    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        async def one(i):
            msgs = [{"role": "user", "content": f"Count to {i}."}]
            stream = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8 + i, temperature=0,
                                                          stream=True)  # fmt: skip
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
            full = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8 + i, temperature=0)
            return streamed, full.choices[0].message.content

        try:
            return await asyncio.gather(*(one(i) for i in range(6)))
        finally:
            await client.close()

    for streamed, full in asyncio.run(main()):
        assert streamed == full
    wait_idle(engine)


# --- errors over raw HTTP ------------------------------------------------------------------------
def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_requests_get_openai_errors(server):
    url, engine = server
    chat = url + "/v1/chat/completions"
    ok = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
    error_of(httpx.post(chat, content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"}), 400)
    error_of(httpx.post(chat, json=[1, 2]), 400)
    assert error_of(httpx.post(chat, json={**ok, "temperature": -1}), 400)["param"] == "temperature"
    assert error_of(httpx.post(chat, json={**ok, "max_tokens": "ten"}), 400)["param"] == "max_tokens"
    assert error_of(httpx.post(chat, json={**ok, "top_p": 0}), 400)["param"] == "top_p"
    assert error_of(httpx.post(chat, json={**ok, "top_logprobs": 2}), 400)["param"] == "top_logprobs"
    assert error_of(httpx.post(chat, json={**ok, "stop": [""]}), 400)["param"] == "stop"
    assert error_of(httpx.post(chat, json={**ok, "n": 0}), 400)["param"] == "n"
    assert error_of(httpx.post(chat, json={**ok, "temprature": 0.5}), 400)["param"] == "temprature"
    assert error_of(httpx.post(chat, json={**ok, "tools": [{"type": "function"}]}), 400)["param"] == "tools"
    assert error_of(httpx.post(chat, json={**ok, "messages": []}), 400)["param"] == "messages"
    assert error_of(httpx.post(chat, json={**ok, "model": "gpt-4"}), 404)["code"] == "model_not_found"
    error_of(httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": "x"}), 404)
    error_of(httpx.get(url + "/v1/nothing"), 404)
    assert error_of(httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": [10**7]}), 400)["param"] == "prompt"


def test_prompt_over_the_context_names_both_lengths(server, tokenizer):
    url, _ = server
    long = "word " * 600
    n = len(tokenizer.encode(long))
    err = error_of(httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": long}), 400)
    assert f"{n} tokens" in err["message"] and "512 tokens" in err["message"]
    err = error_of(httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 600}), 400)
    assert "600" in err["message"] and "512" in err["message"]


def test_full_queue_is_429_and_a_queued_stream_is_cancelled_on_disconnect(tiny, tokenizer):
    engine = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.02, max_queue=1))
    app = create_app(engine, MODEL, manage_engine=False)  # nothing steps: the first request stays queued
    with running_server(app) as url:

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
                first = asyncio.create_task(c.post("/v1/completions", json={**body, "stream": True}))
                while engine.queue_depth < 1:
                    await asyncio.sleep(0.01)
                second = await c.post("/v1/completions", json=body)
                first.cancel()  # the client goes away while its request waits, no token ever sent
                return second

        err = error_of(asyncio.run(main()), 429)
        assert "queue is full" in err["message"]
        deadline = time.monotonic() + 10
        while not engine._aborts:  # the disconnect reaches the engine without any event being sent
            assert time.monotonic() < deadline, "the queued request was not cancelled"
            time.sleep(0.01)
        engine.step()
        assert engine.queue_depth == 0 and not engine.has_work()


def test_api_key(tiny, tokenizer):
    engine = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.02))
    with running_server(create_app(engine, MODEL, api_key="s3cret")) as url:
        assert httpx.get(url + "/health").status_code == 200  # liveness needs no key
        assert error_of(httpx.get(url + "/v1/models"), 401)["code"] == "invalid_api_key"
        error_of(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        error_of(httpx.get(url + "/metrics"), 401)
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].finish_reason


# --- disconnects, failures, metrics --------------------------------------------------------------
def test_disconnect_mid_stream_frees_blocks_at_once(server):
    url, engine = server
    wait_idle(engine)
    before = engine.num_generated_tokens
    body = {"model": MODEL, "prompt": "Tell me everything.", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        events = r.iter_lines()
        got = [next(events) for _ in range(6)]
        assert engine.blocks.num_used > 0 and len(engine.running) == 1
    assert any(g.startswith("data: ") for g in got)
    wait_idle(engine, timeout=5)
    print("generated after disconnect:", engine.num_generated_tokens - before)
    assert engine.num_generated_tokens - before < 250  # stopped long before max_tokens


def test_disconnect_while_waiting_cancels(server):
    url, engine = server
    wait_idle(engine)
    before = engine.num_generated_tokens

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            task = asyncio.create_task(c.post("/v1/completions", json={
                "model": MODEL, "prompt": "Go on", "max_tokens": 500, "ignore_eos": True}))  # fmt: skip
            while not engine.running:
                await asyncio.sleep(0.005)
            task.cancel()

    asyncio.run(main())
    wait_idle(engine, timeout=5)
    print("generated after disconnect:", engine.num_generated_tokens - before)
    assert engine.num_generated_tokens - before < 250


def test_a_failing_request_gets_500_and_the_server_keeps_serving(server, client, monkeypatch):
    url, engine = server
    real, calls = engine.runner.execute, {"n": 0}

    def fails_once(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated failure")
        return real(*args)

    monkeypatch.setattr(engine.runner, "execute", fails_once)
    err = error_of(httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3}, timeout=30), 500)
    assert "simulated failure" in err["message"] and err["type"] == "server_error"
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=3).choices[0].text is not None
    assert httpx.get(url + "/health").json() == {"status": "ok", "rag": False}


def test_metrics_in_prometheus_text(server, client):
    url, engine = server
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=2)
    text = httpx.get(url + "/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    for name in ("lmforge_requests_total", "lmforge_generation_tokens_total", "lmforge_generation_tokens_per_second",
                 "lmforge_queue_depth", "lmforge_kv_blocks_in_use", "lmforge_kv_blocks_total"):  # fmt: skip
        assert name in samples, name
    assert samples["lmforge_kv_blocks_total"] == engine.blocks.num_blocks
    assert samples["lmforge_generation_tokens_total"] >= 2
    assert samples['lmforge_http_requests_total{path="/v1/completions",status="200"}'] >= 1
    assert "# TYPE lmforge_queue_depth gauge" in text


# --- embeddings ----------------------------------------------------------------------------------
def test_embeddings_next_to_a_generator(tiny, tokenizer):
    from lmforge.config import ModelConfig
    from lmforge.models import build_model

    torch.manual_seed(0)
    enc = build_model(ModelConfig.from_name("minilm-l6", n_layer=2, vocab_size=tokenizer.vocab_size, max_seq_len=64)).eval()
    embedder = Embedder(enc, tokenizer, "tiny-embed")
    engine = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.02))
    with running_server(create_app(engine, MODEL, embedder=embedder)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL, "tiny-embed"]
        texts = ["a red apple", "the sky is blue today"]
        r = client.embeddings.create(model="tiny-embed", input=texts)  # the client asks for base64
        got = np.array([d.embedding for d in r.data])
        ids = [tokenizer.encode(t) for t in texts]
        expected = torch.stack([enc.embed_tokens(torch.tensor([i]))[0] for i in ids]).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert r.usage.prompt_tokens == sum(len(i) for i in ids)
        raw = httpx.post(url + "/v1/embeddings", json={"model": "tiny-embed", "input": ids[0], "encoding_format": "base64"}).json()
        vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
        np.testing.assert_allclose(vec, expected[0], atol=1e-5)
        err = error_of(httpx.post(url + "/v1/embeddings", json={"model": "tiny-embed", "input": "word " * 100}), 400)
        assert "64 tokens" in err["message"]
        assert client.completions.create(model=MODEL, prompt="still generating", max_tokens=2).choices[0].text is not None
