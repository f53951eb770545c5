"""POST /v1/rag/query on a standalone FastAPI app (TestClient)."""

import json
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lmforge.checkpoints import default_model_path
from lmforge.serve.errors import install_error_handlers
from lmforge.serve.rag_route import rag_router
from lmforge.rag.store import StoreError
from lmforge.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).parent.parent / "serve"))
from serve_helpers import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def client(corpus_db, embedder):
    app = FastAPI()
    install_error_handlers(app)
    router = rag_router(corpus_db, embedder, tiny_model(max_seq_len=2048), load_tokenizer(default_model_path()))
    app.include_router(router)
    with TestClient(app) as c:
        yield c
    router.retriever.close()


def test_retrieval_only(client):
    r = client.post("/v1/rag/query", json={"query": "how long to knead dough", "k": 2, "answer": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "rag.query" and body["answer"] is None and len(body["sources"]) == 2
    top = body["sources"][0]
    assert top["n"] == 1 and top["path"] == "baking.html" and "Knead" in top["text"]
    assert {"position", "start_line", "end_line", "section", "score"} <= set(top)


def test_filters_and_modes(client):
    r = client.post("/v1/rag/query", json={"query": "planet dough", "k": 3, "answer": False, "types": ["pdf"], "mode": "bm25"})
    assert r.status_code == 200 and {s["path"] for s in r.json()["sources"]} == {"astronomy.pdf"}
    r = client.post("/v1/rag/query", json={"query": "planet dough", "answer": False, "path": "notes/*", "mmr": 0.5})
    assert r.status_code == 200 and {s["path"] for s in r.json()["sources"]} == {"notes/garden.md"}


def test_answer_with_cited_sources(client):
    r = client.post("/v1/rag/query", json={"query": "When to prune roses?", "k": 2, "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["answer"], str) and len(body["sources"]) == 2 and isinstance(body["cited"], list)


@pytest.mark.parametrize(
    "body, param",
    [({"query": "x", "k": 0}, "k"), ({"query": "x", "mode": "fuzzy"}, "mode"), ({"query": "x", "types": ["docx"]}, "types"),
     ({"query": "x", "colour": "red"}, "colour"), ({"k": 3}, "query"), ({"query": "x", "mmr": 1.5}, "mmr"),
     ({"query": "x", "k": True}, "k"), ({"query": "x", "seed": 2**64}, "seed"), ({"query": "x", "temperature": 1e400}, "temperature"),
     ({"query": "\ud800"}, "query"), ({"query": "x", "path": "a\udfff"}, "path"), ({"query": "x", "answer": 1}, "answer")],
)  # fmt: skip
def test_bad_requests_get_400_naming_the_field(client, body, param):
    """The same strict types and one-sentence errors as the OpenAI routes (serve/protocol.py, serve/errors.py)."""
    raw = json.dumps(body).replace("Infinity", "1e400").encode()  # lone surrogates stay \\u escapes
    r = client.post("/v1/rag/query", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and f"'{param}" in err["message"]


def test_missing_database_fails_at_startup(tmp_path, embedder):
    with pytest.raises(StoreError, match="lmforge rag index"):
        rag_router(tmp_path / "none.db", embedder)
