"""Pretraining: the loop, its configuration, checkpoints and distributed launch.

    from lmforge.train import load_recipe, pretrain
    recipe = load_recipe("configs/nanogpt-shakespeare-char-cpu.yaml", ["--max_iters=100"])
    result = pretrain(recipe.train, recipe.model, "../shared/data/tinyshakespeare.txt", "out/char")
"""

from lmforge.train.checkpoint import latest_checkpoint, list_checkpoints
from lmforge.train.config import Recipe, TrainConfig, load_recipe, parse_overrides
from lmforge.train.metrics import plot_loss, read_metrics
from lmforge.train.optim import lr_at, param_groups
from lmforge.train.trainer import TrainResult, compute_loss, pretrain, resolve_model_config

__all__ = [
    "latest_checkpoint", "list_checkpoints", "Recipe", "TrainConfig", "load_recipe", "parse_overrides", "plot_loss",
    "read_metrics", "lr_at", "param_groups", "TrainResult", "compute_loss", "pretrain", "resolve_model_config",
]
