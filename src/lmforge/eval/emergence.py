"""Emergence study: the models of a scaling sweep on one few-shot task, under two kinds of metric.

Schaeffer et al. (2023) argue that abilities which seem to appear suddenly with scale often do so
because of the metric: exact match gives no credit until a whole answer is right, while a
continuous metric of the same outputs (per-token log-likelihood of the answer, edit distance)
may improve smoothly. ``emergence(sweep_dir, task)`` scores every run of a sweep with
``lmforge.eval.tasks`` and plots exact match beside the continuous metrics against compute.

    lmforge scaling emergence out/scaling --task copy.jsonl --num-fewshot 1
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmforge.errors import UserError
from lmforge.plots import save_figure


def emergence(sweep_dir: str | os.PathLike, task: str | os.PathLike, *, num_fewshot: int = 1, limit: int | None = 50,
              max_new_tokens: int = 48, progress: bool = True) -> dict:  # fmt: skip
    """Evaluate every finished run of ``sweep_dir`` on ``task``; write emergence.json and emergence.png."""
    from tqdm.auto import tqdm

    from lmforge.checkpoints import load_model
    from lmforge.eval.tasks import evaluate_task, load_task
    from lmforge.tokenizer import load_tokenizer

    out = Path(sweep_dir)
    runs_file = out / "runs.json"
    if not runs_file.is_file():
        raise UserError(f"{out} has no runs.json; run `lmforge scaling sweep` into it first")
    runs = sorted(json.loads(runs_file.read_text()), key=lambda r: r["C"])
    t = load_task(task)
    if t.kind != "generate_until":
        raise UserError(f"{task} is a multiple-choice task; the emergence study needs a generate-until task (exact match)")
    t, dropped = _readable(t, load_tokenizer(runs[0]["dir"]))  # a sweep shares one tokenizer
    rows = []
    for r in tqdm(runs, desc="emergence", unit="model", disable=not progress):
        model, tok = load_model(r["dir"]), load_tokenizer(r["dir"])
        res = evaluate_task(model, tok, t, num_fewshot=num_fewshot, limit=limit, max_new_tokens=max_new_tokens)
        rows.append({k: r[k] for k in ("name", "N", "D", "C", "loss")} | res.metrics | {"example": res.samples[0]["output"]})
    report = {"task": str(task), "num_fewshot": num_fewshot, "n": res.n, "dropped_unreadable": dropped, "runs": rows}
    tmp = out / ".emergence.json.tmp"
    tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
    os.replace(tmp, out / "emergence.json")
    plot_emergence(rows, out / "emergence.png", title=f"{Path(task).stem}, {num_fewshot}-shot, {res.n} examples")
    return report


def _readable(task, tokenizer):
    """The task without the examples whose text the tokenizer cannot encode (a character vocabulary
    lacks some letters), and how many were dropped."""
    from lmforge.eval.tasks import Task
    from lmforge.tokenizer import TokenizerError

    keep = []
    for d in task.docs:
        try:
            tokenizer.encode(d["context"] + d["target"])
            keep.append(d)
        except TokenizerError:
            pass
    if len(keep) < 2:
        raise UserError(f"the sweep's tokenizer cannot read the examples of {task.path}; make the task from text in its alphabet")
    return Task(task.name, task.kind, keep, task.path), len(task.docs) - len(keep)


def plot_emergence(rows: list[dict], path: Path, title: str = "") -> Path:
    """Exact match, answer-token probability and 1 - edit distance against compute, one colour per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sizes = sorted({r["N"] for r in rows})
    colors = {n: plt.cm.viridis(i / max(len(sizes) - 1, 1)) for i, n in enumerate(sizes)}
    panels = [("exact_match", "exact match (discontinuous)"), ("target_token_prob", "mean per-token probability of the answer"),
              ("edit_distance", "1 - normalised edit distance")]  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), dpi=110)
    for ax, (key, label) in zip(axes, panels):
        for n in sizes:
            rs = sorted((r for r in rows if r["N"] == n), key=lambda r: r["C"])
            ys = [1 - r[key] if key == "edit_distance" else r[key] for r in rs]
            ax.plot([r["C"] for r in rs], ys, marker="o", color=colors[n], label=f"N = {n / 1e3:.0f}k")
        ax.set(xscale="log", xlabel="training compute C = 6·N·D (FLOPs)", title=label, ylim=(-0.03, 1.03))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decade labels only
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"emergence vs metric: {title}")
    fig.tight_layout()
    return save_figure(fig, path)

