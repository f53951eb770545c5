"""Prepared corpora shared by the trainer tests."""

from pathlib import Path

import pytest

from train_helpers import plays


@pytest.fixture(scope="session")
def char_corpus(tmp_path_factory) -> Path:
    """Macbeth as one .txt file (a raw corpus the trainer prepares on the fly)."""
    d = tmp_path_factory.mktemp("corpus")
    f = d / "macbeth.txt"
    f.write_text((plays() / "tragedies" / "macbeth.md").read_text(encoding="utf-8"), encoding="utf-8")
    return f


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, char_corpus) -> Path:
    from lmforge.data import prepare

    out = tmp_path_factory.mktemp("char") / "data"
    prepare(char_corpus, out, "char", progress=False)
    return out


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory) -> Path:
    """Three plays, byte-level BPE of 512 ids with <mask>, <pad> and T5 sentinels."""
    from lmforge.data import prepare

    d = tmp_path_factory.mktemp("bpe")
    src = d / "plays"
    src.mkdir()
    for name in ("tragedies/macbeth.md", "tragedies/othello.md", "comedies/twelfth-night.md"):
        (src / Path(name).name).write_text((plays() / name).read_text(encoding="utf-8"), encoding="utf-8")
    prepare(src, d / "data", "bpe:512", progress=False)
    return d / "data"
