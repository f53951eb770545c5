"""Retrieval: BM25, vectors, RRF, MMR and metadata filters on the small corpus."""

import numpy as np
import pytest

from lmforge.rag.retrieve import Retriever, mmr, rrf
from lmforge.rag.store import Store, StoreError


@pytest.fixture
def retriever(corpus_db, embedder):
    r = Retriever.open(corpus_db, embedder)
    yield r
    r.close()


def test_rrf_by_hand():
    fused = rrf([[1, 2, 3], [3, 1]], k=10)
    scores = dict(fused)
    assert scores[1] == pytest.approx(1 / 11 + 1 / 12) and scores[3] == pytest.approx(1 / 13 + 1 / 11)
    assert scores[2] == pytest.approx(1 / 12)
    assert [i for i, _ in fused] == [1, 3, 2]
    assert [i for i, _ in rrf([[1, 2], [2, 1]], k=10, weights=[3.0, 1.0])] == [1, 2]


def test_mmr_prefers_diverse_items():
    v = np.array([[1, 0], [0.999, 0.045], [0, 1]], dtype=np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    rel = np.array([1.0, 0.99, 0.8])
    assert mmr(rel, v, 2, lam=1.0) == [0, 1]  # relevance only
    assert mmr(rel, v, 2, lam=0.5) == [0, 2]  # the near-duplicate is passed over


@pytest.mark.parametrize("mode", ["bm25", "vector", "hybrid"])
def test_each_mode_finds_the_right_file(retriever, mode):
    cases = {
        "how often should tomatoes be watered": "notes/garden.md",
        "largest planet of the solar system": "astronomy.pdf",
        "knead the dough": "baking.html",
        "steam piston cylinder": "engines.txt",
    }
    for query, path in cases.items():
        hits = retriever.search(query, k=2, mode=mode)
        assert hits[0].chunk.path == path, (mode, query, [h.chunk.path for h in hits])


def test_vectors_match_meaning_without_shared_words(retriever):
    hits = retriever.search("which celestial body circles our world monthly", k=1, mode="vector")
    assert hits[0].chunk.path == "astronomy.pdf"


def test_hits_carry_section_position_and_ranks(retriever):
    (hit,) = retriever.search("prune roses late winter", k=1)
    c = hit.chunk
    assert c.path == "notes/garden.md" and c.section.startswith("Garden guide")
    assert c.position.startswith("line") and c.start_line >= 1
    assert hit.bm25_rank == 1 and hit.vector_rank is not None
    (pdf,) = retriever.search("Jupiter", k=1, mode="bm25")
    assert pdf.chunk.position.startswith("p")


def test_filters(retriever):
    for mode in ("bm25", "vector", "hybrid"):
        hits = retriever.search("dough planet tomatoes steam", k=10, mode=mode, path="notes/*")
        assert hits and {h.chunk.path for h in hits} == {"notes/garden.md"}
        hits = retriever.search("dough planet tomatoes steam", k=10, mode=mode, kinds=["pdf", "html"])
        assert hits and {h.chunk.kind for h in hits} <= {"pdf", "html"}
        assert {h.chunk.path for h in hits} == {"astronomy.pdf", "baking.html"}


def test_k_results_whenever_k_chunks_pass(retriever):
    n = Store(retriever.store.path, create=False).counts()["chunks"]
    assert len(retriever.search("anything at all", k=n, mode="vector")) == n
    assert len(retriever.search("water", k=3, mode="hybrid")) == 3


def test_mmr_search_returns_k_distinct(retriever):
    hits = retriever.search("bread dough garden roses", k=3, mmr_lambda=0.3)
    assert len({h.chunk.id for h in hits}) == 3


def test_bad_arguments(retriever):
    with pytest.raises(ValueError, match="mode"):
        retriever.search("x", mode="fuzzy")
    with pytest.raises(ValueError, match="docx"):
        retriever.search("x", kinds=["docx"])
    with pytest.raises(ValueError, match="mmr"):
        retriever.search("x", mmr_lambda=2)


def test_query_syntax_is_never_fts_syntax(retriever):
    hits = retriever.search('"dough AND (NEAR OR', k=2, mode="bm25")  # FTS5 would reject this as syntax
    assert hits[0].chunk.path == "baking.html"
    assert retriever.search("***", k=2, mode="bm25") == []


def test_missing_database_says_how_to_build_it(tmp_path, embedder):
    with pytest.raises(StoreError, match=r"lmforge rag index DIR --db"):
        Retriever.open(tmp_path / "nope.db", embedder)
