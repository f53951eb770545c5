"""Indexing: incremental by content hash, deletes, skipped files, the embedding cache."""

import logging

import pytest
from rag_helpers import make_pdf, write_corpus

from lmforge.rag.index import index_directory
from lmforge.rag.store import Store, StoreError


class CountingEmbedder:
    """The real embedder, recording every text it is asked to embed."""

    def __init__(self, inner):
        self.inner, self.texts = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed_texts(self, texts, progress=None):
        self.texts += list(texts)
        return self.inner.embed_texts(texts, progress)


def table_counts(db):
    """[chunks, their FTS rows, windows, their vectors]."""
    with Store(db, create=False) as s:
        return [s.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("chunks", "chunks_fts", "windows", "windows_vec")]


def test_first_index_then_nothing_to_do(tmp_path, embedder):
    root, db = write_corpus(tmp_path / "docs"), tmp_path / "a.db"
    counting = CountingEmbedder(embedder)
    first = index_directory(root, db, counting, progress=False)
    assert sorted(first.added) == ["astronomy.pdf", "baking.html", "engines.txt", "notes/garden.md"]
    assert first.chunks_new == first.chunks > 0 and first.windows_new == first.windows >= first.chunks
    assert first.embedded == len(counting.texts) == len(set(counting.texts)) <= first.windows
    assert first.embedded_tokens > first.embedded and first.embed_seconds > 0
    n = table_counts(db)
    assert n == [first.chunks, first.chunks, first.windows, first.windows]
    counting.texts.clear()
    again = index_directory(root, db, counting, progress=False)
    assert again.unchanged == 4 and not again.added and not again.updated and again.embedded == 0
    assert counting.texts == [] and table_counts(db) == n


def test_editing_one_file_reembeds_only_its_chunks(tmp_path, embedder):
    root, db = write_corpus(tmp_path / "docs"), tmp_path / "a.db"
    index_directory(root, db, embedder, progress=False)
    garden = root / "notes" / "garden.md"
    garden.write_text(garden.read_text().replace("twice a week", "every other day") + "\n## Herbs\n\nBasil likes warmth.\n")
    counting = CountingEmbedder(embedder)
    report = index_directory(root, db, counting, progress=False)
    assert report.updated == ["notes/garden.md"] and report.unchanged == 3
    assert counting.texts, "the edited chunks were embedded"
    garden_lines = set(garden.read_text().splitlines())
    assert all(set(t.split("\n")) <= garden_lines for t in counting.texts)  # every embedded text is the garden file's
    assert any("every other day" in t for t in counting.texts) and any("Basil" in t for t in counting.texts)
    # the unchanged sections (intro, roses) came from the cache, not the model
    assert not any("Prune roses" in t for t in counting.texts)
    assert report.embedded == len(counting.texts) < report.windows_new
    with Store(db, create=False) as s:
        texts = [r[0] for r in s.conn.execute("SELECT text FROM chunks_fts")]
    assert any("every other day" in t for t in texts) and not any("twice a week" in t for t in texts)


def test_deleted_and_renamed_files(tmp_path, embedder):
    root, db = write_corpus(tmp_path / "docs"), tmp_path / "a.db"
    before = index_directory(root, db, embedder, progress=False)
    (root / "engines.txt").unlink()
    (root / "baking.html").rename(root / "bread.html")
    counting = CountingEmbedder(embedder)
    report = index_directory(root, db, counting, progress=False)
    assert sorted(report.removed) == ["baking.html", "engines.txt"] and report.added == ["bread.html"]
    assert counting.texts == []  # the renamed file's chunks came from the cache
    assert report.chunks < before.chunks and report.windows < before.windows
    assert table_counts(db) == [report.chunks, report.chunks, report.windows, report.windows]
    with Store(db, create=False) as s:
        assert sorted(s.files()) == ["astronomy.pdf", "bread.html", "notes/garden.md"]
        assert not list(s.conn.execute("SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH 'steam'"))


