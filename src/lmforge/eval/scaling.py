"""Scaling laws from one command: train a grid of small models, fit L(N, D), predict larger ones.

``lmforge scaling sweep RECIPE.yaml --data CORPUS --out DIR`` reads a pretraining recipe (the same
keys as ``lmforge pretrain``) with a ``scaling:`` section:

    scaling:
      budget_minutes: 20                       # refuse a grid whose estimated training time is larger
      models:                                  # model sizes: ModelConfig overrides of the recipe's model
        - {n_layer: 2, n_embd: 32, n_head: 2}
        - {n_layer: 4, n_embd: 128, n_head: 4}
      tokens: [100000, 200000, 400000]         # training tokens D of each run (every model x every D)
      held_out:                                # larger runs left out of the fit and predicted by it
        - {model: {n_layer: 6, n_embd: 160, n_head: 4}, tokens: 800000}

Every (model, tokens) pair is one run of the trainer (``lmforge.train.pretrain``) with its cosine
schedule ending at its own token count, as in Chinchilla's approach 3; the corpus is prepared once
(``lmforge.data.prepare``). N counts non-embedding parameters (Kaplan et al. 2020), compute is
C = 6·N·D. Before any run, the sweep times a few training steps of every model size and refuses a
grid whose estimated time exceeds the budget, saying by how much.

The fit is Chinchilla's: ``L(N, D) = E + A/N^α + B/D^β``, fitted on log L with a Huber loss from a
grid of starting points (scipy's L-BFGS-B when scipy is installed, else torch's L-BFGS), with
bootstrap confidence intervals (runs resampled with replacement). The compute-optimal frontier
minimises L at fixed C: ``N_opt(C) = G·(C/6)^(β/(α+β))`` with ``G = (αA/(βB))^(1/(α+β))``.

Writes ``DIR/runs.json`` (one record per finished run: the sweep resumes by skipping them),
``DIR/fit.json`` (parameters, intervals, held-out predictions vs measured) and ``DIR/scaling.png``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from lmforge.errors import UserError
from lmforge.plots import save_figure

PARAMS = ("E", "A", "alpha", "B", "beta")
# the search box of θ = (log A, α, log B, β, log E); a fit that ends on its edge is not a power law the data pin down
BOUNDS = {"A": (-10.0, 40.0), "alpha": (0.0, 3.0), "B": (-10.0, 40.0), "beta": (0.0, 3.0), "E": (-5.0, 5.0)}


# --- the sweep plan ------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    name: str
    model: dict[str, Any]  # ModelConfig overrides of the recipe's model section
    tokens: int
    held_out: bool = False


@dataclass
class SweepPlan:
    train: Any  # TrainConfig of the base recipe
    model: dict[str, Any]  # the recipe's model section
    runs: list[RunSpec]
    budget_minutes: float
    path: Path | None = None
    emergence: dict[str, Any] | None = None  # the study to run on the finished models (see ``sweep``)


def _model_name(m: dict[str, Any]) -> str:
    return f"L{m['n_layer']}-d{m['n_embd']}"


def _with_ffn(m: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """A grid entry's model overrides; a GLU's d_ff follows n_embd (8/3 of it, a multiple of 8) unless given."""
    m = dict(m)
    if "d_ff" not in m and "n_embd" in m:
        glu = base.get("ffn", "glu") == "glu"
        m["d_ff"] = (8 * m["n_embd"] // 3 + 7) // 8 * 8 if glu else 4 * m["n_embd"]
    return m


def load_plan(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> SweepPlan:
    """Read a scaling recipe: a pretraining recipe plus its ``scaling:`` section (see the module docstring)."""
    from lmforge.train.config import TrainConfig, coerce_model, split_keys

    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist; see configs/scaling-*.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise UserError(f"recipe {path} is not valid YAML") from None
    spec = raw.pop("scaling", None)
    if not isinstance(spec, dict) or not spec.get("models") or not spec.get("tokens"):
        raise UserError(f"recipe {path} needs a scaling: section with models: (a list of sizes) and tokens: (a list of counts)")
    model = raw.pop("model", None) or {}
    train_keys, stray = split_keys(raw)
    train = TrainConfig.from_dict({**train_keys, **(overrides or {})})
    model = coerce_model({**model, **stray})
    runs = []
    for m, d in itertools.product(spec["models"], spec["tokens"]):
        m = _with_ffn(m, model)
        runs.append(RunSpec(f"{_model_name(m)}-D{int(d)}", coerce_model(m), int(d)))
    for h in spec.get("held_out") or []:
        if not isinstance(h, dict) or "model" not in h or "tokens" not in h:
            raise UserError(f"recipe {path}: each held_out entry needs model: and tokens:")
        m = _with_ffn(h["model"], model)
        runs.append(RunSpec(f"{_model_name(m)}-D{int(h['tokens'])}", coerce_model(m), int(h["tokens"]), held_out=True))
    if len({r.name for r in runs}) != len(runs):
        raise UserError(f"recipe {path} lists the same (model, tokens) run twice; make each entry unique")
    budget = float(spec.get("budget_minutes", 60))
    study = spec.get("emergence")
    if study is not None and (not isinstance(study, dict) or study.get("task") not in ("arithmetic", "cloze", "copy")):
        raise UserError(f"recipe {path}: emergence: needs task: copy (or arithmetic), plus optional num_fewshot, n, max_words, limit")
    return SweepPlan(train=train, model=model, runs=runs, budget_minutes=budget, path=path, emergence=study)


def model_config_of(plan: SweepPlan, run: RunSpec, vocab_size: int):
    from lmforge.config import ModelConfig

    values = {**plan.model, **run.model, "vocab_size": vocab_size}
    preset = values.pop("preset", None)
    return ModelConfig.from_name(preset, **values) if preset else ModelConfig.from_dict(values)


def train_config_of(plan: SweepPlan, run: RunSpec, block: int):
    """The base recipe with the run's length: max_iters from the token count, the schedule ending there,
    one evaluation at the end."""
    cfg = plan.train
    tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * block
    iters = max(1, round(run.tokens / tokens_per_step))
    return cfg.replace(max_iters=iters, lr_decay_iters=iters, warmup_iters=min(cfg.warmup_iters, iters // 10),
                       eval_interval=0, checkpoint_interval=0, keep_last=1, progress=False, tensorboard=False)  # fmt: skip


# --- cost ----------------------------------------------------------------------------------------------
def measure_speed(model_cfg, train_cfg, block: int, steps: int = 5) -> float:
    """Training tokens per second of one model size: timed AdamW steps after a warm-up step."""
    from lmforge.models import build_model

    torch.manual_seed(0)
    model = build_model(model_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model_cfg.vocab_size, (train_cfg.batch_size, block + 1))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return train_cfg.batch_size * block * train_cfg.gradient_accumulation_steps / float(np.median(times))


@dataclass
class CostEstimate:
    minutes: float  # estimated training time of every run not yet done
    per_model: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {N, tok_s, flop_s}


def estimate_cost(plan: SweepPlan, vocab_size: int, skip: set[str] = frozenset()) -> CostEstimate:
    """Σ 6·N·D / (measured FLOP/s of that model size) over the runs still to do, plus each run's final
    evaluation (``eval_iters`` batches of both splits, forward only: about a third of a training step)."""
    from lmforge.models import build_model

    block = plan.train.block_size or plan.model.get("max_seq_len", 64)
    est = CostEstimate(0.0)
    seconds = 0.0
    for run in plan.runs:
        name = _model_name(run.model)
        if name not in est.per_model:
            mc = model_config_of(plan, run, vocab_size)
            with torch.device("meta"):
                n = build_model(mc).num_parameters(exclude_embeddings=True)
            tok_s = measure_speed(mc, plan.train, block)
            est.per_model[name] = {"N": n, "tok_s": tok_s, "flop_s": 6 * n * tok_s}
        if run.name not in skip:
            eval_tokens = 2 * plan.train.eval_iters * plan.train.batch_size * block / 3
            seconds += (run.tokens + eval_tokens) / est.per_model[name]["tok_s"]
    est.minutes = seconds / 60
    return est


# --- the fit -------------------------------------------------------------------------------------------
def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def _objective(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray, delta: float):
    """Σ Huber(log L̂ - log L) / δ and its gradient in θ = (log A, α, log B, β, log E) (divided by δ so the
    optimiser's tolerances see values of order |residual|, whatever δ)."""
    a, alpha, b, beta, e = theta
    terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])  # (3, runs)
    pred = np.logaddexp.reduce(terms, axis=0)  # log(A/N^α + B/D^β + E)
    r = pred - logL
    w = np.exp(terms - pred) * np.clip(r, -delta, delta)  # d Huber / d term_i
    grad = np.array([w[0].sum(), -(w[0] * logN).sum(), w[1].sum(), -(w[1] * logD).sum(), w[2].sum()])
    return float(_huber(r, delta).sum()) / delta, grad / delta


