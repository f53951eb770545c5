"""Parallelism over the sequence: ring attention (``ring``) and its use by the trainer
(``context``: ``--context-parallel N`` under torchrun)."""

from lmforge.parallel.ring import (
    ContextParallelError,
    RingAttend,
    ring_attention,
    zigzag_indices,
    zigzag_shard,
    zigzag_unshard,
)

__all__ = ["ContextParallelError", "RingAttend", "ring_attention", "zigzag_indices", "zigzag_shard", "zigzag_unshard"]
