"""Where training numbers go: ``metrics.jsonl`` (one JSON object per line, each with ``step``),
TensorBoard when it is installed, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from lmforge.plots import save_figure


class MetricsLog:
    """Appends JSON lines to ``run_dir/metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | os.PathLike, *, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop what the killed run logged for them."""
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path.parent) if r["step"] <= step]
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (a last line cut short by a kill is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def plot_loss(run_dir: str | os.PathLike, title: str | None = None) -> Path | None:
    """``run_dir/loss.png``: training loss per logged step and validation loss per evaluation."""
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.0, alpha=0.8)
    if val:
        ax.plot(*zip(*val), label="val loss", color="tab:orange", marker="o", markersize=3.5, linewidth=1.5)
        step, best = min(val, key=lambda v: v[1])
        ax.annotate(f"{best:.3f}", (step, best), textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, Path(run_dir) / "loss.png")
