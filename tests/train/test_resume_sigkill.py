"""SIGKILL a run in the middle, start it again with --resume: same final loss as an uninterrupted
run, and the latest checkpoint is always a complete one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lmforge.checkpoints import load_model
from lmforge.train import list_checkpoints, read_metrics
from train_helpers import CHAR_RECIPE, REPO, TINY

pytestmark = pytest.mark.slow

# A checkpoint every other step, so the kill may well land in the middle of writing one.
ARGS = ["--max_iters=30", "--lr_decay_iters=30", "--eval_interval=10", "--eval_iters=4", "--log_interval=1",
        "--checkpoint_interval=2", "--keep_last=2", "--dropout=0.1"]  # fmt: skip


def command(data, out, *extra, resume=False):
    return [sys.executable, "-m", "lmforge.cli", "pretrain", str(CHAR_RECIPE), "--data", str(data), "--out", str(out),
            *TINY, *ARGS, *extra] + (["--resume"] if resume else [])  # fmt: skip


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(cmd):
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def logged_steps(out):
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return max(steps, default=0)


def test_sigkill_then_resume_matches_an_uninterrupted_run(char_data, tmp_path):
    run(command(char_data, tmp_path / "whole", "--checkpoint_interval=0"))  # checkpoints change nothing

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(char_data, killed), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while logged_steps(killed) < 15:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    ckpts = list_checkpoints(killed)
    assert ckpts and int(ckpts[-1].name.split("-")[1]) < 30
    for ckpt in ckpts:  # whatever the kill interrupted, every listed checkpoint is whole
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["step"] == int(ckpt.name.split("-")[1])
        assert (ckpt / "optimizer" / ".metadata").is_file()
        load_model(ckpt)

    run(command(char_data, killed, resume=True))
    whole, resumed = read_metrics(tmp_path / "whole"), read_metrics(killed)
    final = lambda recs: [r["val_loss"] for r in recs if "val_loss" in r][-1]  # noqa: E731
    assert abs(final(resumed) - final(whole)) < 1e-5
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("tok_s", "elapsed_s")} for r in recs]  # noqa: E731
    assert strip(resumed) == strip(whole)
