"""Tensor parallelism (Megatron-style) with PyTorch's DTensor: every rank holds 1/N of each layer.

    torchrun --nproc_per_node 2 -m lmforge.cli generate --tensor-parallel 2 -p "Hello"

    model = tensor_parallel(load_model(), init_device_mesh("cpu", (2,)))   # in every process

Per block, the first projection of attention (fused Q/K/V) and of the feed-forward (fused gate/up)
is split by output columns (``ColwiseParallel``) and the second (``o``, ``down``) by input rows
(``RowwiseParallel``, one all-reduce at its output). So each rank computes its own attention heads
and its own slice of the hidden layer, and the block's output is whole again on every rank after
two all-reduces. Embeddings, norms and the LM head stay replicated: every rank samples the same
token from the same logits, so greedy text equals one process's.

The fused weights keep Q, K and V (and gate, up) side by side, so a plain column split would hand
rank 0 all of Q; the rows are first interleaved so that rank r's contiguous shard is
``[Q_r; K_r; V_r]`` (and ``[gate_r; up_r]``). The attention modules then count their local heads,
which is also what sizes their KV cache. Launch with ``torchrun`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import UserError


class TensorParallelError(UserError, ValueError):
    """A model or degree that tensor parallelism can't split; the message says why."""


def check_tensor_parallel(cfg, degree: int) -> None:
    """One sentence on why ``cfg`` can't be split ``degree`` ways (nothing if it can)."""
    if degree < 1:
        raise TensorParallelError(f"--tensor-parallel must be at least 1, got {degree}.")
    if cfg.arch != "decoder":
        raise TensorParallelError(f"tensor parallelism runs decoder-only models; this one is {cfg.arch}.")
    if cfg.position in ("alibi", "t5"):
        raise TensorParallelError(f"tensor parallelism does not split {cfg.position} position biases yet; run it in one process.")
    for name, value in (("n_head", cfg.n_head), ("n_kv_head", cfg.n_kv_head), ("d_ff", cfg.d_ff)):
        if value % degree:
            raise TensorParallelError(f"{name}={value} is not divisible by --tensor-parallel {degree}; pick a degree that divides it.")


def _interleave(t: torch.Tensor, sizes: list[int], degree: int) -> torch.Tensor:
    """Rows [A; B; C] -> [A_0; B_0; C_0; A_1; B_1; C_1; ...], so shard r of a column split is [A_r; B_r; C_r]."""
    parts = [p.chunk(degree, dim=0) for p in t.split(sizes, dim=0)]
    return torch.cat([part[r] for r in range(degree) for part in parts], dim=0)


@torch.no_grad()
def _interleave_linear(linear: nn.Linear, sizes: list[int], degree: int) -> None:
    linear.weight.copy_(_interleave(linear.weight, sizes, degree))
    if linear.bias is not None:
        linear.bias.copy_(_interleave(linear.bias, sizes, degree))


def tensor_parallel(model, mesh) -> nn.Module:
    """Split ``model``'s blocks over the 1-D device ``mesh`` in place (every rank calls this with the
    same full weights, e.g. from ``load_model``) and return it."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    degree = mesh.size()
    cfg = model.config
    check_tensor_parallel(cfg, degree)
    if degree == 1:
        return model
    for block in model.stack.layers:
        attn, mlp = block.attn, block.mlp
        q_dim, kv_dim = attn.n_head * attn.head_dim, attn.n_kv_head * attn.head_dim
        _interleave_linear(attn.qkv, [q_dim, kv_dim, kv_dim], degree)
        if mlp.glu:
            _interleave_linear(mlp.up, [cfg.d_ff, cfg.d_ff], degree)
        parallelize_module(block, mesh, {"attn.qkv": ColwiseParallel(), "attn.o": RowwiseParallel(),
                                         "mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel()})  # fmt: skip
        attn.n_head //= degree  # each rank computes (and caches) its own heads
        attn.n_kv_head //= degree
    model.tensor_parallel = degree
    return model


def init_tensor_parallel(degree: int):
    """The device mesh of a ``torchrun`` launch of ``degree`` processes (gloo on CPU, NCCL on CUDA)."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != degree:
        raise TensorParallelError(f"--tensor-parallel {degree} needs {degree} processes: launch with "
                                  f"`torchrun --nproc_per_node {degree} -m lmforge.cli ...` (this is {world}).")  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return init_device_mesh(device, (degree,))


# --- serving: one engine, every rank in step ------------------------------------------------------
class LockstepRunner:
    """The serving engine's model runner under tensor parallelism, on rank 0.

    Only rank 0 runs the engine (scheduler, block manager, sampler, HTTP): before each forward it
    broadcasts the step's inputs (block tables, positions, tokens, logit rows) and every other rank
    runs the same forward on its shard (``follow``), so the row-parallel all-reduces meet. The block
    pools are alike on every rank (same size, same tables), each holding its own heads' K/V."""

    def __init__(self, runner):
        self.runner = runner

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def execute(self, decodes, prefills, logit_rows, cross=None):
        import torch.distributed as dist

        dist.broadcast_object_list([(decodes, prefills, logit_rows)], src=0)
        return self.runner.execute(decodes, prefills, logit_rows, cross)

    def close(self) -> None:
        """Release the other ranks from ``follow``."""
        import torch.distributed as dist

        dist.broadcast_object_list([None], src=0)


def lockstep(engine) -> None:
    """Make rank 0's ``engine`` drive the other ranks' runners (see ``LockstepRunner``)."""
    engine.runner = LockstepRunner(engine.runner)


def follow(engine) -> int:
    """On ranks other than 0: run every forward rank 0's engine runs, until it closes; the number of steps."""
    import torch.distributed as dist

    steps = 0
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is None:
            return steps
        decodes, prefills, rows = message[0]
        engine.runner.execute(decodes, prefills, rows)
        steps += 1
