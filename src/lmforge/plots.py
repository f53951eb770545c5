"""Writing figures: every PNG lmforge draws (loss curves, dashboards, scaling fits, attention maps,
benchmarks) goes through ``save_figure``, so none is ever seen half-written."""

from __future__ import annotations

import os
from pathlib import Path


def save_figure(fig, path: str | os.PathLike, dpi: float | None = None) -> Path:
    """Write ``fig`` as a PNG to ``path`` (its folder created), atomically (a temporary file renamed
    into place), and close it. Returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    os.replace(tmp, path)
    return path
