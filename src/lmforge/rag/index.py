"""Indexing a folder into the store: incremental by content hash, deletes included.

    report = index_directory("notes/", "notes.db")      # IndexReport: what changed, how long it took

Each run compares every supported file (.txt, .md, .html, .pdf; hidden folders left out) with what
the database holds, by the sha256 of its bytes: new and changed files are loaded, chunked and
embedded, files gone from the folder are deleted, unchanged files are not touched. What is embedded
is each chunk's windows (a few lines each: small-to-big, see ``rag/chunking.py``); their vectors are
looked up by the hash of the window's text first (``Store.cached_vectors``), so only windows whose
text is new are embedded. A file that cannot be read (binary, corrupt PDF, invalid UTF-8) is skipped with
a warning naming it; the rest is indexed. All writes of a run are one transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import UserError
from lmforge.rag.chunking import Chunk, chunk_document
from lmforge.rag.embed import Embedder
from lmforge.rag.loaders import LoadError, kind_of, load_document
from lmforge.rag.store import Store, StoreError, text_hash

log = logging.getLogger("lmforge.rag")

DEFAULT_MAX_TOKENS = 128  # all-MiniLM-L6-v2 was trained on 128 word pieces (it reads up to 256)
DEFAULT_OVERLAP = 16
# The vector search's unit: one or two lines of verse, about a sentence. Chosen on six plays (hamlet,
# macbeth, othello, twelfth-night, the-tempest, henry-v; 400 questions of their own, `rag eval`'s test
# half), vector recall@5 by window size: 8 tokens 0.885, 16: 0.880, 24: 0.735, 32: 0.665, 64: 0.475;
# tuned hybrid 0.955 / 0.960 / 0.925 / 0.930 / 0.925 against BM25's 0.920. A window's text alone is
# embedded, without the chunk's section path: at 32 tokens the path cost 0.055 vector recall@5 and
# 59% more tokens.
DEFAULT_WINDOW_TOKENS = 16


@dataclass
class IndexReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    ignored: list[str] = field(default_factory=list)  # files of other types
    chunks: int = 0  # chunks in the database after the run
    windows: int = 0  # their windows (the vectors)
    chunks_new: int = 0  # chunks written by this run
    windows_new: int = 0  # their windows
    embedded: int = 0  # distinct window texts embedded now (the other windows' vectors came from the cache)
    embedded_tokens: int = 0  # tokens the encoder ran over, special tokens included
    seconds: float = 0.0
    embed_seconds: float = 0.0

    def summary(self) -> str:
        rate = (f" ({self.embedded_tokens:,} tokens in {self.embed_seconds:.1f} s, "
                f"{self.embedded_tokens / self.embed_seconds:,.0f} tokens/s)") if self.embed_seconds > 0 else ""  # fmt: skip
        line = (f"{len(self.added)} added, {len(self.updated)} changed, {len(self.removed)} removed, "
                f"{self.unchanged} unchanged, {len(self.skipped)} skipped; {self.chunks} chunks in the index "
                f"({self.windows} windows with vectors); {self.chunks_new} chunks written, {self.windows_new} windows "
                f"of which {self.embedded} embedded{rate} and the rest from the cache; {self.seconds:.1f} s in all")  # fmt: skip
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


def _check_settings(store: Store, embedder: Embedder, max_tokens: int, overlap: int, window_tokens: int,
                    embedding_path: str) -> bool:  # fmt: skip
    """Record the settings of a new database; for an existing one, refuse another embedding model
    and say whether the chunking changed (then every file is chunked again). Tables of an older
    schema are dropped and rebuilt (the index is derived from the documents)."""
    if store.outdated:
        log.warning("%s was built by an older lmforge (schema %s): rebuilding it", store.path, store.meta().get("schema"))
        store.drop_tables()
    meta = store.meta()
    chunking = f"{max_tokens}/{overlap}/{window_tokens}/{embedder.name}"
    if not store.ready:
        store.create_tables(embedder.dim)
    elif meta.get("embedding_model") != embedder.name or int(meta["dim"]) != embedder.dim:
        raise StoreError(f"{store.path} was built with the embedding model {meta.get('embedding_model')}, not {embedder.name}: "
                         "index into a new --db, or use that model.")  # fmt: skip
    changed = meta.get("chunking", chunking) != chunking
    store.set_meta(embedding_model=embedder.name, embedding_path=embedding_path, chunking=chunking,
                   max_tokens=max_tokens, overlap=overlap, window_tokens=window_tokens)  # fmt: skip
    return changed


def index_directory(root: str | Path, db: str | Path, embedder: Embedder | None = None, *,
                    max_tokens: int = DEFAULT_MAX_TOKENS, overlap: int = DEFAULT_OVERLAP,
                    window_tokens: int = DEFAULT_WINDOW_TOKENS, progress: bool = True) -> IndexReport:  # fmt: skip
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
            rechunk = _check_settings(store, embedder, max_tokens, overlap, window_tokens, embedding_path)
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
                chunks = chunk_document(doc, embedder.count_tokens, max_tokens, overlap, window_tokens)
                todo.append((rel, doc.kind, sha, len(data), chunks))
                (report.updated if old is not None else report.added).append(rel)
            # per file, per chunk: the hash of each window's text
            hashes = [[[text_hash(embedder.name, w.text) for w in c.windows] for c in item[4]] for item in todo]
            vectors = store.cached_vectors(h for per_file in hashes for hs in per_file for h in hs)  # before old rows go
            for rel, (file_id, _) in stored.items():
                if rel not in seen:
                    store.delete_file(file_id)
                    report.removed.append(rel)
            missing: dict[str, str] = {}
            for item, per_file in zip(todo, hashes):
                for c, hs in zip(item[4], per_file):
                    for w, h in zip(c.windows, hs):
                        if h not in vectors:
                            missing.setdefault(h, w.text)
            if missing:
                t1, tokens0 = time.perf_counter(), embedder.tokens_embedded
                with tqdm(total=len(missing), desc="embedding", unit="window", disable=not progress) as bar:
                    new = embedder.embed_texts(list(missing.values()), progress=bar.update)
                vectors.update(zip(missing, new))
                report.embed_seconds = time.perf_counter() - t1
                report.embedded_tokens = embedder.tokens_embedded - tokens0
            report.embedded = len(missing)
            for (rel, kind, sha, size, chunks), per_file in zip(todo, hashes):
                if rel in stored:
                    store.delete_file(stored[rel][0])
                store.add_file(rel, kind, sha, size, chunks, per_file, vectors)
                report.chunks_new += len(chunks)
                report.windows_new += sum(len(c.windows) for c in chunks)
            store.set_meta(root=str(root.resolve()))
        counts = store.counts()
        report.chunks, report.windows = counts["chunks"], counts["windows"]
    finally:
        store.close()
    report.seconds = time.perf_counter() - t0
    return report


__all__ = ["index_directory", "IndexReport", "Chunk", "scan"]
