"""The KV caches that sit behind ``Attention``: a contiguous one per batch, and a paged block pool.

``KVCache``      preallocated (B, H_kv, max_len, D) keys and values of one layer for a fixed batch
                 (``generate``'s fast path: static shapes, which the compiled decode step wants).
                 ``update`` writes the new positions and returns the slots attention reads.
``PagedKVCache`` one pool of ``num_blocks * block_size`` token slots per layer, shared by every
                 sequence the serving engine runs; a sequence's block table says where its tokens
                 live (``lmforge.engine.blocks``).
``PagedBatch``   one step over the pool: the new tokens of many sequences packed into one row
                 (decodes first, one token each, then prefill chunks), where each token's K/V is
                 written, and what each query reads. The model runs its ordinary forward over the
                 packed row, (1, N) tokens; every matmul sees all N tokens at once and only the
                 attention itself, ``PagedBatch.layer(i).attend``, is per sequence:

  * decodes: each query attends to its sequence's slots, gathered through the block table into a
    padded (B, H_kv, L, D) view with a length mask: one attention call for all of them;
  * a prefill chunk at position 0 (no bias, no window): causal attention over its own K/V;
  * a later chunk (chunked prefill, or a prompt whose head came from the prefix cache): its
    queries attend to the gathered slots 0..end, causally, offset by the chunk's start.

Positional biases (ALiBi, T5's relative buckets) and the sliding window are computed per sequence
from the positions here, with the model's own bias module (``prepare``). Encoder-decoder models
also get each sequence's cross-attention keys and values (computed once from its encoder output).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


class KVCache(nn.Module):
    """Preallocated keys and values of one layer, holding only the KV heads (GQA).

    ``update(input_pos, k, v, n_slots)`` writes the new positions in place and returns the first
    ``n_slots`` slots of the buffers (all of them by default) as views: no allocation per step,
    and the buffers' shapes stay static, which ``torch.compile`` wants. Attention reads as many
    slots as its mask covers, so a decode step costs what has been written, not the whole buffer.
    """

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype=torch.float32, device=None):
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def reorder(self, index: torch.Tensor) -> None:
        """Batch row i becomes row ``index[i]`` of before (beam search keeps the surviving beams)."""
        self.k.copy_(self.k[index])
        self.v.copy_(self.v[index])

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               n_slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k[:, :, :n_slots], self.v[:, :, :n_slots]


class PagedKVCache:
    """The K/V block pool of every layer: k[l] and v[l] are (num_blocks * block_size, H_kv, D).

    One tensor per layer rather than slices of one: a compiled step writes each in place, where
    a write through a slice of a larger input would make inductor copy the whole pool."""

    def __init__(self, n_layer: int, n_kv_head: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device=None):  # fmt: skip
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks * block_size, n_kv_head, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy blocks ``src`` to blocks ``dst`` in every layer (a forked sequence's copy-on-write)."""
        bs = self.block_size
        device = self.k[0].device
        offsets = torch.arange(bs, device=device)
        to = (torch.tensor(dst, device=device)[:, None] * bs + offsets).flatten()
        frm = (torch.tensor(src, device=device)[:, None] * bs + offsets).flatten()
        with torch.inference_mode():
            for k, v in zip(self.k, self.v):
                k[to] = k[frm]
                v[to] = v[frm]

    @staticmethod
    def bytes_per_token(n_layer: int, n_kv_head: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        return 2 * n_layer * n_kv_head * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class Chunk:
    """One prefill chunk of the packed row: tokens [offset, offset + length) at positions start.."""

    offset: int
    length: int
    start: int
    k_slots: torch.Tensor | None  # (start + length,) slots of positions 0..end; None: start == 0
    mask: torch.Tensor | None = None  # (1, 1, T, L), set by prepare; None: causal over its own K/V
    bias: torch.Tensor | None = None  # (1, H, T, L) positional bias


@dataclass
class PagedBatch:
    """One forward's tokens over a ``PagedKVCache`` (built by ``lmforge.engine.runner.build_batch``)."""

    pool: PagedKVCache
    input_ids: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    slots: torch.Tensor  # (N,) pool slot each new token's K/V is written to
    num_decodes: int  # the first num_decodes tokens are decodes, one per sequence
    decode_slots: torch.Tensor | None  # (B_d, L) slots of each decode's context (padded)
    decode_lens: torch.Tensor | None  # (B_d,) context length of each decode (its position + 1)
    chunks: list[Chunk] = field(default_factory=list)
    logit_rows: torch.Tensor | None = None  # (S,) rows whose logits are wanted; None: all
    cross: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None  # per segment, per layer: (1, H_kv, S, D) K, V
    decode_mask: torch.Tensor | None = None  # (B_d, 1, 1, L), set by prepare
    always_mask: bool = False  # keep the decode mask even when it covers every slot (a compiled graph: no branch on data)
    decode_bias: torch.Tensor | None = None  # (B_d, H, 1, L)

    def prepare(self, bias_fn: Callable | None, window: int | None) -> None:
        """Masks and positional biases of every sequence, once per forward (the stack calls this
        with its ALiBi / T5 bias module and sliding window)."""
        device = self.input_ids.device
        if self.num_decodes:
            L = self.decode_slots.shape[1]
            k_pos = torch.arange(L, device=device)[None]
            valid = k_pos < self.decode_lens[:, None]
            if window is not None:
                valid &= k_pos > self.decode_lens[:, None] - 1 - window
            self.decode_mask = valid[:, None, None, :] if self.always_mask or not bool(valid.all()) else None
            if bias_fn is not None:
                bias = bias_fn(self.decode_lens - 1, torch.arange(L, device=device))  # (1, H, B_d, L)
                self.decode_bias = bias[0].transpose(0, 1).unsqueeze(2)
        for c in self.chunks:
            if c.k_slots is None and window is None and bias_fn is None:
                continue  # plain causal attention over the chunk's own K/V
            q_pos = torch.arange(c.start, c.start + c.length, device=device)
            k_pos = torch.arange(c.start + c.length, device=device)
            allowed = k_pos[None, :] <= q_pos[:, None]
            if window is not None:
                allowed &= (q_pos[:, None] - k_pos[None, :]) < window
            c.mask = allowed[None, None]
            c.bias = bias_fn(q_pos, k_pos) if bias_fn is not None else None

    def layer(self, i: int) -> "PagedLayer":
        return PagedLayer(self, i)

    def cross_layer(self, i: int) -> "PagedCross":
        return PagedCross(self, i)


def _gather(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Keys or values of the slots (B, L) as a contiguous (B, H_kv, L, D) tensor. ``index_select``
    on the flattened slots is far faster on CPU than advanced indexing with a 2-D index."""
    B, L = slots.shape
    g = pool.index_select(0, slots.reshape(-1)).view(B, L, *pool.shape[1:])  # (B, L, H_kv, D)
    return g.transpose(1, 2).contiguous()


class PagedLayer:
    """Self-attention of one layer over a paged batch: writes the new K/V, attends per sequence."""

    paged = True

    def __init__(self, batch: PagedBatch, layer: int):
        self.batch, self.index = batch, layer

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: Callable, **kw) -> torch.Tensor:
        """q (1, H, N, D), k and v (1, H_kv, N, D) of the packed tokens -> (1, H, N, D).
        ``attend`` is the attention function (``lmforge.nn.attention.attend``), ``kw`` its options."""
        b = self.batch
        k_pool, v_pool = b.pool.k[self.index], b.pool.v[self.index]  # (slots, H_kv, D)
        k_pool.index_copy_(0, b.slots, k[0].transpose(0, 1).to(k_pool.dtype))
        v_pool.index_copy_(0, b.slots, v[0].transpose(0, 1).to(v_pool.dtype))
        outs = []
        nd = b.num_decodes
        if nd:
            qd = q[0, :, :nd].transpose(0, 1).unsqueeze(2)  # (B_d, H, 1, D)
            kd, vd = _gather(k_pool, b.decode_slots), _gather(v_pool, b.decode_slots)  # (B_d, H_kv, L, D)
            y = attend(qd, kd, vd, mask=b.decode_mask, bias=b.decode_bias, **kw)  # (B_d, H, 1, D)
            outs.append(y[:, :, 0].transpose(0, 1))  # (H, B_d, D)
        for c in b.chunks:
            qc = q[:, :, c.offset : c.offset + c.length]  # (1, H, T, D)
            if c.mask is None:
                kc, vc = k[:, :, c.offset : c.offset + c.length], v[:, :, c.offset : c.offset + c.length]
                y = attend(qc, kc, vc, is_causal=True, **kw)
            else:
                ks = c.k_slots if c.k_slots is not None else b.slots[c.offset : c.offset + c.length]
                kc, vc = _gather(k_pool, ks[None]), _gather(v_pool, ks[None])  # (1, H_kv, L, D)
                y = attend(qc, kc, vc, mask=c.mask, bias=c.bias, **kw)
            outs.append(y[0])  # (H, T, D)
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))[None]


class PagedCross:
    """Cross-attention of one decoder layer over a paged batch: each sequence's queries attend to
    the keys and values of its own encoder output."""

    paged = True

    def __init__(self, batch: PagedBatch, layer: int):
        self.batch, self.index = batch, layer

    def attend(self, q: torch.Tensor, k, v, attend: Callable, **kw) -> torch.Tensor:
        b = self.batch
        spans = [(i, 1) for i in range(b.num_decodes)] + [(c.offset, c.length) for c in b.chunks]
        outs = []
        for (offset, length), per_layer in zip(spans, b.cross):
            mk, mv = per_layer[self.index]  # (1, H_kv, S, D)
            outs.append(attend(q[:, :, offset : offset + length], mk, mv, **kw)[0])  # (H, T, D)
        return torch.cat(outs, dim=1)[None]
