"""The scheduler: which sequences run in the next step, and how many tokens each.

Every step it rebuilds the batch (continuous batching) under a token budget:

1. every running sequence that is decoding gets its one token (oldest first); if no block is free
   for it, the newest running sequence is preempted: its blocks are freed and it goes back to the
   head of the queue, to be recomputed (prompt + what it generated so far) when blocks free up;
2. sequences still in their prompt get a chunk of it (chunked prefill), so a long prompt costs each
   step at most the budget and never stalls the decodes running beside it;
3. waiting sequences are admitted, first taking whatever full blocks of their prompt are already
   in the prefix cache (``blocks.BlockManager``).
"""

from __future__ import annotations

from collections import deque

from lmforge.engine.blocks import BlockManager


class Scheduler:
    """Waiting and running sequences over a ``BlockManager``. A sequence needs ``tokens`` (what
    the cache must hold), ``num_computed`` (what it holds), ``table``, ``hashes`` and
    ``reuse_prefix`` (whether it may start from cached blocks)."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks, self.block_size = blocks, blocks.block_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.watermark = max(1, blocks.num_blocks // 100)  # blocks kept free at admission, for running decodes
        self.waiting: deque = deque()
        self.running: list = []  # in admission order: the newest is preempted first
        self.num_preemptions = 0

    def schedule(self) -> tuple[list, list[tuple[object, int]]]:
        """(decodes, prefills): the sequences that decode one token, and (sequence, n) prompt chunks."""
        bm = self.blocks
        budget = self.max_num_batched_tokens
        decodes: list = []
        prefills: list = []
        # 1. decodes, oldest first; out of blocks -> preempt the newest running sequence
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.remaining == 1:
                while not bm.grow(seq.table, seq.num_computed + 1):
                    victim = self.running[-1]  # never one already scheduled: those sit before index i
                    self.preempt(victim)
                    if victim is seq:
                        break
                else:
                    decodes.append(seq)
                    budget -= 1
            if i < len(self.running) and self.running[i] is seq:
                i += 1
        # 2. prompt chunks of running sequences
        for seq in self.running:
            if budget == 0:
                break
            if seq.remaining > 1:
                n = min(seq.remaining, budget, self._room(seq, 0))
                if n > 0:
                    bm.grow(seq.table, seq.num_computed + n)
                    prefills.append((seq, n))
                    budget -= n
        # 3. admit waiting sequences, taking their cached prefix first
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.table and seq.reuse_prefix:
                seq.table, seq.hashes = bm.match_prefix(seq.tokens)
                seq.num_computed = len(seq.table) * self.block_size
            n = min(seq.remaining, budget, self._room(seq, self.watermark if self.running else 0))
            if n <= 0:
                bm.free(seq.table)  # give the cached prefix back; try again next step
                seq.hashes, seq.num_computed = [], 0
                break
            bm.grow(seq.table, seq.num_computed + n)
            self.waiting.popleft()
            self.running.append(seq)
            if n == seq.remaining == 1:  # only the last prompt token left (the rest was cached)
                decodes.append(seq)
            else:
                prefills.append((seq, n))
            budget -= n
        # 4. nothing could run (every running prompt waits for blocks): preempt the newest and retry
        if not decodes and not prefills and len(self.running) > 1:
            self.preempt(self.running[-1])
            return self.schedule()
        return decodes, prefills

    def _room(self, seq, reserve: int) -> int:
        """Tokens ``seq`` can still place: its table's free slots plus the free blocks beyond ``reserve``."""
        return len(seq.table) * self.block_size - seq.num_computed + max(0, self.blocks.num_free - reserve) * self.block_size

    def preempt(self, seq) -> None:
        """Recompute preemption: drop the sequence's K/V; it re-enters the queue at the head."""
        self.running.remove(seq)
        self.blocks.free(seq.table)
        seq.hashes, seq.num_computed = [], 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def computed(self, seq, n: int) -> None:
        """``n`` more tokens of ``seq`` are in the cache: publish its newly full blocks."""
        seq.num_computed += n
        self.blocks.publish_full_blocks(seq.tokens, seq.table, seq.hashes, seq.num_computed)

    def remove(self, seq) -> None:
        """Take a finished or cancelled sequence out and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.table)
