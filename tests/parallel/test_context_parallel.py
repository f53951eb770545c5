"""The trainer with --context-parallel: the sequence split over torchrun processes trains like one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.parallel.context import ContextParallel
from lmforge.train import load_recipe, pretrain, read_metrics

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "nanogpt-shakespeare-char-cpu.yaml"
SHAKESPEARE = REPO / "../shared/data/tinyshakespeare.txt"
# a rope model, GQA, 64-token sequences, 10 updates of 2 micro-batches
ARGS = ["--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=32", "--d_ff=64", "--max_seq_len=64", "--block_size=64",
        "--batch_size=4", "--gradient_accumulation_steps=2", "--max_iters=10", "--lr_decay_iters=10", "--warmup_iters=2",
        "--log_interval=1", "--eval_interval=0", "--eval_iters=2", "--learning_rate=3e-3", "--progress=false",
        "--tensorboard=false"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    if not SHAKESPEARE.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt is not there")
    from lmforge.data import prepare

    d = tmp_path_factory.mktemp("cp")
    (d / "text.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    prepare(d / "text.txt", d / "data", "char", progress=False)
    return d / "data"


def _losses(run):
    rows = read_metrics(run)
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.mark.slow
def test_two_context_parallel_processes_follow_one(data, tmp_path):
    r = load_recipe(RECIPE, ARGS)
    pretrain(r.train, r.model, data, tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "lmforge.cli", "pretrain", str(RECIPE), "--data", str(data),
           "--out", str(tmp_path / "cp"), *ARGS, "--context-parallel", "2"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (one, one_val), (cp, cp_val) = _losses(tmp_path / "one"), _losses(tmp_path / "cp")
    assert sorted(one) == sorted(cp) == list(range(1, 11))
    worst = max(abs(one[s] - cp[s]) for s in one)
    assert worst < 1e-4, (worst, one, cp)
    assert abs(one_val[-1] - cp_val[-1]) < 1e-4
    assert one[10] < one[1] - 0.3  # it did train


def test_degree_that_does_not_divide_the_sequence_is_one_sentence():
    ctx = SimpleNamespace(world_size=2, rank=0, distributed=True)
    mc = ModelConfig.from_name("smollm2-135m", n_layer=1, n_embd=32, n_head=4, n_kv_head=2, d_ff=64, vocab_size=100, max_seq_len=64)
    with pytest.raises(UserError, match=r"^a sequence of 30 tokens cannot be split over context-parallel degree 2: it must be a multiple of 2 x 2 = 4"):
        ContextParallel.setup(2, ctx, mc, 30, "causal", "ddp")
    with pytest.raises(UserError, match="needs a multiple of 4 processes but 2 were started"):
        ContextParallel.setup(4, ctx, mc, 64, "causal", "ddp")
    with pytest.raises(UserError, match="causal objective"):
        ContextParallel.setup(2, ctx, mc, 64, "mlm", "ddp")


def test_cli_without_torchrun_says_how_to_launch(tmp_path, capsys):
    from lmforge.cli import main

    (tmp_path / "t.txt").write_text("hello world " * 200)
    code = main(["pretrain", str(RECIPE), "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "run"), *ARGS,
                 "--context-parallel", "2"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lmforge pretrain: error: context_parallel=2 needs a multiple of 2 processes but 1 were started; "
                   "launch with torchrun --nproc_per_node 2 (or a multiple)."]  # fmt: skip
