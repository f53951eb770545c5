"""`lmforge dpo` and `lmforge rm` under torchrun (gloo, 2 processes) follow one process within 1e-4
over 10 steps, with strategy=ddp (full replicas, gradients all-reduced) and strategy=fsdp (FSDP2
shards): the same losses and held-out numbers at every step, the same final weights, one run
directory written by rank 0. Under FSDP a run resumed from its step-5 checkpoint ends where the
uninterrupted one does, train_layers keeps the lower block (and the tied embedding) fixed, and
``DataParallel.full_copy`` hands every process a plain module with the current full weights that
generates as the unsharded model does (and ``sync_grads`` still sums a replicated module's gradients
next to a sharded one)."""

import json
import shutil

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from lmforge.align.dpo import DPOConfig, train_dpo
from lmforge.align.rm import RMConfig, load_reward_model, train_reward_model
from lmforge.checkpoints import load_model
from lmforge.train import read_metrics
from rl_helpers import assert_metrics_match, tiny_model_dir, torchrun_cli, word_pairs, write_jsonl, write_recipe

pytestmark = pytest.mark.slow

# 5 pairs a batch: 3 on rank 0 and 2 on rank 1 (an uneven split), micro-batches of 2 (so under FSDP
# rank 1 runs a padding micro-batch to keep in step with rank 0's two).
COMMON = dict(batch_size=5, micro_batch_size=2, learning_rate=3e-3, eval_fraction=0.25, eval_interval=5,
              checkpoint_interval=5, max_steps=10, max_length=64, progress=False)  # fmt: skip
