"""The embedded store: one SQLite file, opened through ``apsw`` with the ``sqlite-vec`` extension.

    store = Store("docs.db")                        # creates the file when it is new
    store.bm25("to be or not to be", k=20)          # [(chunk_id, score)], best first (FTS5)
    store.knn(query_vector, k=20)                   # [(chunk_id, cosine distance)] (sqlite-vec)

Python's stdlib ``sqlite3`` here cannot load extensions; ``apsw`` can, and its SQLite has FTS5.

Tables:

    meta(key, value)                 embedding model, its dimension, chunking settings
    files(id, path, kind, sha256, size, n_chunks)          path: relative to the indexed folder
    chunks(id, file_id, ord, section, text, start_line, end_line, page, end_page, text_hash)
    chunks_fts   FTS5 (section, text), rowid = chunk id    BM25 (porter stemming, unicode61)
    chunks_vec   vec0 float[D], cosine distance, rowid = chunk id

``text_hash`` (sha256 of the embedded text and the model's name) is the embedding cache: the
indexer looks a new chunk's hash up here before embedding it, so an unchanged paragraph of an
edited file, or a renamed file, is never embedded twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import UserError

SCHEMA_VERSION = "1"


class StoreError(UserError, ValueError):
    """A database that cannot be used: missing, not ours, or built with another embedding model."""


@dataclass
class StoredChunk:
    id: int
    path: str  # relative to the indexed folder
    kind: str
    section: str
    text: str
    start_line: int
    end_line: int
    page: int | None
    end_page: int | None

    @property
    def position(self) -> str:
        if self.page is not None:
            return f"p. {self.page}" if self.end_page in (None, self.page) else f"pp. {self.page}-{self.end_page}"
        return f"line {self.start_line}" if self.start_line == self.end_line else f"lines {self.start_line}-{self.end_line}"

    @property
    def embed_text(self) -> str:
        return f"{self.section}\n{self.text}" if self.section else self.text


def text_hash(model_name: str, text: str) -> str:
    """The embedding cache key of a text under a model."""
    return hashlib.sha256(f"{model_name}\x00{text}".encode()).hexdigest()


def _connect(path: str | Path):
    try:
        import apsw
        import sqlite_vec
    except ImportError as e:
        raise StoreError(f"RAG needs apsw and sqlite-vec ({e.name} is missing): pip install 'lmforge[rag]'.") from None

    conn = apsw.Connection(str(path))
    conn.enable_load_extension(True)
    conn.load_extension(sqlite_vec.loadable_path())
    conn.enable_load_extension(False)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA journal_mode = WAL")
    return conn


def fts_query(text: str) -> str | None:
    """An FTS5 query matching any word of ``text`` (each quoted, so no user text is FTS syntax)."""
    import re

    words = re.findall(r"\w+", text.lower())
    return " OR ".join(f'"{w}"' for w in dict.fromkeys(words)) or None


class Store:
    """One RAG database. ``create=False`` refuses a missing file (``rag ask`` must not make one)."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise StoreError(f"{self.path} does not exist: build it first with `lmforge rag index DIR --db {self.path}`.")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = _connect(self.path)
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except StoreError:
            raise
        except Exception as e:  # apsw.NotADBError and friends
            raise StoreError(f"{self.path} is not a RAG database ({type(e).__name__}: {e}); choose another --db path.") from None
        if tables and "meta" not in tables:
            raise StoreError(f"{self.path} is an SQLite file but not a RAG database; choose another --db path.")
        if not tables:
            if not create:
                raise StoreError(f"{self.path} is empty: build it with `lmforge rag index DIR --db {self.path}`.")
            self.conn.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")
            self.set_meta(schema=SCHEMA_VERSION)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- meta ------------------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta"))

    def set_meta(self, **values) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO meta VALUES(?, ?)", [(k, str(v)) for k, v in values.items()])

    @property
    def ready(self) -> bool:
        """Whether the chunk tables exist (the first index run creates them, knowing the dimension)."""
        return "dim" in self.meta()

    def create_tables(self, dim: int) -> None:
        self.conn.execute(f"""
            CREATE TABLE files(id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, kind TEXT NOT NULL,
                               sha256 TEXT NOT NULL, size INTEGER NOT NULL, n_chunks INTEGER NOT NULL);
            CREATE TABLE chunks(id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
                                ord INTEGER NOT NULL, section TEXT NOT NULL, text TEXT NOT NULL,
                                start_line INTEGER NOT NULL, end_line INTEGER NOT NULL, page INTEGER, end_page INTEGER,
                                text_hash TEXT NOT NULL);
            CREATE INDEX chunks_file ON chunks(file_id);
            CREATE INDEX chunks_hash ON chunks(text_hash);
            CREATE VIRTUAL TABLE chunks_fts USING fts5(section, text, tokenize='porter unicode61');
            CREATE VIRTUAL TABLE chunks_vec USING vec0(embedding float[{int(dim)}] distance_metric=cosine);
        """)  # fmt: skip
        self.set_meta(dim=dim)

    # --- files -----------------------------------------------------------------------------------
    def files(self) -> dict[str, tuple[int, str]]:
        """path -> (file id, sha256) of every indexed file."""
        if not self.ready:
            return {}
        return {p: (i, h) for i, p, h in self.conn.execute("SELECT id, path, sha256 FROM files")}

    def delete_file(self, file_id: int) -> int:
        """Remove a file and its chunks from every table; returns the number of chunks removed."""
        ids = [r[0] for r in self.conn.execute("SELECT id FROM chunks WHERE file_id = ?", (file_id,))]
        self.conn.executemany("DELETE FROM chunks_fts WHERE rowid = ?", [(i,) for i in ids])
        self.conn.executemany("DELETE FROM chunks_vec WHERE rowid = ?", [(i,) for i in ids])
        self.conn.execute("DELETE FROM chunks WHERE file_id = ?", (file_id,))
        self.conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
        return len(ids)

    def add_file(self, path: str, kind: str, sha256: str, size: int, chunks: Sequence, hashes: Sequence[str],
                 vectors: np.ndarray) -> int:  # fmt: skip
        """Insert a file, its chunks (``rag.chunking.Chunk``), their hashes and (N, D) vectors."""
        self.conn.execute("INSERT INTO files(path, kind, sha256, size, n_chunks) VALUES(?, ?, ?, ?, ?)",
                          (path, kind, sha256, size, len(chunks)))  # fmt: skip
        file_id = self.conn.last_insert_rowid()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        for i, (c, h) in enumerate(zip(chunks, hashes)):
            self.conn.execute(
                "INSERT INTO chunks(file_id, ord, section, text, start_line, end_line, page, end_page, text_hash)"
                " VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (file_id, i, c.section, c.text, c.start_line, c.end_line, c.page, c.end_page, h),
            )
            cid = self.conn.last_insert_rowid()
            self.conn.execute("INSERT INTO chunks_fts(rowid, section, text) VALUES(?, ?, ?)", (cid, c.section, c.text))
            self.conn.execute("INSERT INTO chunks_vec(rowid, embedding) VALUES(?, ?)", (cid, vectors[i].tobytes()))
        return file_id

    def cached_vectors(self, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored vectors of any chunk whose text hash is among ``hashes`` (the embedding cache)."""
        if not self.ready:
            return {}
        found, hashes = {}, list(dict.fromkeys(hashes))
        dim = int(self.meta()["dim"])
        for start in range(0, len(hashes), 500):
            part = hashes[start : start + 500]
            marks = ",".join("?" * len(part))
            rows = self.conn.execute(
                f"SELECT c.text_hash, v.embedding FROM chunks c JOIN chunks_vec v ON v.rowid = c.id WHERE c.text_hash IN ({marks})",
                part,
            )
            for h, blob in rows:
                found[h] = np.frombuffer(blob, dtype=np.float32, count=dim)
        return found

    # --- reading ---------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        if not self.ready:
            return {"files": 0, "chunks": 0}
        f = self.conn.execute("SELECT count(*) FROM files").fetchone()[0]
        c = self.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        return {"files": f, "chunks": c}

    def chunks(self, ids: Sequence[int]) -> dict[int, StoredChunk]:
        out = {}
        for start in range(0, len(ids), 500):
            part = list(ids[start : start + 500])
            marks = ",".join("?" * len(part))
            rows = self.conn.execute(
                "SELECT c.id, f.path, f.kind, c.section, c.text, c.start_line, c.end_line, c.page, c.end_page"
                f" FROM chunks c JOIN files f ON f.id = c.file_id WHERE c.id IN ({marks})",
                part,
            )
            for r in rows:
                out[r[0]] = StoredChunk(*r)
        return out

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """(N, D) stored vectors in the order of ``ids``."""
        dim = int(self.meta()["dim"])
        got = {}
        for start in range(0, len(ids), 500):
            part = list(ids[start : start + 500])
            marks = ",".join("?" * len(part))
            for i, blob in self.conn.execute(f"SELECT rowid, embedding FROM chunks_vec WHERE rowid IN ({marks})", part):
                got[i] = np.frombuffer(blob, dtype=np.float32, count=dim)
        return np.stack([got[i] for i in ids]) if ids else np.zeros((0, dim), np.float32)

    def _filter_sql(self, path_glob: str | None, kinds: Sequence[str] | None) -> tuple[str, list]:
        """A subquery of the chunk ids that pass the metadata filters, or ("", []) for none."""
        where, args = [], []
        if path_glob:
            where.append("f.path GLOB ?")
            args.append(path_glob)
        if kinds:
            where.append(f"f.kind IN ({','.join('?' * len(kinds))})")
            args += list(kinds)
        if not where:
            return "", []
        return "SELECT c.id FROM chunks c JOIN files f ON f.id = c.file_id WHERE " + " AND ".join(where), args

    def bm25(self, query: str, k: int, path_glob: str | None = None, kinds: Sequence[str] | None = None) -> list[tuple[int, float]]:
        """Chunk ids by FTS5's BM25, best first, with their scores (higher is better)."""
        q = fts_query(query)
        if q is None or not self.ready:
            return []
        sub, args = self._filter_sql(path_glob, kinds)
        sql = "SELECT rowid, -bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ?"
        if sub:
            sql += f" AND rowid IN ({sub})"
        sql += " ORDER BY bm25(chunks_fts) LIMIT ?"
        return [(int(i), float(s)) for i, s in self.conn.execute(sql, [q, *args, k])]

    def knn(self, vector: np.ndarray, k: int, path_glob: str | None = None, kinds: Sequence[str] | None = None) -> list[tuple[int, float]]:
        """Chunk ids nearest to ``vector`` (sqlite-vec, exact), with their cosine distances."""
        if not self.ready:
            return []
        sub, args = self._filter_sql(path_glob, kinds)
        sql = "SELECT rowid, distance FROM chunks_vec WHERE embedding MATCH ? AND k = ?"
        if sub:
            sql += f" AND rowid IN ({sub})"
        blob = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
        return [(int(i), float(d)) for i, d in self.conn.execute(sql + " ORDER BY distance", [blob, k, *args])]
