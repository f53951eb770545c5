"""Paged attention: one batched forward over many sequences whose K/V live in a shared block pool.

The pool holds, per layer, ``num_blocks * block_size`` token slots of (n_kv_head, head_dim) keys and
values. A step packs the new tokens of every scheduled sequence into one row of N tokens: decodes
(one token each) first, then prefill chunks. Every matmul of the model (QKV, output projection,
feed-forward) runs once over all N tokens, so the weights are read once per step whatever the
batch size; only attention is per sequence:

* decodes: each query attends to its sequence's slots, gathered through the block table into a
  padded (B, H_kv, L, D) view with a padding mask; one SDPA call for all of them;
* a prefill chunk starting at position 0: plain causal attention over the chunk's own K/V;
* a later chunk (chunked prefill, or a prompt whose head came from the prefix cache): its queries
  attend to the gathered slots 0..end with a causal mask offset by the chunk's start.

New K/V are written into the pool with one ``index_copy_`` per layer. Logits are computed only for
the rows that get sampled (the last token of each sequence that finished its prompt), which spares
the vocabulary projection for every other prompt token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmforge.config import ConfigError, ModelConfig
from lmforge.nn.attention import attend
from lmforge.nn.positions import apply_rope

SUPPORTED_POSITIONS = ("rope", "learned", "sinusoidal", "none")


def check_servable(cfg: ModelConfig) -> None:
    """Raise ConfigError unless the paged engine can run this model."""
    if cfg.arch != "decoder":
        raise ConfigError(f"the serving engine generates with decoder-only models; this one is {cfg.arch!r} "
                          "(serve an encoder with --embedding-model instead).")  # fmt: skip
    if cfg.position not in SUPPORTED_POSITIONS:
        raise ConfigError(f"the paged engine supports {', '.join(SUPPORTED_POSITIONS)} positions, not {cfg.position!r}.")


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V that one token occupies across all layers."""
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


class PagedKVCache:
    """The K/V block pool of every layer: k[l] and v[l] are (num_blocks * block_size, H_kv, D)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device=None):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (cfg.n_layer, num_blocks * block_size, cfg.n_kv_head, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)


@dataclass
class Chunk:
    """One prefill chunk of the packed row: tokens [offset, offset + length) at positions start.."""

    offset: int
    length: int
    start: int
    k_slots: torch.Tensor | None  # (start + length,) slots of positions 0..end; None: start == 0, use own K/V


@dataclass
class StepInput:
    """Tensors for one forward over the packed tokens of a step (built by ``build_step``)."""

    input_ids: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    slots: torch.Tensor  # (N,) pool slot each new token's K/V is written to
    num_decodes: int  # the first num_decodes tokens are decodes, one per sequence
    decode_slots: torch.Tensor | None  # (B_d, L) slots of each decode's context (padded)
    decode_lens: torch.Tensor | None  # (B_d,) context length of each decode (its position + 1)
    chunks: list[Chunk] = field(default_factory=list)
    logit_rows: torch.Tensor | None = None  # (S,) rows whose logits are wanted


def _slots(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    pos = range(start, end)
    return [table[p // block_size] * block_size + p % block_size for p in pos]


def build_step(
    decodes: list[tuple[list[int], int, int]],  # (block table, position, token) per decoding sequence
    prefills: list[tuple[list[int], int, list[int]]],  # (block table, start, tokens) per prefill chunk
    logit_rows: list[int],
    block_size: int,
    device=None,
) -> StepInput:
    """Pack one step's decodes and prefill chunks into the tensors ``paged_forward`` reads."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    ctx_slots: list[list[int]] = []
    for table, pos, tok in decodes:
        ids.append(tok)
        positions.append(pos)
        s = _slots(table, 0, pos + 1, block_size)
        slots.append(s[-1])
        ctx_slots.append(s)
    decode_slots = decode_lens = None
    if decodes:
        L = max(len(s) for s in ctx_slots)
        decode_lens = torch.tensor([len(s) for s in ctx_slots], device=device)
        decode_slots = torch.tensor([s + [0] * (L - len(s)) for s in ctx_slots], device=device)  # (B, L)
    chunks: list[Chunk] = []
    for table, start, toks in prefills:
        offset, n = len(ids), len(toks)
        ids.extend(toks)
        positions.extend(range(start, start + n))
        s = _slots(table, 0, start + n, block_size)
        slots.extend(s[start:])
        k_slots = None if start == 0 else torch.tensor(s, device=device)
        chunks.append(Chunk(offset, n, start, k_slots))
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return StepInput(
        input_ids=as_long(ids), positions=as_long(positions), slots=as_long(slots), num_decodes=len(decodes),
        decode_slots=decode_slots, decode_lens=decode_lens, chunks=chunks, logit_rows=as_long(logit_rows),
    )


