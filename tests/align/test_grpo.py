"""GRPO end to end on a tiny character model: group-normalised advantages raise a verifiable
reward on held-out prompts; config errors are one sentence."""

from __future__ import annotations

import json

import pytest

from lmforge.align.grpo import GRPOConfig, train_grpo
from lmforge.config import ConfigError
from rl_helpers import char_model_dir, char_prompts, write_jsonl


def test_grpo_raises_held_out_reward(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", char_prompts(64))
    cfg = GRPOConfig(model=str(char_model_dir()), reward="rl_helpers:vowel_share", batch_size=4, num_generations=8,
                     micro_batch_size=32, max_new_tokens=8, learning_rate=1e-2, beta=0.01, num_iterations=2,
                     eval_fraction=0.25, eval_prompts=32, eval_interval=0, checkpoint_interval=0, max_steps=10,
                     progress=False, max_length=32)  # fmt: skip
    result = train_grpo(cfg, data, tmp_path / "run")
    before, after = result.first_eval["eval_reward"], result.last_eval["eval_reward"]
    assert after > before + 0.15, (before, after)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["groups_with_signal"] > 0 for r in records[1:])
    assert records[-1]["kl"] > 0 and (tmp_path / "run" / "curves.png").is_file()


def test_grpo_config_errors():
    with pytest.raises(ConfigError, match="num_generations must be at least 2"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ConfigError, match="scale_rewards"):
        GRPOConfig(scale_rewards="median")
