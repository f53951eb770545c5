"""Parallelism across processes (torch.distributed, launched with torchrun): ring attention over a
sequence split between ranks (``ring``), its use by the trainer (``context``: ``--context-parallel N``),
and, in other modules of this package, other ways of splitting a model."""

from lmforge.parallel.ring import (
    ContextParallelError,
    RingAttend,
    ring_attention,
    zigzag_indices,
    zigzag_shard,
    zigzag_unshard,
)

__all__ = ["ContextParallelError", "RingAttend", "ring_attention", "zigzag_indices", "zigzag_shard", "zigzag_unshard"]
