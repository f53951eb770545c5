"""torch.distributed for the trainer: one process per device under ``torchrun``, DDP or FSDP2.

The same ``lmforge pretrain`` command runs alone or as ``torchrun --nproc_per_node N lmforge
pretrain ...``; torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) decides.
Backends: NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmforge.config import ConfigError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str | None = None  # None (one process) | ddp | fsdp
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world_size
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda was asked for but no CUDA device is available; use device=cpu or auto.")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps was asked for but MPS is not available; use device=cpu or auto.")
    return torch.device(name)


def init_distributed(device: str, strategy: str) -> DistContext:
    """One process (no torchrun) or this process's place in a torchrun group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank, world, local_rank, dev, strategy, owns)


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (the unit of FSDP sharding and of activation checkpointing)."""
    from lmforge.nn.layers import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def wrap_model(
    model: nn.Module, ctx: DistContext, *, forward_methods: tuple[str, ...] = (), sum_gradients: bool = False
) -> nn.Module:
    """DDP (a full replica per process, gradients all-reduced) or FSDP2 (parameters, gradients and
    optimizer state sharded; each block gathered just in time). One process: the model as is.

    FSDP only: ``forward_methods`` names methods besides ``forward`` that run the model from its root
    (``hidden``, say): FSDP gathers the root's own parameters (embeddings, final norm, heads) for them
    as it does for ``forward``. ``sum_gradients``: the gradients are summed over the processes
    instead of averaged, for losses that each process already scales by the global batch."""
    if not ctx.distributed:
        return model
    if ctx.strategy == "fsdp":
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

        for block in block_modules(model):
            fully_shard(block)
        fully_shard(model)
        for name in forward_methods:
            register_fsdp_forward_method(model, name)
        if sum_gradients:
            for m in model.modules():
                if isinstance(m, FSDPModule):  # the setting is per sharded module, not inherited
                    m.set_gradient_divide_factor(1.0)
                    m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM), no division
        return model
    if forward_methods or sum_gradients:
        raise ValueError("forward_methods and sum_gradients apply to FSDP (strategy='fsdp') only.")
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module holding the parameters under their own names (DDP's ``.module``)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, ctx: DistContext, sync: bool):
    """Inside: backward passes sync gradients across processes only if ``sync`` (the last
    micro-batch of an update); the others accumulate locally."""
    if not ctx.distributed or sync:
        if ctx.strategy == "fsdp" and ctx.distributed:
            model.set_requires_gradient_sync(True)
        yield
        return
    if ctx.strategy == "fsdp":
        model.set_requires_gradient_sync(False)
        yield
    else:
        with model.no_sync():
            yield
