"""Indexing a folder into the store: incremental by content hash, deletes included.

    report = index_directory("notes/", "notes.db")      # IndexReport: what changed, how long it took

Each run compares every supported file (.txt, .md, .html, .pdf; hidden folders left out) with what
the database holds, by the sha256 of its bytes: new and changed files are loaded, chunked and
embedded, files gone from the folder are deleted, unchanged files are not touched. Embeddings are
looked up by the hash of the chunk's text first (``Store.cached_vectors``), so only chunks whose text
is new are embedded. A file that cannot be read (binary, corrupt PDF, invalid UTF-8) is skipped with
a warning naming it; the rest is indexed. All writes of a run are one transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.errors import UserError
from lmforge.rag.chunking import Chunk, chunk_document
from lmforge.rag.embed import Embedder
from lmforge.rag.loaders import LoadError, kind_of, load_document
from lmforge.rag.store import Store, StoreError, text_hash

log = logging.getLogger("lmforge.rag")

DEFAULT_MAX_TOKENS = 128  # all-MiniLM-L6-v2 was trained on 128 word pieces (it reads up to 256)
DEFAULT_OVERLAP = 16


@dataclass
class IndexReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    ignored: list[str] = field(default_factory=list)  # files of other types
    chunks: int = 0  # chunks in the database after the run
    chunks_new: int = 0  # chunks written by this run
    embedded: int = 0  # of which embedded now (the rest came from the cache)
    seconds: float = 0.0

    def summary(self) -> str:
        line = (f"{len(self.added)} added, {len(self.updated)} changed, {len(self.removed)} removed, "
                f"{self.unchanged} unchanged, {len(self.skipped)} skipped; {self.chunks} chunks in the index, "
                f"{self.chunks_new} written ({self.embedded} embedded, {self.chunks_new - self.embedded} from the cache) "
                f"in {self.seconds:.1f} s")  # fmt: skip
        if self.ignored:
            shown = ", ".join(self.ignored[:5]) + (f" (+{len(self.ignored) - 5} more)" if len(self.ignored) > 5 else "")
            line += f"\nignored {len(self.ignored)} file(s) of other types: {shown}"
        return line


def scan(root: Path) -> tuple[list[Path], list[Path]]:
    """(supported files, other files) under ``root``, sorted; hidden files and folders left out."""
    supported, other = [], []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        (supported if kind_of(p) else other).append(p)
    return supported, other


def _check_settings(store: Store, embedder: Embedder, max_tokens: int, overlap: int, embedding_path: str) -> bool:
    """Record the settings of a new database; for an existing one, refuse another embedding model
    and say whether the chunking changed (then every file is chunked again)."""
    meta = store.meta()
    chunking = f"{max_tokens}/{overlap}/{embedder.name}"
    if not store.ready:
        store.create_tables(embedder.dim)
    elif meta.get("embedding_model") != embedder.name or int(meta["dim"]) != embedder.dim:
        raise StoreError(f"{store.path} was built with the embedding model {meta.get('embedding_model')}, not {embedder.name}: "
                         "index into a new --db, or use that model.")  # fmt: skip
    changed = meta.get("chunking", chunking) != chunking
    store.set_meta(embedding_model=embedder.name, embedding_path=embedding_path, chunking=chunking,
                   max_tokens=max_tokens, overlap=overlap)  # fmt: skip
    return changed


def index_directory(root: str | Path, db: str | Path, embedder: Embedder | None = None, *,
                    max_tokens: int = DEFAULT_MAX_TOKENS, overlap: int = DEFAULT_OVERLAP,
                    progress: bool = True) -> IndexReport:  # fmt: skip
    """Bring the database ``db`` up to date with the folder ``root`` (see the module docstring)."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    t0 = time.perf_counter()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: pass the folder of documents to index.")
    embedding_path = ""
    if embedder is None:
        embedder = Embedder.load()
    elif getattr(embedder, "path", None):
        embedding_path = str(embedder.path)
    report = IndexReport()
    store = Store(db, create=True)
    quiet = contextlib.nullcontext() if not progress else logging_redirect_tqdm([log])  # warnings above the bars
    try:
        with quiet, store.conn:  # one transaction: an interrupted run leaves the database as it was
            rechunk = _check_settings(store, embedder, max_tokens, overlap, embedding_path)
            stored = store.files()
            files, other = scan(root)
            report.ignored = [p.relative_to(root).as_posix() for p in other]
            seen, todo = set(), []  # todo: (rel path, kind, sha, size, chunks)
            for p in tqdm(files, desc="reading", unit="file", disable=not progress, leave=False):
                rel = p.relative_to(root).as_posix()
                seen.add(rel)
                data = p.read_bytes()
                sha = hashlib.sha256(data).hexdigest()
                old = stored.get(rel)
                if old is not None and old[1] == sha and not rechunk:
                    report.unchanged += 1
                    continue
                try:
                    doc = load_document(p, data)
                except LoadError as e:
                    report.skipped.append((rel, str(e)))
                    log.warning("skipped: %s", e)
                    if old is not None:  # its old chunks no longer describe the file
                        store.delete_file(old[0])
                        report.removed.append(rel)
                    continue
                chunks = chunk_document(doc, embedder.count_tokens, max_tokens, overlap)
                todo.append((rel, doc.kind, sha, len(data), chunks))
                (report.updated if old is not None else report.added).append(rel)
            hashes = [[text_hash(embedder.name, c.embed_text) for c in item[4]] for item in todo]
            vectors = store.cached_vectors(h for hs in hashes for h in hs)  # looked up before old rows go
            for rel, (file_id, _) in stored.items():
                if rel not in seen:
                    store.delete_file(file_id)
                    report.removed.append(rel)
            missing: dict[str, str] = {}
            for item, hs in zip(todo, hashes):
                for c, h in zip(item[4], hs):
                    if h not in vectors:
                        missing.setdefault(h, c.embed_text)
            if missing:
                with tqdm(total=len(missing), desc="embedding", unit="chunk", disable=not progress) as bar:
                    new = embedder.embed_texts(list(missing.values()), progress=bar.update)
                vectors.update(zip(missing, new))
            report.embedded = len(missing)
            for (rel, kind, sha, size, chunks), hs in zip(todo, hashes):
                if rel in stored:
                    store.delete_file(stored[rel][0])
                vec = np.stack([vectors[h] for h in hs]) if hs else np.zeros((0, embedder.dim), np.float32)
                store.add_file(rel, kind, sha, size, chunks, hs, vec)
                report.chunks_new += len(chunks)
            store.set_meta(root=str(root.resolve()))
        report.chunks = store.counts()["chunks"]
    finally:
        store.close()
    report.seconds = time.perf_counter() - t0
    return report


__all__ = ["index_directory", "IndexReport", "Chunk", "scan"]
