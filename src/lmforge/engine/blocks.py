"""The block manager of the paged KV cache: fixed-size blocks, reference counts, prefix caching.

The KV pool is cut into ``num_blocks`` blocks of ``block_size`` token slots. Each sequence owns a
*block table* (the list of its block ids, in position order): token ``p`` of a sequence lives in
slot ``table[p // block_size] * block_size + p % block_size``.

Prefix caching: once a block is full, it is registered under a hash of its tokens chained with the
hash of the block before it (so the hash names the whole prefix, not just 16 tokens). A new
sequence whose prompt starts with the same full blocks takes those blocks (reference count + 1)
instead of computing them again. A freed block keeps its hash while it sits in the free queue, so
a later request can still reuse it; it loses the hash only when it is handed out again. Freed
blocks are queued least-recently-used first, a sequence's tail blocks ahead of its head blocks, so
the shared beginnings of prompts are the last to be evicted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence


def block_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """Hash of one full block: its tokens and the hash of everything before it (blake2b, 128 bits:
    collision-resistant, so a crafted prompt cannot alias another user's cached blocks)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\x00" * 16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockManager:
    """Allocation, freeing and prefix-cache bookkeeping of ``num_blocks`` KV blocks (no tensors)."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}.")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash of a full block -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evicted first
        self.prefix_hits = 0  # tokens served from the prefix cache, for /metrics

    # --- counts --------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- single blocks -------------------------------------------------------------------------
    def allocate(self) -> int:
        """A fresh block (reference count 1); evicts the least recently freed cached block."""
        if not self.free_queue:
            raise RuntimeError("no free KV block: check num_free before allocating.")
        b, _ = self.free_queue.popitem(last=False)
        if self.hash_of[b] is not None:
            del self.cached[self.hash_of[b]]
            self.hash_of[b] = None
        self.ref_count[b] = 1
        return b

    def release(self, b: int) -> None:
        if self.ref_count[b] <= 0:
            raise RuntimeError(f"KV block {b} freed twice.")
        self.ref_count[b] -= 1
        if self.ref_count[b] == 0:
            self.free_queue[b] = None

    def share(self, b: int) -> None:
        """Another reference to block ``b``, which is in use (a forked sequence)."""
        if self.ref_count[b] <= 0:
            raise RuntimeError(f"KV block {b} is free: only a block in use can be shared.")
        self.ref_count[b] += 1

    def lookup(self, h: bytes) -> int | None:
        """Take a reference to the cached block with hash ``h``, or None if there is none."""
        b = self.cached.get(h)
        if b is None:
            return None
        if self.ref_count[b] == 0:
            del self.free_queue[b]
        self.ref_count[b] += 1
        return b

    def register(self, b: int, h: bytes) -> None:
        """Publish full block ``b`` under hash ``h`` (a no-op if an identical block is already published)."""
        if self.enable_prefix_caching and h not in self.cached and self.hash_of[b] is None:
            self.cached[h] = b
            self.hash_of[b] = h

    # --- sequences -----------------------------------------------------------------------------
    def match_prefix(self, tokens: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """Cached blocks (taken) for the longest run of full leading blocks of ``tokens``, and their hashes.

        The last token is never matched: its logits must be computed to sample what follows.
        """
        blocks: list[int] = []
        hashes: list[bytes] = []
        if not self.enable_prefix_caching:
            return blocks, hashes
        bs, parent = self.block_size, None
        for i in range((len(tokens) - 1) // bs):
            h = block_hash(parent, tokens[i * bs : (i + 1) * bs])
            b = self.lookup(h)
            if b is None:
                break
            blocks.append(b)
            hashes.append(h)
            parent = h
        self.prefix_hits += len(blocks) * bs
        return blocks, hashes

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Append blocks to ``table`` until it holds ``num_tokens`` slots; False (and no change) if
        there are not enough free blocks."""
        need = self.blocks_for(num_tokens) - len(table)
        if need > self.num_free:
            return False
        table.extend(self.allocate() for _ in range(need))
        return True

    def free(self, table: list[int]) -> None:
        """Release every block of a sequence, tail first (so its tail is evicted before its head)."""
        for b in reversed(table):
            self.release(b)
        table.clear()

    def publish_full_blocks(self, tokens: Sequence[int], table: list[int], hashes: list[bytes], num_computed: int) -> None:
        """Register the blocks that became full now that ``num_computed`` tokens are in the cache."""
        bs = self.block_size
        while len(hashes) < num_computed // bs:
            i = len(hashes)
            h = block_hash(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs])
            self.register(table[i], h)
            hashes.append(h)