def _minimize(theta0: np.ndarray, args: tuple) -> tuple[np.ndarray, float]:
    try:
        from scipy.optimize import minimize
    except ImportError:  # torch's L-BFGS on the same objective
        return _minimize_torch(theta0, *args)
    bounds = list(BOUNDS.values())
    r = minimize(_objective, theta0, args=args, jac=True, method="L-BFGS-B", bounds=bounds)
    return r.x, float(r.fun)


def _minimize_torch(theta0, logN, logD, logL, delta):
    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    N, D, L = (torch.tensor(v, dtype=torch.float64) for v in (logN, logD, logL))
    opt = torch.optim.LBFGS([theta], max_iter=2000, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        a, alpha, b, beta, e = theta
        pred = torch.logsumexp(torch.stack([a - alpha * N, b - beta * D, e.expand_as(N)]), 0)
        loss = torch.nn.functional.huber_loss(pred, L, delta=delta, reduction="sum") / delta  # as _objective
        loss.backward()
        return loss

    opt.step(closure)
    x = theta.detach().numpy()
    return x, _objective(x, logN, logD, logL, delta)[0]


def fit_law(N, D, L, *, delta: float = 1e-3, starts: np.ndarray | None = None) -> dict[str, float]:
    """Least-Huber fit of log L to log(E + A/N^α + B/D^β); the best of a grid of starting points."""
    logN, logD, logL = np.log(np.asarray(N, float)), np.log(np.asarray(D, float)), np.log(np.asarray(L, float))
    if starts is None:
        starts = np.array(list(itertools.product([0.0, 8.0], [0.2, 0.5, 1.0], [0.0, 8.0], [0.2, 0.5, 1.0], [-1.0, 0.5])))
    best, best_loss = None, math.inf
    for theta0 in starts:
        theta, loss = _minimize(np.asarray(theta0, float), (logN, logD, logL, delta))
        if loss < best_loss:
            best, best_loss = theta, loss
    a, alpha, b, beta, e = best
    return {"E": math.exp(e), "A": math.exp(a), "alpha": float(alpha), "B": math.exp(b), "beta": float(beta),
            "objective": best_loss, "_theta": best.tolist()}  # fmt: skip


def undetermined(p: dict[str, float], N, D, tol: float = 1e-3, share: float = 0.01) -> list[str]:
    """What the fitted runs do not pin down: parameters that ended on the edge of the search box, and
    terms (E, A/N^alpha, B/D^beta) below ``share`` of the predicted loss at every fitted run."""
    theta = dict(zip(("A", "alpha", "B", "beta", "E"), p["_theta"]))
    out = [k for k, (lo, hi) in BOUNDS.items() if min(abs(theta[k] - lo), abs(theta[k] - hi)) < tol]
    N, D = np.asarray(N, float), np.asarray(D, float)
    total = predict(p, N, D)
    for name, term in (("E", np.full_like(total, p["E"])), ("A/N^alpha", p["A"] / N ** p["alpha"]), ("B/D^beta", p["B"] / D ** p["beta"])):
        if (term / total).max() < share and name not in out:
            out.append(name)
    return out


def predict(p: dict[str, float], N, D) -> np.ndarray:
    N, D = np.asarray(N, float), np.asarray(D, float)
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def compute_optimal(p: dict[str, float], C) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt) minimising L(N, D) subject to 6·N·D = C."""
    a, b = p["alpha"], p["beta"]
    G = (a * p["A"] / (b * p["B"])) ** (1 / (a + b))
    n = G * (np.asarray(C, float) / 6) ** (b / (a + b))
    return n, np.asarray(C, float) / (6 * n)


def bootstrap(N, D, L, p: dict[str, float], *, samples: int = 200, seed: int = 0, delta: float = 1e-3) -> list[dict]:
    """Fits on runs resampled with replacement, each started from the full fit."""
    rng = np.random.default_rng(seed)
    N, D, L = (np.asarray(v, float) for v in (N, D, L))
    fits = []
    for _ in range(samples):
        idx = rng.integers(0, len(L), len(L))
        if len(set(N[idx])) < 2 or len(set(D[idx])) < 2:
            continue
        fits.append(fit_law(N[idx], D[idx], L[idx], delta=delta, starts=np.array([p["_theta"]])))
    return fits


# --- the sweep -----------------------------------------------------------------------------------------
def _prepared_data(data, plan: SweepPlan, out: Path):
    """A prepared directory as is, or the raw corpus prepared once into ``out/data``."""
    from lmforge.data import TokenData, prepare

    path = Path(data)
    if path.is_dir() and (path / "meta.json").is_file():
        return TokenData(path)
    if plan.train.tokenizer is None:
        raise UserError(f"{path} is a raw corpus, so the recipe needs a tokenizer: (char, bpe:N or a path)")
    target = out / "data"
    if (target / "meta.json").is_file():
        return TokenData(target)
    return prepare([path], target, plan.train.tokenizer, val_fraction=plan.train.val_fraction, progress=False)


def _read_runs(out: Path) -> dict[str, dict]:
    f = out / "runs.json"
    return {r["name"]: r for r in json.loads(f.read_text())} if f.is_file() else {}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def sweep(recipe: str | os.PathLike, data, out: str | os.PathLike, *, budget_minutes: float | None = None,
          dry_run: bool = False, bootstrap_samples: int = 200, threads: int | None = None, progress: bool = True) -> dict:  # fmt: skip
    """Plan, cost, train every run (skipping finished ones), fit, predict the held-out runs, plot.

    ``threads`` sets torch's intra-op threads for the timing and the runs (1 is fastest for tiny
    models on a busy machine)."""
    with _torch_threads(threads):
        return _sweep(recipe, data, out, budget_minutes, dry_run, bootstrap_samples, progress)


@contextlib.contextmanager
def _torch_threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sweep(recipe, data, out, budget_minutes, dry_run, bootstrap_samples, progress) -> dict:
    from tqdm.auto import tqdm

    from lmforge.train import pretrain

    plan = load_plan(recipe)
    if budget_minutes is not None:
        plan.budget_minutes = budget_minutes
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = _prepared_data(data, plan, out)
    vocab = tokens.tokenizer().vocab_size
    done = _read_runs(out)
    est = estimate_cost(plan, vocab, skip=set(done))
    fit_runs = [r for r in plan.runs if not r.held_out]
    if len({_model_name(r.model) for r in fit_runs}) < 2 or len({r.tokens for r in fit_runs}) < 2:
        raise UserError("the fitted grid needs at least two model sizes and two token counts; add entries to models: or tokens:")
    header = {"recipe": str(plan.path), "budget_minutes": plan.budget_minutes, "estimated_minutes": est.minutes,
              "speed": est.per_model}  # fmt: skip
    if dry_run:
        return header | {"runs": [vars(r) for r in plan.runs]}
    if est.minutes > plan.budget_minutes:
        raise UserError(
            f"the grid needs about {est.minutes:.1f} min of training at the measured speed but the budget is "
            f"{plan.budget_minutes:g} min, {est.minutes - plan.budget_minutes:.1f} min ({est.minutes / plan.budget_minutes:.1f}x) "
            f"over; drop the largest sizes or token counts, or raise budget_minutes"
        )
    started = time.perf_counter()
    block = plan.train.block_size or plan.model.get("max_seq_len", 64)
    todo = [r for r in plan.runs if r.name not in done]
    for run in tqdm(todo, desc="scaling sweep", unit="run", disable=not progress):
        mc = model_config_of(plan, run, vocab)
        tc = train_config_of(plan, run, block)
        run_dir = out / "runs" / run.name
        if run_dir.exists():  # a run killed midway starts over (its schedule is short)
            import shutil

            shutil.rmtree(run_dir)
        result = pretrain(tc, mc, tokens, run_dir)
        n = est.per_model[_model_name(run.model)]["N"]
        d = tc.max_iters * tc.batch_size * tc.gradient_accumulation_steps * block  # tokens actually trained on
        done[run.name] = {"name": run.name, "model": run.model, "N": n, "D": d, "C": 6 * n * d,
                          "loss": result.final_val_loss, "train_loss": result.final_train_loss, "held_out": run.held_out,
                          "seconds": result.wall_time_s, "dir": str(run_dir)}  # fmt: skip
        _write_json(out / "runs.json", [done[r.name] for r in plan.runs if r.name in done])
    runs = [done[r.name] for r in plan.runs]
    result = fit_and_report(runs, out, bootstrap_samples=bootstrap_samples)
    result = header | {"train_minutes": (time.perf_counter() - started) / 60} | result
    if plan.emergence:
        result["emergence"] = run_emergence(plan.emergence, out)
    return result


def run_emergence(study: dict[str, Any], out: Path) -> dict:
    """The recipe's ``emergence:`` study on the sweep's models: a seeded task file written into the sweep
    directory (``task``, ``n``, ``seed``, ``max_words``), then ``lmforge.eval.emergence.emergence``."""
    from lmforge.eval.emergence import emergence
    from lmforge.eval.make_tasks import make_task

    kind = study["task"]
    options = {"max_words": int(study["max_words"])} if "max_words" in study and kind != "arithmetic" else {}
    task = make_task(kind, out / f"emergence-{kind}.jsonl", n=int(study.get("n", 100)), seed=int(study.get("seed", 0)), **options)
    return emergence(out, task, num_fewshot=int(study.get("num_fewshot", 1)), limit=study.get("limit", 50),
                     max_new_tokens=int(study.get("max_new_tokens", 48)))  # fmt: skip


def fit_and_report(runs: list[dict], out: Path, *, bootstrap_samples: int = 200) -> dict:
    """Fit on the non-held-out runs, predict the held-out ones, write fit.json and scaling.png."""
    fit_rows = [r for r in runs if not r["held_out"]]
    N, D, L = (np.array([r[k] for r in fit_rows], float) for k in ("N", "D", "loss"))
    p = fit_law(N, D, L)
    boots = bootstrap(N, D, L, p, samples=bootstrap_samples)
    ci = {k: [float(np.percentile([b[k] for b in boots], 2.5)), float(np.percentile([b[k] for b in boots], 97.5))]
          for k in PARAMS} if boots else {}  # fmt: skip
    held = []
    for r in (r for r in runs if r["held_out"]):
        pred = float(predict(p, r["N"], r["D"]))
        spread = [float(predict(b, r["N"], r["D"])) for b in boots]
        held.append({"name": r["name"], "N": r["N"], "D": r["D"], "loss": r["loss"], "predicted": pred,
                     "rel_error": (pred - r["loss"]) / r["loss"],
                     "predicted_ci95": [float(np.percentile(spread, 2.5)), float(np.percentile(spread, 97.5))] if spread else None})  # fmt: skip
    fit_resid = (predict(p, N, D) - L) / L
    a, b = p["alpha"], p["beta"]
    report = {
        "law": "L(N, D) = E + A / N^alpha + B / D^beta  (N: non-embedding parameters, D: training tokens)",
        "params": {k: p[k] for k in PARAMS}, "ci95": ci, "bootstrap_samples": len(boots),
        "fit_runs": len(fit_rows), "fit_max_rel_error": float(np.abs(fit_resid).max()),
        "undetermined": undetermined(p, N, D),
        "compute_optimal": {"N_opt_exponent": b / (a + b), "D_opt_exponent": a / (a + b)},
        "held_out": held,
    }  # fmt: skip
    _write_json(out / "fit.json", report)
    plot_scaling(runs, p, out / "scaling.png")
    return report


def plot_scaling(runs: list[dict], p: dict[str, float], path: Path) -> Path:
    """Three panels: loss vs tokens per model size with the fitted curves; loss vs compute with the
    compute-optimal frontier; predicted vs measured loss (held-out runs marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), dpi=110)
    sizes = sorted({r["N"] for r in runs})
    colors = {n: plt.cm.viridis(i / max(len(sizes) - 1, 1)) for i, n in enumerate(sizes)}
    Ds = np.array([r["D"] for r in runs], float)
    grid_d = np.geomspace(Ds.min() / 1.5, Ds.max() * 1.5, 100)
    ax = axes[0]
    for n in sizes:
        rs = [r for r in runs if r["N"] == n]
        ax.plot(grid_d, predict(p, n, grid_d), color=colors[n], lw=1, alpha=0.7)
        for r in rs:
            ax.scatter(r["D"], r["loss"], color=colors[n], marker="*" if r["held_out"] else "o", s=90 if r["held_out"] else 30,
                       edgecolor="k" if r["held_out"] else None, zorder=3)  # fmt: skip
        ax.plot([], [], color=colors[n], marker="o", label=f"N = {n / 1e3:.0f}k")
    ax.set(xscale="log", xlabel="training tokens D", ylabel="validation loss (nats/token)", title="loss vs data (lines: fit)")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decade labels only
    ax.legend(fontsize=7)
    ax = axes[1]
    C = np.array([r["C"] for r in runs], float)
    for r in runs:
        ax.scatter(r["C"], r["loss"], color=colors[r["N"]], marker="*" if r["held_out"] else "o",
                   s=90 if r["held_out"] else 30, edgecolor="k" if r["held_out"] else None, zorder=3)  # fmt: skip
    grid_c = np.geomspace(C.min() / 1.5, C.max() * 3, 100)
    n_opt, d_opt = compute_optimal(p, grid_c)
    ax.plot(grid_c, predict(p, n_opt, d_opt), "k--", lw=1.2, label="compute-optimal frontier (fit)")
    ax.set(xscale="log", xlabel="compute C = 6·N·D (FLOPs)", ylabel="validation loss", title="loss vs compute")
    ax.legend(fontsize=7)
    ax = axes[2]
    measured = np.array([r["loss"] for r in runs])
    pred = predict(p, [r["N"] for r in runs], [r["D"] for r in runs])
    held = np.array([r["held_out"] for r in runs])
    ax.scatter(measured[~held], pred[~held], label="fitted runs", s=25)
    ax.scatter(measured[held], pred[held], marker="*", s=120, color="tab:red", edgecolor="k", label="held-out (predicted)")
    lo, hi = min(measured.min(), pred.min()) * 0.97, max(measured.max(), pred.max()) * 1.03
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.fill_between([lo, hi], [lo * 0.95, hi * 0.95], [lo * 1.05, hi * 1.05], color="gray", alpha=0.15, label="±5%")
    ax.set(xlabel="measured loss", ylabel="predicted loss", title="fit vs measurement")
    ax.legend(fontsize=7)
    fig.suptitle(f"L(N,D) = {p['E']:.3f} + {p['A']:.3g}/N^{p['alpha']:.3f} + {p['B']:.3g}/D^{p['beta']:.3f}", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def refit(out: str | os.PathLike, *, bootstrap_samples: int = 200) -> dict:
    """``lmforge scaling fit DIR``: fit again from DIR/runs.json (no training)."""
    out = Path(out)
    runs = list(_read_runs(out).values())
    if not runs:
        raise UserError(f"{out} has no runs.json; run `lmforge scaling sweep` into it first")
    return fit_and_report(runs, out, bootstrap_samples=bootstrap_samples)
