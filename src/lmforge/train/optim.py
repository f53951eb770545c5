"""AdamW with decoupled weight decay on the right parameters, and the learning-rate schedule.

Weight decay shrinks matrices that mix features (linear layers). It is not applied to norms,
biases or embeddings (a tied output head is the embedding, so it is not decayed either).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (linear-layer weights) and not (norms, biases, embeddings)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay_ids = {
        id(m.weight) for m in model.modules()
        if isinstance(m, nn.Linear) and id(m.weight) not in embedding_params
    }  # fmt: skip
    decay, no_decay = [], []
    for p in model.parameters():  # unique parameters: a tied matrix appears once
        if p.requires_grad:
            (decay if id(p) in decay_ids else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]  # an empty group (LoRA trains no nn.Linear) would not survive a checkpoint


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused into one kernel where PyTorch has one for these tensors, else multi-tensor (foreach)."""
    groups = param_groups(model, cfg.weight_decay)
    plain = all(type(p.data) is torch.Tensor for g in groups for p in g["params"])  # FSDP2 shards are DTensors
    fused = plain and device.type in ("cpu", "cuda", "mps")
    return torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=fused or None, foreach=None if fused else True,
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """nanoGPT's schedule: linear warmup to learning_rate over warmup_iters, cosine decay to min_lr
    at lr_decay_iters, then min_lr. Constant learning_rate when decay_lr is off."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step > cfg.decay_iters:
        return cfg.final_lr
    span = cfg.decay_iters - cfg.warmup_iters
    ratio = (step - cfg.warmup_iters) / span if span > 0 else 1.0
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.final_lr + coeff * (cfg.learning_rate - cfg.final_lr)


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR over ``lr_at``: after ``n`` calls of ``step()`` the learning rate is ``lr_at(n)``."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        self.cfg = cfg
        super().__init__(optimizer, lambda step: lr_at(step, cfg) / cfg.learning_rate)

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count, "_last_lr": list(self._last_lr)}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch, self._step_count = int(state["last_epoch"]), int(state["_step_count"])
        self._last_lr = list(state["_last_lr"])
        for group, factor in zip(self.optimizer.param_groups, [self.lr_lambdas[0](self.last_epoch)] * len(self.base_lrs)):
            group["lr"] = self.cfg.learning_rate * factor
