"""Fixtures of the serving tests: SmolLM2's tokenizer (read once from the bundled GGUF) and a tiny
random decoder of the same vocabulary, so engine and server tests run in seconds."""

import pytest
from serve_helpers import tiny_model

from lmforge.checkpoints import default_model_path
from lmforge.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="session")
def tiny():
    return tiny_model()
