"""TRL's PPO code, for parity tests.

The installed TRL (1.x) no longer ships a PPO trainer: GAE, the adaptive KL controller, the
per-token KL reward and the clipped value loss only exist in older releases. This helper fetches
the trl 0.11.4 wheel with pip (cached in the repository's git-ignored .cache/, as tests/_assets.py does), and executes the exact source
of the functions and methods we compare against (``PPOTrainer.compute_rewards / _kl_penalty /
compute_advantages / loss``, ``AdaptiveKLController``, and ``trl.core``'s masked statistics),
pulled out with ``ast`` so nothing else of that old package is imported. When the wheel cannot be
fetched (no registry), the tests that need it are skipped, saying why.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

VERSION = "0.11.4"
CACHE = Path(__file__).resolve().parents[2] / ".cache"


def _wheel() -> Path:
    found = sorted(CACHE.glob(f"trl-{VERSION}-*.whl"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", f"trl=={VERSION}", "--no-deps", "-q", "-d", str(CACHE)],
                       check=True, capture_output=True, timeout=120)  # fmt: skip
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"trl=={VERSION} (the last TRL with PPO) could not be downloaded: {e}")
    found = sorted(CACHE.glob(f"trl-{VERSION}-*.whl"))
    if not found:
        pytest.skip(f"pip did not leave a trl=={VERSION} wheel in {CACHE}")
    return found[0]


def _defs(source: str, names: set[str]) -> dict[str, str]:
    """Source of the top-level functions/classes and class methods named in ``names``."""
    out = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names:
            out[node.name] = ast.unparse(node)
    return out


_loaded: types.SimpleNamespace | None = None


def load() -> types.SimpleNamespace:
    """Namespace with trl 0.11.4's ``masked_mean``, ``masked_var``, ``masked_whiten``, ``clip_by_value``,
    ``entropy_from_logits``, ``AdaptiveKLController`` and the PPOTrainer methods as plain functions."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with zipfile.ZipFile(_wheel()) as z:
        core = z.read("trl/core.py").decode()
        utils = z.read("trl/trainer/utils.py").decode()
        ppo = z.read("trl/trainer/ppo_trainer.py").decode()
    ns: dict = {"torch": torch, "np": np, "F": F, "warnings": warnings, "Optional": __import__("typing").Optional,
                "flatten_dict": lambda d: d}  # fmt: skip
    for src, names in [(core, {"masked_mean", "masked_var", "masked_whiten", "clip_by_value", "entropy_from_logits"}),
                       (utils, {"AdaptiveKLController", "FixedKLController"}),
                       (ppo, {"compute_rewards", "_kl_penalty", "compute_advantages", "loss"})]:  # fmt: skip
        for code in _defs(src, names).values():
            exec(code, ns)
    _loaded = types.SimpleNamespace(**{k: v for k, v in ns.items() if not k.startswith("__")})
    return _loaded
