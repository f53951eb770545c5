import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def embedder():
    """The bundled all-MiniLM-L6-v2 through lmforge's encoder (real weights, loaded once)."""
    from lmforge.rag.embed import Embedder

    return Embedder.load()


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    """Every test here runs single-threaded (tests/conftest.py: one_thread)."""


@pytest.fixture(scope="session")
def corpus_db(tmp_path_factory, embedder):
    """The small four-format corpus, indexed once (read-only for the tests that use it)."""
    from rag_helpers import write_corpus

    from lmforge.rag.index import index_directory

    root = write_corpus(tmp_path_factory.mktemp("corpus") / "docs")
    db = root.parent / "corpus.db"
    index_directory(root, db, embedder, progress=False)
    return db
