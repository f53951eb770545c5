"""The alignment runs' ``strategy`` (ddp | fsdp): validated in one sentence, ignored by a process
alone, and under FSDP every process runs as many micro-batches as the largest share needs (the
padding ones marked so they count for nothing)."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.align.dpo import DPOConfig
from lmforge.align.rl_common import DataParallel, load_config, micro_batches
from lmforge.align.rm import RMConfig
from lmforge.cli import main
from lmforge.config import ConfigError
from lmforge.train.distributed import DistContext
from rl_helpers import tiny_model_dir, word_pairs, write_jsonl


def test_strategy_is_validated_in_one_sentence():
    assert RMConfig().strategy == "ddp"
    assert load_config(DPOConfig, None, ["--strategy=fsdp"]).strategy == "fsdp"
    with pytest.raises(ConfigError) as e:
        DPOConfig(strategy="zero3")
    assert str(e.value) == "strategy='zero3' is not supported; choose ddp or fsdp (it matters only under torchrun)."
    with pytest.raises(ConfigError, match="strategy='FSDP' is not supported"):
        DataParallel("FSDP")


def test_the_cli_refuses_a_bad_strategy_before_writing(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", word_pairs(4))
    recipe = tmp_path / "rm.yaml"
    recipe.write_text(f"model: {json.dumps(str(tiny_model_dir('llama')))}\nprogress: false\n")
    assert main(["rm", str(recipe), "--data", str(data), "--out", str(tmp_path / "out"), "--strategy=zero"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "strategy='zero' is not supported; choose ddp or fsdp" in err
    assert not (tmp_path / "out").exists()


def test_alone_fsdp_changes_nothing():
    model = torch.nn.Linear(2, 2)
    with DataParallel("fsdp") as dp:
        assert not dp.fsdp and dp.main
        assert dp.prepare(model) is model and dp.full_copy(model) is model
        assert micro_batches(list(range(5)), 2, dp) == [([0, 1], True), ([2, 3], True), ([4], True)]
    assert micro_batches(list(range(3)), 2) == [([0, 1], True), ([2], True)]


def _rank(rank: int, strategy: str) -> DataParallel:
    """A DataParallel as process ``rank`` of two sees itself (no process group needed for sharding)."""
    dp = DataParallel(strategy)
    dp.ctx = DistContext(rank=rank, world_size=2, strategy=strategy)
    dp.fsdp = strategy == "fsdp"
    return dp


def test_fsdp_pads_the_smaller_share_with_uncounted_micro_batches():
    items = list(range(5))  # rank 0: 0, 2, 4 (two micro-batches of 2); rank 1: 1, 3 (one)
    assert micro_batches(items, 2, _rank(0, "fsdp")) == [([0, 2], True), ([4], True)]
    assert micro_batches(items, 2, _rank(1, "fsdp")) == [([1, 3], True), ([0], False)]
    assert micro_batches(items, 2, _rank(1, "ddp")) == [([1, 3], True)]  # DDP needs no lockstep
    # fewer examples than processes: the one left without any still runs a (padding) forward
    assert micro_batches([7], 4, _rank(1, "fsdp")) == [([7], False)]
    assert micro_batches([7], 4, _rank(1, "ddp")) == []
    assert micro_batches([], 4, _rank(1, "fsdp")) == []
