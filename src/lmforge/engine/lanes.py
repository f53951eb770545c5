"""Lanes: a fixed set of sequences driven step by step on the engine's paged runner, outside the
scheduler, for the decoders that need more than "sample one token after the last": beam search
forks sequences (``reorder``), speculative decoding feeds several tokens at once, reads the logits
after each (``extend(..., all_logits=True)``) and takes back the ones it rejects (``rewind``).

Each lane is a block table into the runner's ``PagedKVCache`` and a length. Forking shares blocks
(the ``BlockManager``'s reference counts); a lane that writes into a shared block first copies it
(copy-on-write), so beams that agree on a prefix keep one copy of it. The forward is the runner's
(``ModelRunner.execute``): the model's own, with the cache behind ``Attention``, and a step of
single tokens runs the compiled decode graph of its batch size where there is one.

The interface is the contiguous ``DecoderRunner``'s (``prefill`` / ``extend`` / ``rewind`` /
``reorder`` / ``close``, ``batch_size``, ``model``), so ``beam_search`` and ``speculative_tokens``
run on either; the contiguous one stays for attention the pool cannot page and ``use_cache=False``.
Lanes on an engine hold its ``step_lock`` for each call, so another thread stepping the same engine
inline (one ``Generator`` used from several threads) takes turns with them; an engine that steps in
its own thread (the server's) is refused.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Sequence

import torch

from lmforge.engine.blocks import BlockManager
from lmforge.engine.runner import ModelRunner
from lmforge.errors import UserError


class PoolFullError(UserError, RuntimeError):
    """The KV pool has no free block for a lane's next tokens."""


