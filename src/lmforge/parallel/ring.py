"""Ring attention (Liu et al. 2023) on torch.distributed: exact causal attention over a sequence
split across the N ranks of a process group.

Layout (zig-zag, for load balance). The sequence of T tokens is cut into 2N chunks of c = T/2N;
rank r holds chunks r and 2N-1-r, one early and one late, so every rank has the same amount of
causal work:

    N = 2:   chunks  0 1 2 3    rank 0: [0, 3]    rank 1: [1, 2]

Forward. Each rank keeps its queries and passes its K/V block to the next rank of the ring
(r -> r+1) while it computes with the block it holds; after N steps every query has seen every
key. Per step only one of three shapes of work is needed (the zig-zag makes each half the size
of the diagonal one):

    own block (src == r)   both local chunks against both:      causal within the 2c local tokens
    src < r                both local chunks against chunk src:  full (chunk 2N-1-src is in the future)
    src > r                local chunk 2N-1-r against both:      full (local chunk r sees neither)

Partial results are merged with the online softmax: with log-sum-exp ``lse`` of the scores so far,

    lse' = log(exp(lse) + exp(lse_blk)),   out' = out·exp(lse - lse') + out_blk·exp(lse_blk - lse')

Backward (FlashAttention-2 style, nothing T×T stored): with the saved ``out`` and ``lse``, each
block's probabilities are recomputed, ``dQ`` accumulates locally, and the block's ``dK``/``dV``
accumulators travel around the ring with its K/V, arriving back at the owner after N hops.
Sends and receives are posted with ``batch_isend_irecv`` before the step's compute and waited
after it, so communication overlaps computation. GQA: K/V circulate with their own (fewer)
heads; query heads of one group share them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lmforge.errors import UserError


class ContextParallelError(UserError, ValueError):
    """A sequence or setting that ring attention cannot split."""


# --- the zig-zag layout --------------------------------------------------------------------------
def _ring(group) -> tuple[int, int]:
    """(this rank's place, ring size) in ``group``; (0, 1) without torch.distributed."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_divisible(seq_len: int, world: int) -> None:
    if seq_len % (2 * world):
        raise ContextParallelError(
            f"a sequence of {seq_len} tokens cannot be split over context-parallel degree {world}: "
            f"it must be a multiple of 2 x {world} = {2 * world} (the zig-zag layout cuts it into that many "
            f"chunks); choose a block size or degree that divides."
        )


def zigzag_indices(seq_len: int, world: int, rank: int, device=None) -> torch.Tensor:
    """The global positions (2c,) rank ``rank`` holds: chunk rank, then chunk 2*world-1-rank."""
    check_divisible(seq_len, world)
    c = seq_len // (2 * world)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c, device=device)
    return torch.cat([first, second])


def zigzag_shard(x: torch.Tensor, world: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's zig-zag part of ``x`` along ``dim`` (a copy, contiguous)."""
    idx = zigzag_indices(x.shape[dim], world, rank, x.device)
    return x.index_select(dim, idx)


def zigzag_unshard(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of ``zigzag_shard``: the full tensor from the parts of ranks 0..N-1."""
    world = len(parts)
    halves = [p.chunk(2, dim=dim) for p in parts]
    ordered = [halves[r][0] for r in range(world)] + [halves[r][1] for r in reversed(range(world))]
    return torch.cat(ordered, dim=dim)


# --- one block of attention, forward and backward ------------------------------------------------
def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)  # (B, Hkv, Tk, D) -> (B, H, Tk, D)


def _reduce_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return t
    B, H, T, D = t.shape
    return t.view(B, H // groups, groups, T, D).sum(2)  # (B, H, Tk, D) -> (B, Hkv, Tk, D)


def _scores(q, k, scale, causal):
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if causal:  # the own block: local positions ascend, so the local triangle is the global mask
        tq, tk = s.shape[-2:]
        keep = torch.ones(tq, tk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return s


def block_forward(q, k, v, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, H, Tq, D) over one K/V block (B, Hkv, Tk, D): (out (B, H, Tq, D), lse (B, H, Tq))."""
    groups = q.shape[1] // k.shape[1]
    s = _scores(q, _expand_kv(k, groups), scale, causal)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Tq)
    p = torch.exp(s - lse[..., None])
    return p @ _expand_kv(v, groups), lse


def block_backward(q, k, v, dout, lse, delta, scale: float, causal: bool):
    """Gradients of one block given the merged softmax statistics: (dq, dk, dv) with K/V's own heads."""
    groups = q.shape[1] // k.shape[1]
    ke, ve = _expand_kv(k, groups), _expand_kv(v, groups)
    p = torch.exp(_scores(q, ke, scale, causal) - lse[..., None])  # (B, H, Tq, Tk): final probabilities
    dv = p.transpose(-2, -1) @ dout  # (B, H, Tk, D)
    ds = p * (dout @ ve.transpose(-2, -1) - delta[..., None])  # softmax backward
    dq = (ds @ ke) * scale
    dk = (ds.transpose(-2, -1) @ q) * scale
    return dq, _reduce_kv(dk, groups), _reduce_kv(dv, groups)


def merge(out, lse, blk_out, blk_lse) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax merge of two partial attentions over disjoint key sets."""
    new = torch.logaddexp(lse, blk_lse)
    out = out * torch.exp(lse - new)[..., None] + blk_out * torch.exp(blk_lse - new)[..., None]
    return out, new


# --- the ring ------------------------------------------------------------------------------------
class _Ring:
    """Point-to-point exchange with the neighbours of a ring: send to r+1, receive from r-1."""

    def __init__(self, group, rank: int, world: int):
        self.group = group
        self.next = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
        self.prev = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world

    def start(self, send: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Post the send of ``send`` and the receive of the same-shaped buffer from the previous rank."""
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, self.next, self.group), dist.P2POp(dist.irecv, recv, self.prev, self.group)]
        return recv, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(works: list) -> None:
        for w in works:
            w.wait()