DPO_KEYS = ["loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "kl", "eval_loss", "eval_accuracy", "eval_margin"]
RM_KEYS = ["loss", "accuracy", "margin", "eval_loss", "eval_accuracy", "eval_margin"]


def recipe(verb: str, **extra) -> dict:
    if verb == "dpo":
        return dict(model=str(tiny_model_dir("llama")), beta=0.5, **COMMON, **extra)
    # lr 1e-3: at 3e-3 Adam turns the reduction-order noise of near-zero gradients into 1e-4 by step 8
    return dict(model=str(tiny_model_dir("llama")), **{**COMMON, "learning_rate": 1e-3}, **extra)


def torchrun(verb: str, keys: dict, data, out, *extra: str) -> None:
    proc = torchrun_cli([verb, write_recipe(out.parent / f"{out.name}.yaml", keys), "--data", data, "--out", out, *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(verb, strategy, **keys)``: a finished run directory, made once per module; strategy
    None is one process, else two under torchrun."""
    root = tmp_path_factory.mktemp("runs")
    data = write_jsonl(root / "pairs.jsonl", word_pairs(48))
    made = {}

    def get(verb: str, strategy: str | None, **extra):
        key = (verb, strategy, tuple(sorted(extra.items())))
        if key not in made:
            out = root / f"{verb}-{strategy or 'one'}-{len(made)}"
            keys = recipe(verb, **extra)
            if strategy is None:
                (train_dpo if verb == "dpo" else train_reward_model)((DPOConfig if verb == "dpo" else RMConfig)(**keys), data, out)
            else:
                torchrun(verb, {**keys, "strategy": strategy}, data, out)
            made[key] = out
        return made[key]

    get.data = data
    return get


def assert_same_run(one, two, keys):
    a, b = read_metrics(one), read_metrics(two)
    assert_metrics_match(a, b, keys, list(range(1, 11)))
    assert sum("eval_accuracy" in r for r in b) == 2
    assert (two / "curves.png").is_file() and (two / "checkpoints" / "step-00000010").is_dir()


def final_weights(verb: str, run) -> dict:
    if verb == "dpo":
        return load_model(run / "final").state_dict()
    return load_reward_model(run / "final").state_dict()


def assert_close_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0, msg=k)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("verb", ["dpo", "rm"])
def test_two_processes_follow_one(verb, strategy, runs):
    one, two = runs(verb, None), runs(verb, strategy)
    assert_same_run(one, two, DPO_KEYS if verb == "dpo" else RM_KEYS)
    assert_close_weights(final_weights(verb, one), final_weights(verb, two))
    assert not any(p.name.startswith(".tmp") for p in (two / "checkpoints").iterdir())
    # the optimizer state: under FSDP each process wrote its half of a matrix, under DDP it is whole
    meta = FileSystemReader(str(two / "checkpoints" / "step-00000010" / "optimizer")).read_metadata()
    name = f"optimizer.state.{'policy' if verb == 'dpo' else 'rm.backbone'}.embed.tok.weight.exp_avg"
    assert [c.sizes[0] for c in meta.state_dict_metadata[name].chunks] == ([24576, 24576] if strategy == "fsdp" else [49152])


@pytest.mark.parametrize("verb", ["dpo", "rm"])
def test_fsdp_resumes_from_step_5(verb, runs, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(runs(verb, "fsdp"), cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000010")
    shutil.rmtree(cut / "final")
    torchrun(verb, {**recipe(verb), "strategy": "fsdp"}, runs.data, cut, "--resume")
    assert_same_run(runs(verb, None), cut, DPO_KEYS if verb == "dpo" else RM_KEYS)
    assert_close_weights(final_weights(verb, runs(verb, None)), final_weights(verb, cut))


def test_fsdp_trains_only_the_last_layers(runs):
    one, two = runs("dpo", None, train_layers=1), runs("dpo", "fsdp", train_layers=1)
    assert_same_run(one, two, DPO_KEYS)
    start, a, b = (load_model(p).state_dict() for p in (tiny_model_dir("llama"), one / "final", two / "final"))
    assert_close_weights(a, b)
    for k in start:
        moved = not torch.equal(start[k], b[k])
        assert moved == (k.startswith(("stack.layers.1.", "stack.norm."))), k


FULL_COPY = r"""
import json, sys
import torch
from torch.distributed.tensor import DTensor
from lmforge.align.rl_common import AlignConfig, DataParallel, frozen_copy, load_policy
from lmforge.inference import complete

model, tok = load_policy(AlignConfig(model=sys.argv[1]))
out = sys.argv[2]
with DataParallel("fsdp") as dp:
    sharded = dp.prepare(model)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    with torch.no_grad():
        for p in sharded.parameters():
            p.mul_(1.5)  # the copy must hold the current weights, not those prepare saw
    full = dp.full_copy(sharded)
    with torch.no_grad():
        for p in sharded.parameters():
            p.zero_()  # and be independent of the sharded model afterwards
    # a replicated module next to the sharded one (a value head): sync_grads sums its gradients only
    head = torch.nn.Linear(2, 1, bias=False)
    head.weight.grad = torch.full((1, 2), dp.ctx.rank + 1.0)
    dp.sync_grads([head.weight, *sharded.parameters()])
    report = {
        "plain": not any(isinstance(p, DTensor) for p in full.parameters()),
        "eval": not full.training,
        "frozen": not any(p.requires_grad for p in full.parameters()),
        "tied": full.lm_head.weight is full.embed.tok.weight,
        "head_grad": head.weight.grad.tolist(),
        "shard_grads": [p.grad for p in sharded.parameters()].count(None),
        "tokens": list(complete(full, tok, "Describe the king.", max_new_tokens=8, temperature=0, ignore_eos=True).token_ids),
    }
    torch.save(full.state_dict(), f"{out}/rank{dp.ctx.rank}.pt")
    with open(f"{out}/rank{dp.ctx.rank}.json", "w") as f:
        json.dump(report, f)
"""


def test_full_copy_gives_every_process_the_full_weights(tmp_path):
    from lmforge.align.rl_common import AlignConfig, DataParallel, load_policy
    from lmforge.inference import complete

    script = tmp_path / "full_copy.py"
    script.write_text(FULL_COPY)
    model_dir = tiny_model_dir("llama")
    proc = torchrun_cli([script, model_dir, tmp_path], module=None)
    assert proc.returncode == 0, proc.stderr[-3000:]

    expected, tok = load_policy(AlignConfig(model=str(model_dir)))
    with torch.no_grad():
        for p in expected.parameters():
            p.mul_(1.5)
    tokens = list(complete(expected, tok, "Describe the king.", max_new_tokens=8, temperature=0, ignore_eos=True).token_ids)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        n = len(list(expected.parameters()))
        assert report == {"plain": True, "eval": True, "frozen": True, "tied": True, "head_grad": [[3.0, 3.0]],
                          "shard_grads": n, "tokens": tokens}, rank  # fmt: skip
        got, want = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True), expected.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), rank
    # alone (and under DDP) there is nothing to gather: the model itself
    with DataParallel("fsdp") as dp:
        assert dp.full_copy(expected) is expected and dp.prepare(expected) is expected
