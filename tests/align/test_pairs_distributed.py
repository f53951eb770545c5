"""`lmforge dpo` and `lmforge rm` under torchrun (gloo, 2 processes) follow one process within 1e-4
over 10 steps: the same losses and held-out numbers at every step, the same final weights, one run
directory written by rank 0. PPO and GRPO refuse torchrun in one sentence."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from lmforge.align.dpo import DPOConfig, train_dpo
from lmforge.align.rm import RMConfig, load_reward_model, train_reward_model
from lmforge.checkpoints import load_model
from lmforge.train import read_metrics
from rl_helpers import tiny_model_dir, word_pairs, write_jsonl

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# 5 pairs a batch: 3 on rank 0 and 2 on rank 1 (an uneven split), micro-batches of 2.
COMMON = dict(batch_size=5, micro_batch_size=2, learning_rate=3e-3, eval_fraction=0.25, eval_interval=5,
              checkpoint_interval=5, max_steps=10, max_length=64, progress=False)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(verb: str, recipe: dict, data, out, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / f"{verb}.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in recipe.items()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "lmforge.cli", verb, str(path), "--data", str(data), "--out", str(out)]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)


def assert_same_run(one, two, keys):
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 11))
    for ra, rb in zip(a, b):
        for k in keys:
            assert (k in ra) == (k in rb), k
            if k in ra:
                assert abs(ra[k] - rb[k]) < 1e-4, (ra["step"], k, ra[k], rb[k])
    assert sum("eval_accuracy" in r for r in b) == 2
    assert (two / "curves.png").is_file() and (two / "checkpoints" / "step-00000010").is_dir()


def assert_close_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0, msg=k)


def test_dpo_two_processes_follow_one(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", word_pairs(48))
    recipe = dict(model=str(tiny_model_dir("llama")), beta=0.5, **COMMON)
    train_dpo(DPOConfig(**recipe), data, tmp_path / "one")
    proc = torchrun("dpo", recipe, data, tmp_path / "two", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two",
                    ["loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "kl", "eval_loss", "eval_accuracy", "eval_margin"])  # fmt: skip
    assert_close_weights(load_model(tmp_path / "one" / "final").state_dict(), load_model(tmp_path / "two" / "final").state_dict())


def test_reward_model_two_processes_follow_one(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", word_pairs(48))
    # lr 1e-3: at 3e-3 Adam turns the reduction-order noise of near-zero gradients into 1e-4 by step 8
    recipe = dict(model=str(tiny_model_dir("llama")), **{**COMMON, "learning_rate": 1e-3})
    train_reward_model(RMConfig(**recipe), data, tmp_path / "one")
    proc = torchrun("rm", recipe, data, tmp_path / "two", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two", ["loss", "accuracy", "margin", "eval_loss", "eval_accuracy", "eval_margin"])
    a, b = load_reward_model(tmp_path / "one" / "final"), load_reward_model(tmp_path / "two" / "final")
    assert_close_weights(a.state_dict(), b.state_dict())


def test_ppo_refuses_torchrun(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say hi."}] * 4)
    proc = torchrun("ppo", dict(model=str(tiny_model_dir("llama")), reward="lmforge.align.rl_tasks:vader_reward", max_steps=1),
                    data, tmp_path / "out", tmp_path)  # fmt: skip
    assert proc.returncode != 0
    assert "ppo runs in one process: launch it without torchrun" in proc.stderr
    assert not (tmp_path / "out").exists()
