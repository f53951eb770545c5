"""Retrieval: BM25 (FTS5), vectors (sqlite-vec), their reciprocal-rank fusion, and MMR.

    r = Retriever.open("notes.db")                        # the embedder the database was built with
    hits = r.search("who guards the platform?", k=5)      # hybrid: RRF of BM25 and vector ranks
    hits = r.search(q, k=5, mode="bm25", path="tragedies/*", kinds=["md"], mmr=0.7)

Hybrid scoring is reciprocal-rank fusion (Cormack et al. 2009): each of the two lists contributes
``weight / (rrf_k + rank)`` (rank from 1) for a chunk it holds among its first ``candidates``; the
sum orders the fused list. MMR (Carbonell & Goldstein 1998) then picks, one at a time, the
candidate maximising ``lam * relevance - (1 - lam) * max cosine to the chunks already picked``, with
relevance the candidate's score divided by the best one.

Filters: ``path`` is an SQLite GLOB over the path relative to the indexed folder (``*`` also matches
``/``), ``kinds`` a list of file types (``txt``, ``md``, ``html``, ``pdf``); both apply inside the
BM25 and the nearest-neighbour queries, so k results come back whenever k chunks pass.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.rag.embed import Embedder
from lmforge.rag.store import Store, StoredChunk, StoreError

MODES = ("hybrid", "bm25", "vector")
KINDS = ("txt", "md", "html", "pdf")


@dataclass
class Hit:
    chunk: StoredChunk
    score: float  # hybrid: the RRF sum; bm25: BM25; vector: cosine similarity
    bm25_rank: int | None = None  # 1-based rank in the BM25 list, if it was there
    vector_rank: int | None = None

    def as_dict(self) -> dict:
        c = self.chunk
        return {"path": c.path, "kind": c.kind, "position": c.position, "start_line": c.start_line, "end_line": c.end_line,
                "page": c.page, "end_page": c.end_page, "section": c.section, "text": c.text, "score": self.score,
                "bm25_rank": self.bm25_rank, "vector_rank": self.vector_rank}  # fmt: skip


def rrf(rankings: Sequence[Sequence[int]], k: float = 60.0, weights: Sequence[float] | None = None) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion of ranked id lists: [(id, sum of weight / (k + rank))], best first."""
    weights = weights or [1.0] * len(rankings)
    scores: dict[int, float] = {}
    for ranking, w in zip(rankings, weights):
        for rank, i in enumerate(ranking, start=1):
            scores[i] = scores.get(i, 0.0) + w / (k + rank)
    return sorted(scores.items(), key=lambda x: (-x[1], x[0]))


def mmr(relevance: np.ndarray, vectors: np.ndarray, k: int, lam: float) -> list[int]:
    """Indices of ``k`` items chosen by maximal marginal relevance (rows of ``vectors`` L2-normalised)."""
    n = len(relevance)
    if n == 0:
        return []
    rel = relevance / max(float(relevance.max()), 1e-12)
    sim = vectors @ vectors.T  # (N, N) cosine
    chosen = [int(np.argmax(rel))]
    closest = sim[chosen[0]].copy()  # max similarity of each item to the chosen set
    while len(chosen) < min(k, n):
        score = lam * rel - (1 - lam) * closest
        score[chosen] = -np.inf
        j = int(np.argmax(score))
        chosen.append(j)
        closest = np.maximum(closest, sim[j])
    return chosen


class Retriever:
    """Search one database. ``rrf_k``, ``weights`` (BM25, vector) and ``candidates`` tune the fusion."""

    def __init__(self, store: Store, embedder: Embedder, rrf_k: float = 60.0, weights: tuple[float, float] = (1.0, 1.0),
                 candidates: int = 50):  # fmt: skip
        meta = store.meta()
        if not store.ready:
            raise StoreError(f"{store.path} holds no index yet: build it with `lmforge rag index DIR --db {store.path}`.")
        store.check_schema()
        if meta.get("embedding_model") != embedder.name:
            raise StoreError(f"{store.path} was built with the embedding model {meta.get('embedding_model')}, not {embedder.name}; "
                             "query it with that model.")  # fmt: skip
        self.store, self.embedder = store, embedder
        self.rrf_k, self.weights, self.candidates = rrf_k, weights, candidates
        self._lock = threading.Lock()  # one query at a time on the connection

    @classmethod
    def open(cls, db: str | Path, embedder: Embedder | None = None, **kwargs) -> Retriever:
        """Open an existing database (a missing one is a ``StoreError`` saying how to build it) with
        the embedding model it was built with, unless ``embedder`` is given."""
        store = Store(db, create=False)
        if embedder is None:
            path = store.meta().get("embedding_path") or None
            embedder = Embedder.load(path)
        return cls(store, embedder, **kwargs)

    def close(self) -> None:
        self.store.close()

    def search(self, query: str, k: int = 5, mode: str = "hybrid", *, path: str | None = None,
               kinds: Sequence[str] | None = None, mmr_lambda: float | None = None) -> list[Hit]:  # fmt: skip
        """The ``k`` best chunks for ``query`` (see the module docstring)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}.")
        bad = [x for x in kinds or () if x not in KINDS]
        if bad:
            raise ValueError(f"unknown file type(s) {', '.join(bad)}: choose from {', '.join(KINDS)}.")
        if mmr_lambda is not None and not 0 <= mmr_lambda <= 1:
            raise ValueError(f"mmr_lambda must lie in [0, 1], got {mmr_lambda}.")
        n = max(self.candidates, k)
        with self._lock:
            lexical = self.store.bm25(query, n, path, kinds) if mode in ("hybrid", "bm25") else []
            vector = []
            if mode in ("hybrid", "vector"):
                q = self.embedder.embed_texts([query])[0]
                vector = self.store.knn(q, n, path, kinds)
            bm25_rank = {i: r for r, (i, _) in enumerate(lexical, start=1)}
            vec_rank = {i: r for r, (i, _) in enumerate(vector, start=1)}
            if mode == "bm25":
                ranked = lexical
            elif mode == "vector":
                ranked = [(i, 1.0 - d) for i, d in vector]
            else:
                ranked = rrf([[i for i, _ in lexical], [i for i, _ in vector]], self.rrf_k, self.weights)
            if mmr_lambda is not None and len(ranked) > k:
                ids = [i for i, _ in ranked]
                rel = np.array([s for _, s in ranked], dtype=np.float64)
                if mode == "bm25" or mode == "hybrid":
                    rel = rel - min(0.0, rel.min())
                picked = mmr(rel, self.store.vectors(ids).astype(np.float64), k, mmr_lambda)
                ranked = [ranked[j] for j in picked]
            ranked = ranked[:k]
            chunks = self.store.chunks([i for i, _ in ranked])
        return [Hit(chunks[i], s, bm25_rank.get(i), vec_rank.get(i)) for i, s in ranked]
