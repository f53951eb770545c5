"""The server's front door (serve/guard.py): API key on every route but /health and the chat page,
JSON-only request bodies, a body-size limit, CORS only for the origins asked for."""

import threading
import time

import httpx
import openai
import pytest
from serve_helpers import running_server

from lmforge.engine import Engine, EngineConfig
from lmforge.serve.server import create_app

MODEL = "tiny"
KEY = "s3cret"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def server(tiny, tokenizer):
    engine = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.02, block_size=8))
    app = create_app(engine, MODEL, api_key=KEY, max_body_bytes=4096, allowed_origins=["http://good.example"])
    with running_server(app) as url:
        yield url


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc", "/v1/models", "/metrics", "/nowhere"])
def test_every_route_but_health_needs_the_key(server, path):
    r = httpx.get(server + path)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server + path, headers=AUTH).status_code in (200, 404)


def test_health_and_the_chat_page_are_open(server):
    assert httpx.get(server + "/health").json() == {"status": "ok", "rag": False}
    assert "lmforge chat" in httpx.get(server + "/").text


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None])
def test_post_bodies_must_be_json(server, content_type):
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    r = httpx.post(server + "/v1/chat/completions", content=b'{"model": "tiny"}', headers=headers)
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]


def test_json_with_a_charset_is_fine_and_the_openai_client_works(server):
    r = httpx.post(server + "/v1/chat/completions", json=CHAT, headers={**AUTH, "Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    assert client.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=2).choices
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=3, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_bodies_over_the_limit_get_413(server):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    r = httpx.post(server + "/v1/chat/completions", json=big, headers=AUTH)
    assert r.status_code == 413 and "4,096 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit still holds while the body streams in
        for _ in range(10):
            yield b" " * 1000

    r = httpx.post(server + "/v1/chat/completions", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(server + "/health").status_code == 200


def test_cors_only_for_allowed_origins(server):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    ok = httpx.options(server + "/v1/chat/completions", headers={"Origin": "http://good.example", **pre})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://good.example"
    evil = httpx.options(server + "/v1/chat/completions", headers={"Origin": "http://evil.example", **pre})
    assert "access-control-allow-origin" not in evil.headers
    r = httpx.get(server + "/v1/models", headers={"Origin": "http://evil.example", **AUTH})
    assert "access-control-allow-origin" not in r.headers


def test_no_cors_by_default(tiny, tokenizer):
    engine = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.02, block_size=8))
    with running_server(create_app(engine, MODEL)) as url:
        r = httpx.options(url + "/v1/chat/completions", headers={"Origin": "http://any.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers
        # with no key set, a web page's simple (text/plain) POST is still refused
        assert httpx.post(url + "/v1/completions", content=b'{"model":"tiny","prompt":"a"}', headers={"Content-Type": "text/plain"}).status_code == 415
