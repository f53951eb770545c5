"""Scaling laws: the Chinchilla fit, the compute-optimal frontier, the budget check, a tiny sweep end to end."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.eval.scaling import compute_optimal, fit_law, load_plan, predict, sweep, undetermined
from lmforge.errors import UserError

TRUE = {"E": 1.6, "A": 40.0, "alpha": 0.35, "B": 600.0, "beta": 0.5}
N_GRID, D_GRID = [1e4, 5e4, 1e5, 2.3e5], [8e4, 1.6e5, 3.2e5, 6.4e5]

pytestmark = pytest.mark.usefixtures("one_thread")


def grid():
    N, D = np.meshgrid(N_GRID, D_GRID)
    return N.ravel(), D.ravel()


def test_fit_recovers_a_known_law_and_extrapolates():
    N, D = grid()
    rng = np.random.default_rng(0)
    L = predict(TRUE, N, D) * (1 + 0.002 * rng.standard_normal(N.size))  # 0.2% measurement noise
    starts = np.array(list(itertools.product([0.0, 8.0], [0.2, 0.6], [0.0, 8.0], [0.2, 0.6], [0.5])))  # none is the truth
    p = fit_law(N, D, L, starts=starts)  # 16 of the default 72 starting points: faster, still enough here
    for n, d in [(6e5, 6.4e5), (2.3e5, 1.3e6), (6e5, 1.3e6)]:  # larger than anything fitted
        assert predict(p, n, d) == pytest.approx(predict(TRUE, n, d), rel=0.01)
    assert p["alpha"] == pytest.approx(TRUE["alpha"], rel=0.1) and p["beta"] == pytest.approx(TRUE["beta"], rel=0.1)
    assert undetermined(p, N, D) == []
    # a loss that ignores N entirely: nothing pins down A and alpha, and the fit says so
    flat = fit_law(N, D, 1.0 + 30.0 / D**0.3, starts=starts[:4])
    assert "A/N^alpha" in undetermined(flat, N, D)


def test_compute_optimal_allocation_minimises_the_loss_at_fixed_compute():
    for C in (1e12, 1e15):
        n_opt, d_opt = compute_optimal(TRUE, C)
        assert 6 * n_opt * d_opt == pytest.approx(C)
        ns = n_opt * np.geomspace(0.2, 5, 41)
        losses = predict(TRUE, ns, C / (6 * ns))
        assert losses.min() >= predict(TRUE, n_opt, d_opt) - 1e-12
    # N_opt grows as C^(beta / (alpha + beta))
    (n1, _), (n2, _) = compute_optimal(TRUE, 1e12), compute_optimal(TRUE, 1e14)
    assert np.log(n2 / n1) / np.log(100) == pytest.approx(TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]))


RECIPE = """model: {{preset: nanogpt-char, family: llama, position: rope, norm: rmsnorm, ffn: glu, activation: silu,
        qkv_bias: false, attn_out_bias: false, mlp_bias: false, norm_bias: false, max_seq_len: 32}}
tokenizer: char
block_size: 32
batch_size: 8
learning_rate: 3.0e-3
warmup_iters: 5
eval_iters: 4
log_interval: 5
device: cpu
scaling:
  budget_minutes: {budget}
  models: [{{n_layer: 1, n_embd: 16, n_head: 2}}, {{n_layer: 1, n_embd: 32, n_head: 2}}]
  tokens: {tokens}
  held_out: [{{model: {{n_layer: 2, n_embd: 32, n_head: 2}}, tokens: 5120}}]
