"""The embedded store: one SQLite file, opened through ``apsw`` with the ``sqlite-vec`` extension.

    store = Store("docs.db")                        # creates the file when it is new
    store.bm25("to be or not to be", k=20)          # [(chunk_id, score)], best first (FTS5)
    store.knn(query_vector, k=20)                   # [(chunk_id, cosine distance)] by each chunk's best window

Python's stdlib ``sqlite3`` here cannot load extensions; ``apsw`` can, and its SQLite has FTS5.

Tables:

    meta(key, value)                 embedding model, its dimension, chunking settings, schema version
    files(id, path, kind, sha256, size, n_chunks)          path: relative to the indexed folder
    chunks(id, file_id, ord, section, text, start_line, end_line, page, end_page)
    chunks_fts   FTS5 (section, text), rowid = chunk id    BM25 (porter stemming, unicode61)
    windows(id, chunk_id, start_line, end_line, text_hash)  a few lines of a chunk (small-to-big)
    windows_vec  vec0 float[D], cosine distance, rowid = window id

Small-to-big: BM25 and answers work on chunks; the vectors are of windows (a few lines each, see
``rag/chunking.py``) and the vector search ranks a chunk by the distance of its best window.
``text_hash`` (sha256 of the embedded text and the model's name) is the embedding cache: the
indexer looks a new window's hash up here before embedding it, so an unchanged paragraph of an
edited file, or a renamed file, is never embedded twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import UserError

KNN_MAX = 4096  # sqlite-vec's largest k; beyond it the vector search scans with vec_distance_cosine

SCHEMA_VERSION = "2"  # 2: vectors of windows (small-to-big); 1 had one vector per chunk


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

    @property
    def outdated(self) -> bool:
        """Whether the tables were made by an older lmforge (another schema): index again to rebuild."""
        return self.ready and self.meta().get("schema") != SCHEMA_VERSION

    def check_schema(self) -> None:
        """Refuse to search tables of an older schema, saying how to rebuild them."""
        if self.outdated:
            raise StoreError(f"{self.path} was built by an older lmforge (schema {self.meta().get('schema')}, now "
                             f"{SCHEMA_VERSION}): run `lmforge rag index DIR --db {self.path}` again to rebuild it.")  # fmt: skip

    def drop_tables(self) -> None:
        """Remove every index table (an outdated schema is rebuilt from the documents)."""
        for name in ("chunks_fts", "chunks_vec", "windows_vec", "windows", "chunks", "files"):  # children first
            self.conn.execute(f"DROP TABLE IF EXISTS {name}")
        self.conn.execute("DELETE FROM meta")
        self.set_meta(schema=SCHEMA_VERSION)

    def create_tables(self, dim: int) -> None:
        self.conn.execute(f"""
            CREATE TABLE files(id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, kind TEXT NOT NULL,
                               sha256 TEXT NOT NULL, size INTEGER NOT NULL, n_chunks INTEGER NOT NULL);
            CREATE TABLE chunks(id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
                                ord INTEGER NOT NULL, section TEXT NOT NULL, text TEXT NOT NULL,
                                start_line INTEGER NOT NULL, end_line INTEGER NOT NULL, page INTEGER, end_page INTEGER);
            CREATE INDEX chunks_file ON chunks(file_id);
            CREATE TABLE windows(id INTEGER PRIMARY KEY, chunk_id INTEGER NOT NULL REFERENCES chunks(id) ON DELETE CASCADE,
                                 start_line INTEGER NOT NULL, end_line INTEGER NOT NULL, text_hash TEXT NOT NULL);
            CREATE INDEX windows_chunk ON windows(chunk_id);
            CREATE INDEX windows_hash ON windows(text_hash);
            CREATE VIRTUAL TABLE chunks_fts USING fts5(section, text, tokenize='porter unicode61');
            CREATE VIRTUAL TABLE windows_vec USING vec0(embedding float[{int(dim)}] distance_metric=cosine);
        """)  # fmt: skip
        self.set_meta(dim=dim, schema=SCHEMA_VERSION)

    # --- files -----------------------------------------------------------------------------------
    def files(self) -> dict[str, tuple[int, str]]:
        """path -> (file id, sha256) of every indexed file."""
        if not self.ready:
            return {}
        return {p: (i, h) for i, p, h in self.conn.execute("SELECT id, path, sha256 FROM files")}

    def delete_file(self, file_id: int) -> int:
        """Remove a file, its chunks and their windows from every table; returns the number of chunks removed."""
        ids = [r[0] for r in self.conn.execute("SELECT id FROM chunks WHERE file_id = ?", (file_id,))]
        wids = self.conn.execute("SELECT w.id FROM windows w JOIN chunks c ON c.id = w.chunk_id WHERE c.file_id = ?",
                                 (file_id,)).fetchall()  # fmt: skip
        self.conn.executemany("DELETE FROM windows_vec WHERE rowid = ?", wids)
        self.conn.executemany("DELETE FROM chunks_fts WHERE rowid = ?", [(i,) for i in ids])
        self.conn.execute("DELETE FROM windows WHERE chunk_id IN (SELECT id FROM chunks WHERE file_id = ?)", (file_id,))
        self.conn.execute("DELETE FROM chunks WHERE file_id = ?", (file_id,))
        self.conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
        return len(ids)

    def add_file(self, path: str, kind: str, sha256: str, size: int, chunks: Sequence,
                 window_hashes: Sequence[Sequence[str]], vectors: Mapping[str, np.ndarray]) -> int:  # fmt: skip
        """Insert a file and its chunks (``rag.chunking.Chunk``); each chunk's windows get the hash
        ``window_hashes[i][j]`` and the vector ``vectors[hash]`` (D floats, L2-normalised)."""
        self.conn.execute("INSERT INTO files(path, kind, sha256, size, n_chunks) VALUES(?, ?, ?, ?, ?)",
                          (path, kind, sha256, size, len(chunks)))  # fmt: skip
        file_id = self.conn.last_insert_rowid()
        for i, (c, hs) in enumerate(zip(chunks, window_hashes)):
            self.conn.execute(
                "INSERT INTO chunks(file_id, ord, section, text, start_line, end_line, page, end_page)"
                " VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                (file_id, i, c.section, c.text, c.start_line, c.end_line, c.page, c.end_page),
            )
            cid = self.conn.last_insert_rowid()
            self.conn.execute("INSERT INTO chunks_fts(rowid, section, text) VALUES(?, ?, ?)", (cid, c.section, c.text))
            for w, h in zip(c.windows, hs):
                self.conn.execute("INSERT INTO windows(chunk_id, start_line, end_line, text_hash) VALUES(?, ?, ?, ?)",
                                  (cid, w.start_line, w.end_line, h))  # fmt: skip
                vec = np.ascontiguousarray(vectors[h], dtype=np.float32)
                self.conn.execute("INSERT INTO windows_vec(rowid, embedding) VALUES(?, ?)", (self.conn.last_insert_rowid(), vec.tobytes()))
        return file_id

    def cached_vectors(self, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored vectors of any window whose text hash is among ``hashes`` (the embedding cache)."""
        if not self.ready:
            return {}
        found, hashes = {}, list(dict.fromkeys(hashes))
        dim = int(self.meta()["dim"])
        for start in range(0, len(hashes), 500):
            part = hashes[start : start + 500]
            marks = ",".join("?" * len(part))
            rows = self.conn.execute(
                f"SELECT w.text_hash, v.embedding FROM windows w JOIN windows_vec v ON v.rowid = w.id WHERE w.text_hash IN ({marks})",
                part,
            )
            for h, blob in rows:
                found[h] = np.frombuffer(blob, dtype=np.float32, count=dim)
        return found

    # --- reading ---------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        if not self.ready or self.outdated:
            return {"files": 0, "chunks": 0, "windows": 0}
        return {t: self.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("files", "chunks", "windows")}

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
        """(N, D) vectors of chunks, in the order of ``ids``: the mean of each chunk's window
        vectors, L2-normalised (what MMR compares chunks by)."""
        dim = int(self.meta()["dim"])
        sums = {i: np.zeros(dim, np.float64) for i in ids}
        for start in range(0, len(ids), 500):
            part = list(ids[start : start + 500])
            marks = ",".join("?" * len(part))
            rows = self.conn.execute(
                f"SELECT w.chunk_id, v.embedding FROM windows w JOIN windows_vec v ON v.rowid = w.id WHERE w.chunk_id IN ({marks})",
                part,
            )
            for i, blob in rows:
                sums[i] += np.frombuffer(blob, dtype=np.float32, count=dim)
        if not ids:
            return np.zeros((0, dim), np.float32)
        out = np.stack([sums[i] for i in ids])
        return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)

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
        """The ``k`` chunks nearest to ``vector``, with their cosine distances: a chunk's distance is
        that of its nearest window (sqlite-vec, exact). Windows are fetched ``4 k`` at a time, then
        more, until ``k`` distinct chunks are found or every window has been seen."""
        if not self.ready or k <= 0:
            return []
        sub, args = self._filter_sql(path_glob, kinds)
        blob = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
        n = min(4 * k, KNN_MAX)
        while True:
            sql = "SELECT rowid, distance FROM windows_vec WHERE embedding MATCH ? AND k = ?"
            if sub:
                sql += f" AND rowid IN (SELECT id FROM windows WHERE chunk_id IN ({sub}))"
            near = self.conn.execute(sql + " ORDER BY distance", [blob, n, *args]).fetchall()
            if len(near) == n == KNN_MAX:  # past sqlite-vec's largest k: one exact scan of every window
                sql = "SELECT rowid, vec_distance_cosine(embedding, ?) AS d FROM windows_vec"
                if sub:
                    sql += f" WHERE rowid IN (SELECT id FROM windows WHERE chunk_id IN ({sub}))"
                near = self.conn.execute(sql + " ORDER BY d", [blob, *args]).fetchall()
            chunk_of = self._chunk_of([i for i, _ in near])
            best: dict[int, float] = {}
            for i, d in near:  # nearest first: a chunk's first window is its best
                best.setdefault(chunk_of[i], float(d))
            if len(best) >= k or len(near) < n or n == KNN_MAX:
                break
            n = min(4 * n, KNN_MAX)
        return list(best.items())[:k]

    def _chunk_of(self, window_ids: Sequence[int]) -> dict[int, int]:
        out = {}
        for start in range(0, len(window_ids), 500):
            part = list(window_ids[start : start + 500])
            marks = ",".join("?" * len(part))
            out.update(self.conn.execute(f"SELECT id, chunk_id FROM windows WHERE id IN ({marks})", part))
        return out
