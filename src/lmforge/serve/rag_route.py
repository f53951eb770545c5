"""``POST /v1/rag/query`` as a FastAPI router over one database.

    app.include_router(rag_router("plays.db"))          # on lmforge's server, or any FastAPI app
    install_error_handlers(app)                          # (from lmforge.serve.errors) a standalone app: 400s in OpenAI's body

Request body (JSON; unknown fields are refused):

    {"query": "...", "k": 5, "mode": "hybrid" | "bm25" | "vector", "path": "glob", "types": ["md"],
     "mmr": 0.7, "answer": true, "max_tokens": 256, "temperature": 0, "seed": null}

Reply: ``{"object": "rag.query", "query", "answer", "cited", "sources": [{"n", "path", "position",
"start_line", "end_line", "page", "section", "text", "score", ...}]}``; with ``"answer": false`` only
the sources (no generator is loaded). Bad values get 400 with OpenAI's error body naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from lmforge.rag.answer import Answerer
from lmforge.rag.retrieve import Retriever
from lmforge.serve.protocol import SEED_END, SEED_MIN, Int, NonEmptyText, Num, Text


class RagQuery(BaseModel):
    """The body of ``POST /v1/rag/query``, checked as strictly as the OpenAI routes' (serve/protocol.py)."""

    model_config = ConfigDict(extra="forbid")

    query: NonEmptyText
    k: Int = Field(5, ge=1, le=100)
    mode: Literal["hybrid", "bm25", "vector"] = "hybrid"
    path: Text | None = None
    types: list[Literal["txt", "md", "html", "pdf"]] | None = None
    mmr: Num | None = Field(None, ge=0, le=1)
    answer: StrictBool = True
    max_tokens: Int = Field(256, ge=1, le=4096)
    temperature: Num = Field(0.0, ge=0, le=2)
    seed: Int | None = Field(None, ge=SEED_MIN, lt=SEED_END)


def rag_router(db: str | Path | Retriever, embedder=None, model=None, tokenizer=None, max_context_tokens: int = 2048) -> APIRouter:
    """A router answering ``POST /v1/rag/query`` over ``db`` (a path, opened now: a missing
    database fails here, at start-up, not at the first request; or an open ``Retriever``).
    ``model``/``tokenizer``: the generator (default: bundled SmolLM2, loaded at the first answer)."""
    retriever = db if isinstance(db, Retriever) else Retriever.open(db, embedder)
    answerer = Answerer(retriever, model, tokenizer, max_context_tokens)
    router = APIRouter()

    @router.post("/v1/rag/query")
    async def rag_query(body: RagQuery):
        search = dict(path=body.path, kinds=body.types, mmr_lambda=body.mmr)
        if body.answer:
            ans = await run_in_threadpool(answerer.ask, body.query, body.k, body.mode, max_new_tokens=body.max_tokens,
                                          temperature=body.temperature, seed=body.seed, **search)  # fmt: skip
            out = ans.as_dict()
            return {"object": "rag.query", "query": body.query, "answer": out["answer"], "cited": out["cited"],
                    "sources": out["sources"]}  # fmt: skip
        hits = await run_in_threadpool(retriever.search, body.query, body.k, body.mode, **search)
        return {"object": "rag.query", "query": body.query, "answer": None, "cited": [],
                "sources": [{"n": n, **h.as_dict()} for n, h in enumerate(hits, start=1)]}  # fmt: skip

    router.retriever = retriever  # so the app can close it at shutdown
    return router