def test_corrupt_pdf_and_binary_file_are_skipped_with_a_warning(tmp_path, embedder, caplog):
    root, db = write_corpus(tmp_path / "docs"), tmp_path / "a.db"
    (root / "broken.pdf").write_bytes(make_pdf([["fine"]])[:60])  # truncated
    (root / "data.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
    (root / "image.png").write_bytes(b"\x89PNG")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.md").write_text("# hidden\n")
    with caplog.at_level(logging.WARNING, logger="lmforge.rag"):
        report = index_directory(root, db, embedder, progress=False)
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert "broken.pdf" in warned and "data.txt" in warned
    assert sorted(p for p, _ in report.skipped) == ["broken.pdf", "data.txt"]
    assert sorted(report.added) == ["astronomy.pdf", "baking.html", "engines.txt", "notes/garden.md"]
    assert report.ignored == ["image.png"]
    assert "skipped" in report.summary() and "image.png" in report.summary()


def test_a_file_that_becomes_unreadable_is_removed(tmp_path, embedder):
    root, db = write_corpus(tmp_path / "docs"), tmp_path / "a.db"
    index_directory(root, db, embedder, progress=False)
    (root / "engines.txt").write_bytes(b"\x00\x01\x02")
    report = index_directory(root, db, embedder, progress=False)
    assert report.removed == ["engines.txt"] and report.skipped[0][0] == "engines.txt"
    with Store(db, create=False) as s:
        assert "engines.txt" not in s.files()


def test_another_embedding_model_is_refused(tmp_path, embedder):
    root, db = write_corpus(tmp_path / "docs"), tmp_path / "a.db"
    index_directory(root, db, embedder, progress=False)
    other = CountingEmbedder(embedder)
    other.name = "another-model"
    with pytest.raises(StoreError, match="another-model"):
        index_directory(root, db, other, progress=False)


def test_rechunking_when_settings_change(tmp_path, embedder):
    root, db = write_corpus(tmp_path / "docs"), tmp_path / "a.db"
    index_directory(root, db, embedder, progress=False)
    report = index_directory(root, db, embedder, max_tokens=32, overlap=4, progress=False)
    assert len(report.updated) == 4 and report.unchanged == 0


def test_changing_the_window_size_rechunks(tmp_path, embedder):
    root, db = write_corpus(tmp_path / "docs"), tmp_path / "a.db"
    before = index_directory(root, db, embedder, progress=False)
    report = index_directory(root, db, embedder, window_tokens=4, progress=False)
    assert len(report.updated) == 4 and report.windows > before.windows
    assert table_counts(db)[2:] == [report.windows] * 2


def test_a_database_of_an_older_schema_is_refused_then_rebuilt(tmp_path, embedder):
    from lmforge.rag.retrieve import Retriever

    root, db = write_corpus(tmp_path / "docs"), tmp_path / "a.db"
    first = index_directory(root, db, embedder, progress=False)
    with Store(db) as s:
        s.conn.execute("DROP TABLE windows_vec")
        s.conn.execute("DROP TABLE windows")
        s.conn.execute("CREATE VIRTUAL TABLE chunks_vec USING vec0(embedding float[384] distance_metric=cosine)")
        s.set_meta(schema="1")  # what an lmforge with one vector a chunk left behind
    with pytest.raises(StoreError, match="older lmforge .*lmforge rag index DIR"):
        Retriever.open(db, embedder)
    report = index_directory(root, db, embedder, progress=False)
    assert sorted(report.added) == sorted(first.added) and report.windows == first.windows
    r = Retriever.open(db, embedder)
    assert r.search("prune roses", k=1, mode="vector")[0].chunk.path == "notes/garden.md"
    with Store(db) as s:
        assert "chunks_vec" not in {x[0] for x in s.conn.execute("SELECT name FROM sqlite_master")}
    r.close()


def test_not_a_database(tmp_path):
    bad = tmp_path / "x.db"
    bad.write_bytes(b"hello, not sqlite" * 100)
    with pytest.raises(StoreError, match="not a RAG database"):
        Store(bad)
    with pytest.raises(StoreError, match="lmforge rag index"):
        Store(tmp_path / "missing.db", create=False)
