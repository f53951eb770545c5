"""``POST /v1/rag/query`` as a FastAPI router over one database.

    app.include_router(rag_router("plays.db"))          # on lmforge's server, or any FastAPI app

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
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from lmforge.rag.answer import Answerer
from lmforge.rag.retrieve import Retriever


class RagQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1)
    k: int = Field(5, ge=1, le=100)
    mode: Literal["hybrid", "bm25", "vector"] = "hybrid"
    path: str | None = None
    types: list[Literal["txt", "md", "html", "pdf"]] | None = None
    mmr: float | None = Field(None, ge=0, le=1)
    answer: bool = True
    max_tokens: int = Field(256, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0, le=2)
    seed: int | None = None


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}},
                        status_code=status)  # fmt: skip


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


def install_error_handler(app) -> None:
    """Answer request-validation errors with 400 and OpenAI's error body naming the field (lmforge's
    server already does this for every route; a standalone app calls this)."""
    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return _error(400, f"'{param}': {err.get('msg', 'invalid value')}." if param else err.get("msg", "invalid request body."), param)
