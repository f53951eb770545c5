"""The pretraining loop on tiny models: outputs, accumulation, exact resume, atomic checkpoints, errors."""

import copy
import json
import shutil

import pytest
import torch

from lmforge.checkpoints import load_model
from lmforge.cli import main
from lmforge.train import latest_checkpoint, list_checkpoints, load_recipe, lr_at, param_groups, pretrain, read_metrics
from lmforge.train.distributed import DistContext
from lmforge.train.trainer import Trainer, compute_loss
from train_helpers import CHAR_RECIPE, TINY


def recipe(*overrides):
    return load_recipe(CHAR_RECIPE, [*TINY, *overrides])


def test_short_run_writes_metrics_plot_checkpoints_and_model(tmp_path, char_corpus):
    r = recipe("--max_iters=30", "--eval_interval=10", "--eval_iters=4", "--log_interval=5", "--keep_last=2")
    res = pretrain(r.train, r.model, char_corpus, tmp_path / "run")  # a raw .txt: prepared on the fly
    out = tmp_path / "run"
    assert (out / "data" / "meta.json").is_file()
    records = read_metrics(out)
    assert all("step" in rec for rec in records)
    evals = [rec for rec in records if "val_loss" in rec]
    logs = [rec for rec in records if "loss" in rec]
    assert [e["step"] for e in evals] == [0, 10, 20, 30] and [x["step"] for x in logs] == [5, 10, 15, 20, 25, 30]
    assert all(x["tok_s"] > 0 and x["lr"] > 0 for x in logs)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    assert evals[-1]["val_ppl"] == pytest.approx(torch.tensor(evals[-1]["val_loss"]).exp().item(), rel=1e-5)
    assert res.final_val_loss == evals[-1]["val_loss"] and res.steps == 30
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in list_checkpoints(out)] == ["step-00000020", "step-00000030"]  # keep_last=2
    ckpt = latest_checkpoint(out)
    assert (ckpt / "optimizer" / ".metadata").is_file() and json.loads((ckpt / "trainer_state.json").read_text())["step"] == 30
    final, saved = load_model(out), load_model(ckpt)  # the run directory is itself a HF directory
    x = torch.randint(0, final.config.vocab_size, (2, 16))
    assert torch.equal(final(x), saved(x))
    assert not list(out.glob(".tmp*")) and not list((out / "checkpoints").glob(".tmp*"))


def test_gradient_accumulation_is_the_mean_of_micro_batches(tmp_path, char_data):
    r = recipe("--max_iters=1", "--batch_size=4", "--gradient_accumulation_steps=2", "--eval_iters=0")
    t = Trainer(r.train, r.model, char_data, tmp_path / "run", DistContext())
    ref = copy.deepcopy(t.raw)
    b0, b1 = t.train_batch(0), t.train_batch(1)  # micro-batches 0 and 1 of update 0
    t.train_step()
    loss = (compute_loss(ref, b0) + compute_loss(ref, b1)) / 2
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), r.train.grad_clip)
    opt = torch.optim.AdamW(param_groups(ref, r.train.weight_decay), lr=lr_at(0, r.train), betas=(r.train.beta1, r.train.beta2))
    opt.step()
    for (name, p), q in zip(t.raw.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(t.raw.parameters(), build_fresh(t).parameters()))


def build_fresh(trainer):
    from lmforge.models import build_model

    torch.manual_seed(trainer.cfg.seed)
    return build_model(trainer.model_config)


