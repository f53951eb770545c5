"""Shared fixtures: the bundled SmolLM2-135M (fp32, GGUF dequantized) in lmforge and in transformers,
and the shared test text (``../shared/data`` beside the repository; skipped where absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_text():
    """``shared_text(name)``: the text of ``../shared/data/name`` (the test is skipped where it is absent)."""

    def read(name: str) -> str:
        path = DATA / name
        if not path.is_file():
            pytest.skip(f"{path} is not here (test data lives in ../shared/data)")
        return path.read_text(encoding="utf-8")

    return read


@pytest.fixture(scope="session")
def smollm():
    """(lmforge model, tokenizer): the bundled SmolLM2-135M-Instruct, dequantized to fp32."""
    from lmforge.checkpoints import default_model_path, load_model
    from lmforge.tokenizer import load_tokenizer

    try:
        path = default_model_path()
    except Exception as e:  # noqa: BLE001 - not installed: skip, as the checkpoint tests do
        pytest.skip(str(e))
    return load_model(path, dtype=torch.float32, quantize="none"), load_tokenizer(path)


@pytest.fixture(scope="session")
def hf_smollm():
    """The same GGUF file loaded (and dequantized) by transformers' own GGUF reader: LlamaForCausalLM."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lmforge.checkpoints import default_model_path

    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


