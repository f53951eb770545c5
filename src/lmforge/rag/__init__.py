"""Retrieval-augmented generation on an embedded store (SQLite + sqlite-vec + FTS5).

    from lmforge.rag import index_directory, Retriever, ask
    index_directory("notes/", "notes.db")                   # incremental; progress bar
    hits = Retriever.open("notes.db").search("query", k=5)   # hybrid BM25 + vectors (RRF)
    print(ask("question?", "notes.db").format())            # answer citing [n] sources

Pieces: ``loaders`` (.txt .md .html .pdf -> blocks), ``chunking`` (token-aware, headings kept; windows of
a line or two inside each chunk: the vectors are of windows, retrieval returns chunks),
``embed`` (MiniLM through lmforge's encoder), ``store`` (apsw + sqlite-vec + FTS5), ``index``
(incremental re-index, deletes), ``retrieve`` (BM25, vectors, RRF, MMR, filters), ``answer``
(cited answers through ``lmforge.generate``), ``eval`` (Shakespeare
retrieval benchmark), ``cli`` (``lmforge rag``). The HTTP route, ``POST /v1/rag/query``, is
``lmforge.serve.rag_route``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "index_directory": "lmforge.rag.index",
    "IndexReport": "lmforge.rag.index",
    "Retriever": "lmforge.rag.retrieve",
    "Hit": "lmforge.rag.retrieve",
    "ask": "lmforge.rag.answer",
    "Answer": "lmforge.rag.answer",
    "Answerer": "lmforge.rag.answer",
    "Embedder": "lmforge.rag.embed",
    "Store": "lmforge.rag.store",
    "load_document": "lmforge.rag.loaders",
    "chunk_document": "lmforge.rag.chunking",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.rag' has no attribute {name!r}")


__all__ = list(_EXPORTS)