def test_resume_continues_exactly(tmp_path, char_data):
    common = ["--max_iters=16", "--lr_decay_iters=16", "--eval_interval=4", "--eval_iters=2", "--log_interval=1",
              "--checkpoint_interval=4", "--dropout=0.1", "--keep_last=5"]  # fmt: skip
    r = recipe(*common)
    full = pretrain(r.train, r.model, char_data, tmp_path / "full")
    pretrain(r.train, r.model, char_data, tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000016")  # as if killed after step 12's checkpoint
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000012")
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "loss": 9.9}\n{"step": 14, "lo')  # lines the killed run wrote after its checkpoint
    resumed = pretrain(r.train, r.model, char_data, tmp_path / "cut", resume=True)
    assert resumed.final_val_loss == full.final_val_loss
    assert strip_timing(read_metrics(tmp_path / "cut")) == strip_timing(read_metrics(tmp_path / "full"))


def strip_timing(records):
    return [{k: v for k, v in r.items() if k not in ("tok_s", "elapsed_s")} for r in records]


def test_a_failed_checkpoint_never_becomes_the_latest(tmp_path, char_data, monkeypatch):
    import lmforge.checkpoints as ckpts

    r = recipe("--max_iters=8", "--checkpoint_interval=4", "--eval_iters=0")
    real = ckpts.save_pretrained
    calls = []

    def flaky(model, out_dir, tokenizer=None):
        calls.append(out_dir)
        real(model, out_dir, tokenizer=tokenizer)
        if len(calls) == 2:
            raise OSError("disk full")  # the crash comes after the weights are on disk

    monkeypatch.setattr(ckpts, "save_pretrained", flaky)
    with pytest.raises(OSError, match="disk full"):
        pretrain(r.train, r.model, char_data, tmp_path / "run")
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000004"]
    assert (tmp_path / "run" / "checkpoints" / ".tmp-step-00000008").is_dir()  # the partial one is not listed
    monkeypatch.setattr(ckpts, "save_pretrained", real)
    res = pretrain(r.train, r.model, char_data, tmp_path / "run", resume=True)
    assert res.steps == 8 and [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000004", "step-00000008"]


def test_sample_prints_text_from_a_run(tmp_path, char_data, capsys):
    r = recipe("--max_iters=5", "--eval_iters=0")
    pretrain(r.train, r.model, char_data, tmp_path / "run")
    assert main(["sample", str(tmp_path / "run"), "-n", "2", "--max-new-tokens", "20", "-p", "KING"]) == 0
    texts = capsys.readouterr().out.split("\n---------------\n")
    assert len(texts) == 2 and all(t.startswith("KING") and len(t) > 10 for t in texts)


BAD = [
    ("empty corpus", ["--data", "{empty}"], "is empty"),
    ("invalid utf-8", ["--data", "{latin1}"], "latin1.txt is not valid UTF-8 at byte offset 3"),
    ("n_embd % n_head", ["--n_head=3"], "n_embd=32 is not divisible by n_head=3"),
    ("block above context", ["--block_size=64"], "block_size=64 is above the model's context of 32 tokens"),
    ("vocab too small", ["--vocab_size=10"], "the tokenizer has .* tokens but the model's vocabulary has 10"),
    ("unknown key", ["--max_iter=5"], "unknown config key 'max_iter'; did you mean max_iters"),
    ("objective vs arch", ["--objective=span"], "objective=span needs arch=encoder-decoder but the model config has arch=decoder"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_sentence(tmp_path, char_corpus, capsys, case):
    _, args, message = case
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    args = [a.format(empty=tmp_path / "empty.txt", latin1=tmp_path / "latin1.txt") for a in args]
    if "--data" not in args:
        args = ["--data", str(char_corpus), *args]
    rc = main(["pretrain", str(CHAR_RECIPE), "--out", str(tmp_path / "run"), *TINY, "--max_iters=2", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("lmforge pretrain: error: ") and "\n" not in err and "Traceback" not in err
    import re

    assert re.search(message, err), err


def test_an_existing_run_needs_resume(tmp_path, char_data, capsys):
    r = recipe("--max_iters=2", "--eval_iters=0")
    pretrain(r.train, r.model, char_data, tmp_path / "run")
    rc = main(["pretrain", str(CHAR_RECIPE), "--data", str(char_data), "--out", str(tmp_path / "run"), *TINY])
    assert rc == 2 and "pass --resume" in capsys.readouterr().err


def step_losses(run):
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def test_activation_checkpointing_and_bf16_autocast(tmp_path, char_data):
    base = ["--max_iters=6", "--log_interval=1", "--eval_interval=0", "--eval_iters=2"]
    runs = {}
    for name, extra in [("plain", []), ("ckpt", ["--activation_checkpointing=true"]), ("bf16", ["--dtype=bfloat16"])]:
        r = recipe(*base, *extra)
        pretrain(r.train, r.model, char_data, tmp_path / name)
        runs[name] = step_losses(tmp_path / name)
    assert runs["ckpt"] == runs["plain"]  # recomputing activations changes nothing
    assert runs["bf16"] != runs["plain"] and max(abs(a - b) for a, b in zip(runs["bf16"], runs["plain"])) < 2e-2


@pytest.mark.slow
def test_torch_compile_trains_the_same(tmp_path, char_data):
    base = ["--max_iters=3", "--log_interval=1", "--eval_interval=0", "--eval_iters=1"]
    for name, extra in [("eager", []), ("compiled", ["--compile=true"])]:
        r = recipe(*base, *extra)
        pretrain(r.train, r.model, char_data, tmp_path / name)
    assert step_losses(tmp_path / "compiled") == pytest.approx(step_losses(tmp_path / "eager"), abs=1e-4)


def test_metrics_go_to_tensorboard_when_installed(tmp_path, char_data, monkeypatch):
    import sys
    import types

    scalars = []

    class SummaryWriter:  # stands in for tensorboard's, which is optional
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append(("closed", None, None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    r = recipe("--max_iters=4", "--log_interval=2", "--eval_interval=4", "--eval_iters=1", "--tensorboard=true")
    pretrain(r.train, r.model, char_data, tmp_path / "run")
    assert ("loss", step_losses(tmp_path / "run")[0], 2) in scalars
    assert {t for t, _, s in scalars if s == 4} >= {"loss", "lr", "tok_s", "val_loss", "val_ppl"}
    assert scalars[-1][0] == "closed"
