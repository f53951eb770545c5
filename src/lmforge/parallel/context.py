"""Context parallelism for the trainer (``--context-parallel N`` under torchrun).

The W processes form W/N data-parallel replicas of N ranks each (ranks g*N .. g*N+N-1). The ranks
of one replica read the same micro-batches; each keeps its zig-zag shard of every sequence (its
tokens, labels and their global positions), and attention runs as ring attention over the
replica's process group, so the model never sees the whole sequence on one rank.

Loss and gradients equal one process's: every rank sums the cross-entropy of its own tokens and
divides by the label count of the whole sequence (the same number on each rank), so the ranks'
losses add up to the sequence's mean loss. DDP averages gradients over all W processes; scaling
the training loss by N turns that average into a sum over the N shards and a mean over replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lmforge.config import ConfigError, ModelConfig
from lmforge.parallel.ring import RingAttend, check_divisible, zigzag_indices


@dataclass
class ContextParallel:
    size: int = 1  # N: ranks that share one sequence
    dp_size: int = 1  # data-parallel replicas (W / N)
    dp_rank: int = 0  # this rank's replica
    cp_rank: int = 0  # this rank's place in the ring
    group: Any = None  # the ring's process group

    @classmethod
    def setup(cls, size: int, ctx, model_config: ModelConfig, block_size: int, objective: str, strategy: str) -> "ContextParallel":
        """Check the settings and create the rings' process groups (every rank creates all of them)."""
        if size == 1:
            return cls(1, ctx.world_size, ctx.rank, 0, None)
        if ctx.world_size % size:
            raise ConfigError(
                f"context_parallel={size} needs a multiple of {size} processes but {ctx.world_size} were started; "
                f"launch with torchrun --nproc_per_node {size} (or a multiple)."
            )
        if objective != "causal" or model_config.arch != "decoder":
            raise ConfigError(f"context_parallel works with the causal objective on a decoder, not objective={objective}; set context_parallel=1.")
        if model_config.position in ("alibi", "t5") or model_config.sliding_window or model_config.attn_dropout:
            raise ConfigError(
                "context_parallel supports plain causal attention (rope, learned, sinusoidal or no positions) without "
                "sliding_window or attn_dropout; remove them or set context_parallel=1."
            )
        if ctx.distributed and strategy != "ddp":
            raise ConfigError(f"context_parallel is implemented with strategy=ddp, not {strategy}; set strategy=ddp.")
        check_divisible(block_size, size)
        groups = [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(ctx.world_size // size)]
        return cls(size, ctx.world_size // size, ctx.rank // size, ctx.rank % size, groups[ctx.rank // size])

    def attach(self, model: torch.nn.Module) -> None:
        """Make the model's self-attention run as ring attention over this rank's ring."""
        if self.size == 1:
            return
        from lmforge.nn.attention import Attention

        ring = RingAttend(self.group)
        for module in model.modules():
            if isinstance(module, Attention) and not module.cross:
                module.impl = ring

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], training: bool) -> torch.Tensor:
        """This rank's share of the batch's mean cross-entropy (x N when training: see the module doc)."""
        from lmforge.train.trainer import compute_loss, loss_normalizer, summed_loss

        if self.size == 1:
            return compute_loss(model, batch)
        ids, labels, weights = batch["input_ids"], batch["labels"], batch.get("loss_weights")  # (B, T)
        pos = zigzag_indices(ids.shape[1], self.size, self.cp_rank, ids.device)  # (2c,) global positions
        logits = model(input_ids=ids[:, pos], position_ids=pos[None].expand(ids.shape[0], -1))  # (B, 2c, V)
        total = summed_loss(logits, labels[:, pos], None if weights is None else weights[:, pos])
        loss = total / loss_normalizer(labels, weights)  # the whole sequence's label count (or weight)
        return loss * self.size if training else loss