"""


@pytest.fixture
def corpus(tmp_path):
    words = "to be or not that is the question whether tis nobler in the mind suffer slings arrows".split()
    rng = np.random.default_rng(0)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(3000)))
    return path


def test_plan_reads_the_grid(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE.format(budget=5, tokens="[2560, 5120]"))
    plan = load_plan(tmp_path / "r.yaml")
    assert [r.name for r in plan.runs] == ["L1-d16-D2560", "L1-d16-D5120", "L1-d32-D2560", "L1-d32-D5120", "L2-d32-D5120"]
    assert [r.held_out for r in plan.runs] == [False] * 4 + [True]
    assert plan.runs[0].model["d_ff"] == 48  # a GLU's hidden size follows n_embd
    (tmp_path / "bad.yaml").write_text("tokenizer: char\n")
    with pytest.raises(UserError, match="scaling: section"):
        load_plan(tmp_path / "bad.yaml")


def test_a_grid_over_budget_is_refused_saying_by_how_much(tmp_path, corpus, capsys):
    (tmp_path / "r.yaml").write_text(RECIPE.format(budget=0.01, tokens="[2560, 50000000]"))
    with pytest.raises(UserError, match=r"budget is 0.01 min, [\d.]+ min \([\d.]+x\) over"):
        sweep(tmp_path / "r.yaml", corpus, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "runs").exists()  # nothing trained
    code = main(["scaling", "sweep", str(tmp_path / "r.yaml"), "--data", str(corpus), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "over" in err and "\n" not in err


@pytest.mark.slow  # ~30 s: five tiny training runs, the fit and its bootstrap
def test_tiny_sweep_end_to_end(tmp_path, corpus):
    (tmp_path / "r.yaml").write_text(RECIPE.format(budget=5, tokens="[2560, 5120]"))
    out = tmp_path / "out"
    r = sweep(tmp_path / "r.yaml", corpus, out, bootstrap_samples=10, threads=1, progress=False)
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs) == 5 and all(x["loss"] > 0 and x["C"] == 6 * x["N"] * x["D"] for x in runs)
    assert {x["D"] for x in runs} == {2560, 5120} and len({x["N"] for x in runs}) == 3
    fit = json.loads((out / "fit.json").read_text())
    assert fit["fit_runs"] == 4 and set(fit["params"]) == {"E", "A", "alpha", "B", "beta"}
    (h,) = fit["held_out"]
    assert h["name"] == "L2-d32-D5120" and h["rel_error"] == pytest.approx((h["predicted"] - h["loss"]) / h["loss"])
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["held_out"] == fit["held_out"]
    # a rerun trains nothing new and refits the same runs
    again = sweep(tmp_path / "r.yaml", corpus, out, bootstrap_samples=10, threads=1, progress=False)
    assert json.loads((out / "runs.json").read_text()) == runs and again["params"] == pytest.approx(r["params"], rel=1e-6)


def test_emergence_scores_every_run_with_both_kinds_of_metric(tmp_path):
    """A sweep directory of two tiny models; the copy task's examples the char vocabulary cannot read are dropped."""
    import torch

    from lmforge.checkpoints import save_pretrained
    from lmforge.config import ModelConfig
    from lmforge.eval.emergence import emergence
    from lmforge.models import build_model
    from lmforge.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyzRJ :\n")
    runs = []
    for i, n_embd in enumerate((16, 32)):
        torch.manual_seed(i)
        cfg = ModelConfig.from_name("smollm2-135m", vocab_size=tok.vocab_size, n_layer=1, n_embd=n_embd, n_head=2, n_kv_head=2,
                                    d_ff=32, max_seq_len=64)  # fmt: skip
        d = save_pretrained(build_model(cfg).eval(), tmp_path / f"m{i}", tokenizer=tok)
        runs.append({"name": f"m{i}", "N": 1000 * (i + 1), "D": 5000, "C": 6 * 1000 * (i + 1) * 5000, "loss": 3.0 - i, "dir": str(d)})
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    docs = [{"context": f"R:\n{w}\n\nR:\n{w.split()[0]}", "target": " " + w.split(" ", 1)[1], "until": ["\n"]}
            for w in ("so be it", "and then we go", "the one", "a b c d", "no more")]  # fmt: skip
    docs.append({"context": "X:\nZ", "target": " Q"})  # X, Z, Q are not in the vocabulary
    (tmp_path / "copy.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    r = emergence(tmp_path, tmp_path / "copy.jsonl", num_fewshot=1, max_new_tokens=6, progress=False)
    assert r["dropped_unreadable"] == 1 and r["n"] == 5 and [x["name"] for x in r["runs"]] == ["m0", "m1"]
    for x in r["runs"]:
        assert 0 <= x["exact_match"] <= 1 and 0 < x["target_token_prob"] < 1 and 0 <= x["edit_distance"] <= 1
    assert json.loads((tmp_path / "emergence.json").read_text()) == r
    assert (tmp_path / "emergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_torch_optimiser_fallback_finds_the_same_minimum():
    """Without scipy the fit runs torch's L-BFGS on the same objective."""
    from lmforge.eval import scaling

    N, D = grid()
    args = (np.log(N), np.log(D), np.log(predict(TRUE, N, D)), 1e-3)
    theta0 = np.array([3.0, 0.3, 6.0, 0.4, 0.3])
    x, f = scaling._minimize_torch(theta0, *args)
    assert f < 1e-8
    assert np.exp(x[[0, 2, 4]]) == pytest.approx([TRUE["A"], TRUE["B"], TRUE["E"]], rel=1e-3)
    assert x[[1, 3]] == pytest.approx([TRUE["alpha"], TRUE["beta"]], rel=1e-3)
