"""`lmforge ppo`, `lmforge grpo` and `lmforge cai` under torchrun (gloo, 2 processes) do what one
process does: each process samples and trains on its share of a batch (3 prompts on one, 2 on the
other), the whitening statistics / group rewards are taken over the whole batch and the gradients
summed, so the metrics at every step and the final weights match one process within 1e-4, with
DDP and with FSDP2 (the policy sharded, rollouts sampled from its gathered weights, the value head
replicated); CAI writes the same files. Rollouts are seeded per prompt, which is what makes the
shares independent."""

import pytest
import torch

from lmforge.align.cai import load_cai_recipe, run_cai
from lmforge.align.grpo import GRPOConfig, train_grpo
from lmforge.align.ppo import PPOConfig, train_ppo
from lmforge.align.tasks import cai_prompts
from lmforge.checkpoints import load_model
from lmforge.train import read_metrics
from rl_helpers import assert_metrics_match, char_model_dir, char_prompts, torchrun_cli, write_jsonl, write_recipe
from sft_helpers import REPO, make_tiny_chat_model

pytestmark = pytest.mark.slow

COMMON = dict(reward="rl_helpers:vowel_share", max_new_tokens=8, max_length=32, eval_fraction=0.25, eval_prompts=5,
              eval_interval=5, checkpoint_interval=5, max_steps=10, progress=False)  # fmt: skip


def run_both(verb, train, recipe, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", char_prompts(40))
    recipe = dict(model=str(char_model_dir()), **recipe)
    one = train(recipe, data, tmp_path / "one")
    proc = torchrun_cli([verb, write_recipe(tmp_path / f"{verb}.yaml", recipe), "--data", data, "--out", tmp_path / "two"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one, read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")


def assert_same(a, b, keys):
    assert_metrics_match(a, b, keys, list(range(0, 11)))  # step 0: the evaluation before training


def assert_same_weights(one, two):
    a, b = load_model(one).state_dict(), load_model(two).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0, msg=k)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ppo_two_processes_follow_one(tmp_path, strategy):
    # micro-batches of one completion: PPO's token means are per micro-batch, so equal micro-batches
    # are what makes the losses equal (3 + 2 rows per process, mini-batches of 3 cut across both)
    recipe = dict(COMMON, batch_size=5, micro_batch_size=1, mini_batch_size=3, ppo_epochs=2, learning_rate=3e-3,
                  kl_coef=0.05, kl_target=0.5, kl_horizon=100, whiten_rewards=True, strategy=strategy)  # fmt: skip
    one, a, b = run_both("ppo", lambda r, d, o: train_ppo(PPOConfig(**r), d, o), recipe, tmp_path)
    assert_same(a, b, ["score", "kl", "kl_coef", "length", "pg_loss", "vf_loss", "clip_fraction", "eval_reward", "eval_kl"])
    assert sum("eval_reward" in r for r in b) == 3 and a[-1]["score"] != a[1]["score"]
    assert (tmp_path / "two" / "curves.png").is_file() and (tmp_path / "two" / "checkpoints" / "step-00000010").is_dir()
    assert_same_weights(one.model_dir, tmp_path / "two" / "final")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_grpo_two_processes_follow_one(tmp_path, strategy):
    # scale_rewards=batch: every process needs the whole batch's rewards for the advantages
    recipe = dict(COMMON, batch_size=3, num_generations=4, micro_batch_size=4, learning_rate=3e-3, beta=0.04,
                  num_iterations=2, scale_rewards="batch", strategy=strategy)  # fmt: skip
    one, a, b = run_both("grpo", lambda r, d, o: train_grpo(GRPOConfig(**r), d, o), recipe, tmp_path)
    assert_same(a, b, ["reward", "reward_std", "groups_with_signal", "loss", "kl", "clip_fraction", "length",
                       "eval_reward", "eval_kl"])  # fmt: skip
    assert a[-1]["kl"] > 0
    assert_same_weights(one.model_dir, tmp_path / "two" / "final")


def test_ppo_batch_smaller_than_the_processes_is_refused(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", char_prompts(8))
    recipe = write_recipe(tmp_path / "ppo.yaml", dict(model=str(char_model_dir()), **COMMON, batch_size=1))
    proc = torchrun_cli(["ppo", recipe, "--data", data, "--out", tmp_path / "out"])
    assert proc.returncode != 0
    assert "batch_size=1 gives some of the 2 processes nothing; raise batch_size to at least 2" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cai_two_processes_write_what_one_writes(tmp_path):
    make_tiny_chat_model(tmp_path / "model", max_seq_len=1024)
    data = write_jsonl(tmp_path / "prompts.jsonl", cai_prompts(7, seed=1))
    recipe = REPO / "configs" / "align" / "cai-smollm2.yaml"
    args = [f"--model={tmp_path / 'model'}", "--max_new_tokens=12", "--batch_size=2", "--progress=false"]
    run_cai(load_cai_recipe(recipe, args), data, tmp_path / "one")
    proc = torchrun_cli(["cai", recipe, "--data", data, "--out", tmp_path / "two", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("sft.jsonl", "preferences.jsonl", "cai_summary.json"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text(), name
    assert proc.stdout.count('"prompts": 7') == 1  # the summary is printed once