def _work_shape(rank: int, src: int, causal: bool, half: int):
    """(query slice, key slice, causal mask?) of the block from ``src``; None when nothing is seen."""
    everything = slice(None)
    if not causal:
        return everything, everything, False
    if src == rank:
        return everything, everything, True
    if src < rank:  # its early chunk lies before both of ours, its late chunk after both
        return everything, slice(0, half), False
    return slice(half, None), everything, False  # src > rank: only our late chunk sees it, all of it


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, group):
        rank, world = _ring(group)
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        qc = q.to(compute)
        B, H, T, D = q.shape
        half = T // 2
        out = torch.zeros(B, H, T, D, dtype=compute, device=q.device)
        lse = torch.full((B, H, T), float("-inf"), dtype=compute, device=q.device)
        ring = _Ring(group, rank, world) if world > 1 else None
        kv = torch.stack([k, v])  # (2, B, Hkv, T, D): one message per step
        for step in range(world):
            if step < world - 1:
                incoming, works = ring.start(kv)
            qs, ks, masked = _work_shape(rank, (rank - step) % world, causal, half)
            kb, vb = kv[0][:, :, ks].to(compute), kv[1][:, :, ks].to(compute)
            blk_out, blk_lse = block_forward(qc[:, :, qs], kb, vb, scale, masked)
            out[:, :, qs], lse[:, :, qs] = merge(out[:, :, qs], lse[:, :, qs], blk_out, blk_lse)
            if step < world - 1:
                ring.wait(works)
                kv = incoming
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.causal, ctx.group = scale, causal, group
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale, causal, group = ctx.scale, ctx.causal, ctx.group
        rank, world = _ring(group)
        compute = out.dtype
        qc, do = q.to(compute), dout.to(compute)
        half = q.shape[2] // 2
        delta = (do * out).sum(-1)  # (B, H, T): rowsum(dO ∘ O), the softmax backward's correction
        dq = torch.zeros_like(qc)
        ring = _Ring(group, rank, world) if world > 1 else None
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=compute, device=q.device)  # accumulator of the block held
        dkv_works: list = []
        for step in range(world):
            if step < world - 1:
                next_kv, kv_works = ring.start(kv)
            qs, ks, masked = _work_shape(rank, (rank - step) % world, causal, half)
            local = torch.zeros_like(dkv)  # this rank's share, computed while the accumulator travels
            dq_b, dk_b, dv_b = block_backward(
                qc[:, :, qs], kv[0][:, :, ks].to(compute), kv[1][:, :, ks].to(compute),
                do[:, :, qs], lse[:, :, qs], delta[:, :, qs], scale, masked,
            )  # fmt: skip
            dq[:, :, qs] += dq_b
            local[0][:, :, ks] += dk_b
            local[1][:, :, ks] += dv_b
            if world > 1:
                _Ring.wait(dkv_works)  # the accumulator for this block, from the previous rank
                sending = dkv + local  # held until its send completes
                dkv, dkv_works = ring.start(sending)
            else:
                dkv = local
            if step < world - 1:
                _Ring.wait(kv_works)
                kv = next_kv
        _Ring.wait(dkv_works)  # after N hops each accumulator is back with the rank that owns its K/V
        dk, dv = dkv[0].to(k.dtype), dkv[1].to(v.dtype)
        return dq.to(q.dtype), dk, dv, None, None, None


def ring_attention(
    q: torch.Tensor,  # (B, H, Tl, D) this rank's zig-zag shard of the queries
    k: torch.Tensor,  # (B, Hkv, Tl, D)
    v: torch.Tensor,  # (B, Hkv, Tl, D)
    *,
    causal: bool = True,
    scale: float | None = None,
    group=None,
) -> torch.Tensor:
    """Exact attention over the whole sequence from this rank's zig-zag shard (see the module
    docstring); returns this rank's shard of the output (B, H, Tl, D). ``group``: the ring's
    process group (default: all processes). Differentiable in q, k and v."""
    _, world = _ring(group)
    if q.shape[2] % 2:
        raise ContextParallelError(
            f"a rank's shard has {q.shape[2]} tokens, an odd number, but the zig-zag layout gives every rank "
            f"two equal chunks; shard the sequence with zigzag_shard over {world} ranks."
        )
    if q.shape[1] % k.shape[1]:
        raise ContextParallelError(f"{q.shape[1]} query heads cannot share {k.shape[1]} K/V heads; use a divisor.")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return RingAttention.apply(q, k.contiguous(), v.contiguous(), scale, causal, group)


class RingAttend:
    """A callable with ``attend``'s signature that runs ring attention in ``group``: the model's
    attention modules use it as their implementation under context parallelism."""

    def __init__(self, group=None):
        self.group = group

    def __call__(self, q, k, v, mask=None, bias=None, is_causal=False, scale=None, dropout_p=0.0):
        if mask is not None or bias is not None or dropout_p > 0:
            raise ContextParallelError(
                "ring attention supports plain causal or full attention only (no padding mask, sliding window, "
                "ALiBi/T5 bias or attention dropout); train without them or with context_parallel=1."
            )
        return ring_attention(q, k, v, causal=is_causal, scale=scale, group=self.group)
