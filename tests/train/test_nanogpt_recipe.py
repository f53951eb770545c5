"""nanoGPT's CPU recipe end to end: character-level Shakespeare to a validation loss of at most 1.88."""

import json

import pytest

from lmforge.cli import main
from lmforge.train import read_metrics
from train_helpers import CHAR_RECIPE, SHAKESPEARE

pytestmark = pytest.mark.slow


def test_shakespeare_char_reaches_nanogpts_loss(tmp_path):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent (the shared tinyshakespeare corpus)")
    out = tmp_path / "run"
    assert main(["pretrain", str(CHAR_RECIPE), "--data", str(SHAKESPEARE), "--out", str(out), "--progress=false"]) == 0
    evals = [r for r in read_metrics(out) if "val_loss" in r]
    assert [e["step"] for e in evals] == list(range(0, 2001, 250))
    assert evals[-1]["val_loss"] <= 1.88, evals[-1]
    assert (out / "loss.png").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