def _locked(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return call


class Lanes:
    """``len(prompts) * copies`` sequences on ``runner``'s pool, blocks from ``blocks``: each prompt
    is prefilled once and its ``copies`` lanes share its blocks (lane i is prompt i // copies)."""

    def __init__(self, runner: ModelRunner, blocks: BlockManager, prompts: Sequence[Sequence[int]], copies: int = 1,
                 lock=None):  # fmt: skip
        self.runner, self.blocks = runner, blocks
        self.lock = lock if lock is not None else threading.RLock()  # held by every call below
        self.model = runner.model
        self.prompts = [list(p) for p in prompts]
        self.copies = copies
        self.batch_size = len(prompts) * copies
        self.tables: list[list[int]] = []
        self.lengths: list[int] = []  # tokens in each lane's cache
        self.cross: list | None = None  # encoder-decoder: each lane's cross-attention K/V

    @classmethod
    def of_engine(cls, engine, prompts: Sequence[Sequence[int]], copies: int = 1) -> "Lanes":
        """Lanes on an engine's runner and block pool (an engine stepped by the caller)."""
        if engine.running_in_thread:
            raise RuntimeError("lanes step the runner themselves: use them on an engine without its thread")
        return cls(engine.runner, engine.blocks, prompts, copies, engine.step_lock)

    @classmethod
    def own(cls, model, prompts: Sequence[Sequence[int]], max_new_tokens: int, block_size: int = 16,
            extra_slots: int = 0) -> "Lanes":  # fmt: skip
        """Lanes on a runner and pool of their own, sized for the prompts and ``max_new_tokens``
        (+ ``extra_slots``) more tokens each (e.g. a draft model's)."""
        per_lane = -(-(max(map(len, prompts)) + max_new_tokens + extra_slots) // block_size)
        num_blocks = per_lane * len(prompts)
        return cls(ModelRunner(model, num_blocks, block_size), BlockManager(num_blocks, block_size, enable_prefix_caching=False),
                   prompts)  # fmt: skip

    # --- blocks --------------------------------------------------------------------------------
    def _room(self, lane: int, end: int) -> None:
        """Make lane ``lane``'s table hold slots up to ``end``, its blocks from its length on its
        own: a block shared with another lane is copied before this lane writes into it."""
        table, bs, blocks = self.tables[lane], self.blocks.block_size, self.blocks
        first = self.lengths[lane] // bs
        need = blocks.blocks_for(end) - len(table)
        shared = [i for i in range(first, len(table)) if blocks.ref_count[table[i]] > 1]
        if len(shared) + max(need, 0) > blocks.num_free:
            raise PoolFullError(
                f"the KV pool ({blocks.num_blocks} blocks of {bs} tokens) is full: {self.batch_size} sequences of up "
                f"to {end} tokens do not fit; use fewer beams or prompts, or fewer new tokens."
            )
        if shared:
            fresh = [blocks.allocate() for _ in shared]
            self.runner.pool.copy_blocks([table[i] for i in shared], fresh)
            for i, b in zip(shared, fresh):
                blocks.release(table[i])
                table[i] = b
        blocks.grow(table, end)

    # --- the DecoderRunner interface -------------------------------------------------------------
    @_locked
    def prefill(self) -> torch.Tensor:
        """Write each prompt into the pool; logits (batch_size, V) of the token after it."""
        starts = [self.runner.start_tokens(p) for p in self.prompts]
        cross = [self.runner.encode(p) for p in self.prompts] if self.runner.encoder_decoder else None
        self.tables, self.lengths = [[] for _ in starts], [0] * len(starts)
        self.cross = cross
        for i, toks in enumerate(starts):
            self._room(i, len(toks))
        ends = list(itertools.accumulate(len(t) for t in starts))  # each prompt's last row, + 1
        logits = self.runner.execute([], [(t, 0, toks) for t, toks in zip(self.tables, starts)], [e - 1 for e in ends], cross)
        self.lengths = [len(t) for t in starts]
        if self.copies > 1:
            index = torch.arange(len(starts)).repeat_interleave(self.copies)
            self.reorder(index)
            logits = logits[index.to(logits.device)]
        return logits

    @_locked
    def extend(self, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Feed tokens (batch_size, t); logits of the next token (batch_size, V), or after each fed
        token (batch_size, t, V). A step of single tokens is a decode step (compiled where ready)."""
        B, t = tokens.shape
        rows = tokens.tolist()
        for i in range(B):
            self._room(i, self.lengths[i] + t)
        if t == 1:
            decodes = [(table, n, row[0]) for table, n, row in zip(self.tables, self.lengths, rows)]
            logits = self.runner.execute(decodes, [], list(range(B)), self.cross)
            logits = logits[:, None] if all_logits else logits
        else:
            chunks = [(table, n, row) for table, n, row in zip(self.tables, self.lengths, rows)]
            wanted = range(B * t) if all_logits else range(t - 1, B * t, t)
            logits = self.runner.execute([], chunks, list(wanted), self.cross)
            logits = logits.view(B, t, -1) if all_logits else logits
        self.lengths = [n + t for n in self.lengths]
        return logits

    @_locked
    def rewind(self, n: int) -> None:
        """Forget every lane's last n tokens; blocks no longer needed go back to the pool."""
        for i, table in enumerate(self.tables):
            self.lengths[i] -= n
            keep = self.blocks.blocks_for(self.lengths[i])
            while len(table) > keep:
                self.blocks.release(table.pop())

    @_locked
    def reorder(self, index: torch.Tensor) -> None:
        """Lanes become lanes ``index`` of before (beam search): a lane taken twice shares its blocks."""
        index = index.tolist()
        tables = [list(self.tables[i]) for i in index]
        for table in tables:
            for b in table:
                self.blocks.share(b)
        for table in self.tables:
            self.blocks.free(table)
        self.tables = tables
        self.lengths = [self.lengths[i] for i in index]
        if self.cross is not None:
            self.cross = [self.cross[i] for i in index]

    @_locked
    def close(self) -> None:
        """Give every block back."""
        for table in self.tables:
            self.blocks.free(table)
        self.tables, self.lengths, self.cross = [], [], None

