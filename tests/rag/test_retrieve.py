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


KITCHEN_MD = """# Kitchen diary

## Monday

Knead the dough for ten minutes, then leave it to rise under a damp cloth.
Chop two onions and fry them slowly in butter until they are golden.
Simmer the tomato sauce with garlic and a bay leaf for an hour.
Whisk the eggs with the sugar until pale, then fold in the flour.
The blue whale is the largest animal that has ever lived on Earth.
Grease the tin, pour in the batter and bake it for forty minutes.
Let the bread cool on a rack before slicing it.
"""


def test_vector_search_finds_the_chunk_by_its_best_window(tmp_path, embedder):
    """Small-to-big: one line about whales in a chunk about cooking. Embedded whole, that chunk is
    further from the question than a chunk about elephants (mean pooling dilutes the line); ranked by
    its best window, it comes first, and the whole chunk is what comes back."""
    from lmforge.rag.index import index_directory

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "kitchen.md").write_text(KITCHEN_MD)
    (docs / "zoo.md").write_text("# Zoo guide\n\nElephants are the heaviest animals you can see at the zoo today.\n")
    report = index_directory(docs, tmp_path / "k.db", embedder, progress=False)
    assert report.chunks == 2 and report.windows > report.chunks  # the kitchen chunk has several windows
    question = "What is the largest animal that ever lived?"
    r = Retriever.open(tmp_path / "k.db", embedder)
    try:
        chunks = r.store.chunks([1, 2])
        whole = embedder.embed_texts([c.embed_text for c in chunks.values()])
        q = embedder.embed_texts([question])[0]
        by_whole = {c.path: float(v @ q) for c, v in zip(chunks.values(), whole)}
        assert by_whole["zoo.md"] > by_whole["kitchen.md"]  # one vector a chunk would rank the zoo first
        hits = r.search(question, k=2, mode="vector")
        assert [h.chunk.path for h in hits] == ["kitchen.md", "zoo.md"]
        assert "blue whale" in hits[0].chunk.text and "Knead the dough" in hits[0].chunk.text  # the big chunk
        assert hits[0].score > by_whole["kitchen.md"]  # its score is its best window's cosine
    finally:
        r.close()


def test_knn_looks_further_when_the_nearest_windows_share_a_chunk(tmp_path):
    """Chunk A has 12 windows nearer than chunk B's only one: the first 4k = 8 windows are all A's,
    so the search must fetch more to return k = 2 distinct chunks, A then B; filters still apply."""
    from lmforge.rag.chunking import Chunk, Window

    a = Chunk("a", "", 1, 12, windows=[Window(f"a{i}", i + 1, i + 1) for i in range(12)])
    b = Chunk("b", "", 1, 1, windows=[Window("b", 1, 1)])
    near = {f"a{i}": np.array([1.0, 0.01 * i], np.float32) for i in range(12)}
    vectors = {h: v / np.linalg.norm(v) for h, v in {**near, "b": np.array([0.6, 0.8], np.float32)}.items()}
    with Store(tmp_path / "s.db") as s:
        s.create_tables(2)
        s.add_file("a.txt", "txt", "0", 1, [a], [[w.text for w in a.windows]], vectors)
        s.add_file("b.md", "md", "1", 1, [b], [["b"]], vectors)
        got = s.knn(np.array([1.0, 0.0], np.float32), 2)
        assert [s.chunks([i])[i].path for i, _ in got] == ["a.txt", "b.md"]
        assert got[0][1] == pytest.approx(0.0, abs=1e-6) and got[1][1] == pytest.approx(0.4, abs=1e-6)
        assert [s.chunks([i])[i].path for i, _ in s.knn(np.array([1.0, 0.0], np.float32), 2, kinds=["md"])] == ["b.md"]
        assert len(s.knn(np.array([1.0, 0.0], np.float32), 5)) == 2  # only two chunks exist
        mean = s.vectors([got[0][0]])[0]  # a chunk's vector for MMR: its windows' mean, normalised
        assert np.linalg.norm(mean) == pytest.approx(1.0) and mean[1] > 0