def _chunk_mask(start: int, length: int, window: int | None, device) -> torch.Tensor:
    q_pos = torch.arange(start, start + length, device=device)[:, None]
    k_pos = torch.arange(start + length, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= (q_pos - k_pos) < window
    return allowed[None, None]  # (1, 1, T, L)


def _decode_mask(lens: torch.Tensor, L: int, window: int | None) -> torch.Tensor | None:
    """(B, 1, 1, L) True where key position < the row's length (and within the window); None if all are."""
    k_pos = torch.arange(L, device=lens.device)[None]
    valid = k_pos < lens[:, None]
    if window is not None:
        valid &= k_pos > lens[:, None] - 1 - window
    return None if bool(valid.all()) else valid[:, None, None, :]


def _gather(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Keys or values of the slots (B, L) as a contiguous (B, H_kv, L, D) tensor. ``index_select``
    on the flattened slots is far faster on CPU than advanced indexing with a 2-D index."""
    B, L = slots.shape
    g = pool.index_select(0, slots.reshape(-1)).view(B, L, *pool.shape[1:])  # (B, L, H_kv, D)
    return g.transpose(1, 2).contiguous()


def _attention(attn, x, layer: int, cache: PagedKVCache, step: StepInput, rope, decode_mask, chunk_masks) -> torch.Tensor:
    """Self-attention of one layer over the packed tokens x (N, C), reading/writing the paged pool."""
    N = x.shape[0]
    H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    q, k, v = attn.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(N, H, D), k.view(N, Hkv, D), v.view(N, Hkv, D)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # cos/sin (N, 1, rd) broadcast over heads
    k_pool, v_pool = cache.k[layer], cache.v[layer]  # (slots, H_kv, D)
    k_pool.index_copy_(0, step.slots, k.to(k_pool.dtype))
    v_pool.index_copy_(0, step.slots, v.to(v_pool.dtype))
    outs = []
    nd = step.num_decodes
    if nd:
        qd = q[:nd].unsqueeze(2)  # (B, H, 1, D)
        kd, vd = _gather(k_pool, step.decode_slots), _gather(v_pool, step.decode_slots)  # (B, H_kv, L, D)
        y = attend(qd, kd, vd, mask=decode_mask, scale=attn.scale, impl=attn.impl)  # (B, H, 1, D)
        outs.append(y.reshape(nd, H * D))
    for c, mask in zip(step.chunks, chunk_masks):
        qc = q[c.offset : c.offset + c.length].transpose(0, 1)[None]  # (1, H, T, D)
        if mask is None:
            kc = k[c.offset : c.offset + c.length].transpose(0, 1)[None]  # (1, H_kv, T, D)
            vc = v[c.offset : c.offset + c.length].transpose(0, 1)[None]
            y = attend(qc, kc, vc, is_causal=True, scale=attn.scale, impl=attn.impl)
        else:
            ks = c.k_slots if c.k_slots is not None else step.slots[c.offset : c.offset + c.length]
            kc, vc = _gather(k_pool, ks[None]), _gather(v_pool, ks[None])  # (1, H_kv, L, D)
            y = attend(qc, kc, vc, mask=mask, scale=attn.scale, impl=attn.impl)
        outs.append(y[0].transpose(0, 1).reshape(c.length, H * D))
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    return attn.o(y)


@torch.inference_mode()
def paged_forward(model, cache: PagedKVCache, step: StepInput) -> torch.Tensor:
    """Logits (S, V) of the rows ``step.logit_rows``, after writing every new token's K/V to the pool."""
    stack = model.stack
    window = model.config.sliding_window
    h = model.embed(step.input_ids[None], step.positions[None])[0]  # (N, C)
    rope = None
    if stack.rope is not None:
        cos, sin = stack.rope(step.positions[None])  # (1, 1, N, rd)
        rope = (cos[0, 0, :, None, :], sin[0, 0, :, None, :])  # (N, 1, rd)
    decode_mask = _decode_mask(step.decode_lens, step.decode_slots.shape[1], window) if step.num_decodes else None
    chunk_masks = [
        None if c.k_slots is None and window is None else _chunk_mask(c.start, c.length, window, h.device)
        for c in step.chunks
    ]  # None: plain causal attention over the chunk's own K/V
    for i, layer in enumerate(stack.layers):
        attention = lambda x: _attention(layer.attn, x, i, cache, step, rope, decode_mask, chunk_masks)  # noqa: B023, E731
        h = layer._residual(h, layer.attn_norm, attention)
        h = layer._residual(h, layer.mlp_norm, layer.mlp)
    h = h[step.logit_rows]
    if stack.norm is not None:
        h = stack.norm(h)
    return model.lm_head(h)
