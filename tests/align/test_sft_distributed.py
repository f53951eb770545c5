"""`lmforge sft` under torchrun (gloo, 2 processes, DDP) follows one process within 1e-4 over 10 steps."""

import os
import socket
import subprocess
import sys

import pytest

from lmforge.align.sft import load_sft_recipe, sft
from lmforge.train import read_metrics
from sft_helpers import FAST, REPO, arithmetic_chats, make_tiny_chat_model, sft_recipe, write_jsonl  # noqa: F401

pytestmark = pytest.mark.slow

STEPS = dict(max_iters=10, lr_decay_iters=10, batch_size=2, gradient_accumulation_steps=2, eval_interval=5, eval_iters=3,
             checkpoint_interval=5, learning_rate=5e-3)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_two_processes_follow_one(tmp_path, finetune):
    model = make_tiny_chat_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_chats(40))
    recipe = sft_recipe(tmp_path, model, finetune=finetune, **STEPS)
    sft(load_sft_recipe(recipe, FAST), data, tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "lmforge.cli", "sft", str(recipe), "--data", str(data),
           "--out", str(tmp_path / "two"), "--strategy=ddp", *FAST]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4, (a, b)
    va = [r["val_loss"] for r in read_metrics(tmp_path / "one") if "val_loss" in r]
    vb = [r["val_loss"] for r in read_metrics(tmp_path / "two") if "val_loss" in r]
    assert len(va) == len(vb) == 3 and max(abs(x - y) for x, y in zip(va, vb)) < 1e-4
    assert (tmp_path / "two" / "checkpoints" / "step-00000010" / "rng-rank1.pt").is_file()
