"""DPO / IPO / hinge training: the loss falls and the margin grows on held-out pairs, the frozen
reference stays put, metrics and curves are written, resume is exact, bad input writes nothing."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.align.dpo import DPOConfig, train_dpo
from lmforge.checkpoints import load_model
from lmforge.config import ConfigError
from lmforge.errors import UserError
from rl_helpers import tiny_model_dir, word_pairs, write_jsonl


def _common(**kw):
    return dict(model=str(tiny_model_dir("llama")), batch_size=8, micro_batch_size=4, learning_rate=3e-3, beta=0.5,
                eval_fraction=0.25, eval_interval=0, checkpoint_interval=3, progress=False, max_length=64) | kw  # fmt: skip


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_improves_held_out_margin(tmp_path, loss_type):
    data = write_jsonl(tmp_path / "pairs.jsonl", word_pairs(64))
    result = train_dpo(DPOConfig(max_steps=6, loss_type=loss_type, **_common()), data, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first batch sees the reference itself
    assert records[-1]["kl"] > 0
    assert result.eval["eval_margin"] > 0.05 and result.eval["eval_accuracy"] >= 0.8, result.eval
    assert {"loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "kl"} <= set(records[-1])
    assert (tmp_path / "run" / "curves.png").is_file()
    load_model(result.model_dir)  # the final policy is an ordinary checkpoint


def test_dpo_resume_is_exact(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", word_pairs(32))
    full = train_dpo(DPOConfig(max_steps=4, **_common(eval_fraction=0.0, checkpoint_interval=2)), data, tmp_path / "a")
    train_dpo(DPOConfig(max_steps=2, **_common(eval_fraction=0.0, checkpoint_interval=2)), data, tmp_path / "b")
    resumed = train_dpo(DPOConfig(max_steps=4, **_common(eval_fraction=0.0, checkpoint_interval=2)), data, tmp_path / "b", resume=True)
    a, b = load_model(full.model_dir), load_model(resumed.model_dir)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_dpo_bad_input(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x "}])
    with pytest.raises(UserError, match=r"pairs\.jsonl:1: chosen and rejected are the same"):
        train_dpo(DPOConfig(**_common()), data, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="loss_type='kto'.*sigmoid, ipo, hinge"):
        DPOConfig(loss_type="kto")
    with pytest.raises(UserError, match="does not exist"):
        train_dpo(DPOConfig(**_common()), tmp_path / "missing.jsonl", tmp_path / "out")
