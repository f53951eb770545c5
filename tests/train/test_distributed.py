"""torchrun on the CPU (gloo, 2 processes): DDP and FSDP2 follow single-process training, and a
sharded checkpoint resumes on a different number of processes."""

import os
import shutil
import socket
import subprocess
import sys

import pytest

from lmforge.train import load_recipe, pretrain, read_metrics
from train_helpers import CHAR_RECIPE, REPO, TINY

pytestmark = pytest.mark.slow

STEPS = ["--batch_size=4", "--gradient_accumulation_steps=2", "--max_iters=20", "--lr_decay_iters=20", "--log_interval=1",
         "--eval_interval=0", "--eval_iters=2", "--checkpoint_interval=10", "--learning_rate=3e-3"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(data, out, *extra, nproc=2, resume=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "lmforge.cli", "pretrain", str(CHAR_RECIPE), "--data", str(data),
           "--out", str(out), *TINY, *STEPS, *extra] + (["--resume"] if resume else [])  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


@pytest.fixture(scope="module")
def single(char_data, tmp_path_factory):
    """The reference: one process, the same global batch (2 micro-batches of 4)."""
    out = tmp_path_factory.mktemp("single") / "run"
    r = load_recipe(CHAR_RECIPE, [*TINY, *STEPS])
    pretrain(r.train, r.model, char_data, out)
    return out


def assert_close(a, b, steps):
    assert sorted(a) == sorted(b) == list(steps), (sorted(a), sorted(b))
    worst = max(abs(a[s] - b[s]) for s in steps)
    assert worst < 1e-4, worst


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_follow_one(strategy, single, char_data, tmp_path):
    torchrun(char_data, tmp_path / "run", f"--strategy={strategy}")
    assert_close(losses(tmp_path / "run"), losses(single), range(1, 21))
    final = [r["val_loss"] for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    ref = [r["val_loss"] for r in read_metrics(single) if "val_loss" in r]
    assert abs(final[-1] - ref[-1]) < 1e-4
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000020"
    assert (ckpt / "rng-rank1.pt").is_file() and len(list((ckpt / "optimizer").glob("*.distcp"))) == 2


def test_sharded_checkpoint_resumes_on_another_process_count(single, char_data, tmp_path):
    # two FSDP processes save at step 10; one process continues to step 20
    torchrun(char_data, tmp_path / "fsdp", "--strategy=fsdp", "--max_iters=10")
    r = load_recipe(CHAR_RECIPE, [*TINY, *STEPS])
    pretrain(r.train, r.model, char_data, tmp_path / "fsdp", resume=True)
    assert_close(losses(tmp_path / "fsdp"), losses(single), range(1, 21))
    # one process's checkpoint at step 10, continued by two FSDP processes
    shutil.copytree(single, tmp_path / "one")
    shutil.rmtree(tmp_path / "one" / "checkpoints" / "step-00000020")
    torchrun(char_data, tmp_path / "one", "--strategy=fsdp", resume=True)
    assert_close(losses(tmp_path / "one"), losses(single), range(1, 21))
