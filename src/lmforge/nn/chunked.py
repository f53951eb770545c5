"""Chunked (online-softmax) attention: the FlashAttention algorithm in plain PyTorch.

Exact ``softmax(Q Kᵀ · scale, masked) · V`` without ever holding the (Tq, Tk) score matrix. Queries
are cut into tiles of ``block_q`` rows and keys into tiles of ``block_k`` columns; for one query tile
the key tiles are visited in order while three running quantities are kept per row:

    m   = the largest score seen so far            (B, Hkv, G·bq)
    l   = Σ exp(score − m) over the keys seen so far
    acc = Σ exp(score − m) · v                      (B, Hkv, G·bq, D)

When a new tile raises the maximum to m', the old sums are rescaled by exp(m − m') (Milakov &
Gimelshein 2018, "online softmax"); after the last tile the output is acc / l. Only
``lse = m + log l`` per row is saved for the backward pass (``ChunkedAttention`` below), which
recomputes each tile's probabilities from it instead of storing them (Dao et al. 2022, FlashAttention;
the dq/dk/dv recurrences are FlashAttention-2's). Extra memory is therefore O(tile² + T·D): linear in
the sequence length, where the textbook formula needs O(T²).

Masks, cheapest first (all may combine): ``is_causal`` (queries are the last Tq of the Tk positions,
as in ``attention.causal_mask``), ``window`` (keys at most window−1 positions back), ``key_valid``
(B, Tk) padding, and a dense boolean ``mask`` broadcastable to (B, H, Tq, Tk) for anything else.
With the structured ones a query always sees itself, as in ``attention.build_mask``. Key tiles that
the causal / window rules hide completely are never visited. GQA: the H/Hkv query heads of a group
are stacked as extra rows against their shared K/V head, so K and V are never repeated.
"""

from __future__ import annotations

import math

import torch

from lmforge.errors import UserError


class AttentionInputError(UserError, ValueError):
    """Attention arguments that cannot work together (one sentence naming the fix)."""


# --- merging partial results -------------------------------------------------------------------
def merge_partials(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attentions of the same queries over disjoint key sets into the attention over
    their union: weights exp(lse_i − lse). ``o`` (..., T, D), ``lse`` (..., T); an empty key set
    has lse = −inf and contributes nothing."""
    lse = torch.logaddexp(lse1, lse2)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w1, w2 = torch.exp(lse1 - safe)[..., None], torch.exp(lse2 - safe)[..., None]
    return w1 * o1 + w2 * o2, lse


# --- the tiling -------------------------------------------------------------------------------
class _Tiling:
    """Which key tiles a query tile visits, and the boolean mask of one (query tile, key tile) pair."""

    def __init__(self, Tq, Tk, G, *, is_causal, window, key_valid, mask, block_q, block_k, device):
        self.Tq, self.Tk, self.G = Tq, Tk, G
        self.is_causal, self.window, self.key_valid, self.mask = is_causal, window, key_valid, mask
        self.block_q, self.block_k = block_q, block_k
        self.offset = Tk - Tq  # query i sits at position offset + i
        self.structured = is_causal or window is not None or key_valid is not None
        self.q_pos = torch.arange(Tq, device=device) + self.offset
        self.k_pos = torch.arange(Tk, device=device)

    def q_tiles(self):
        for i0 in range(0, self.Tq, self.block_q):
            yield i0, min(i0 + self.block_q, self.Tq)

    def k_tiles(self, i0: int, i1: int):
        lo, hi = 0, self.Tk
        if self.is_causal:  # keys after the tile's last query are hidden
            hi = min(hi, self.offset + i1)
        if self.window is not None:  # keys more than window-1 before the tile's first query are hidden
            lo = max(lo, self.offset + i0 - self.window + 1)
        start = (lo // self.block_k) * self.block_k
        for j0 in range(start, hi, self.block_k):
            yield j0, min(j0 + self.block_k, hi)

    def tile_mask(self, i0, i1, j0, j1) -> torch.Tensor | None:
        """(B|1, Hkv|1, G·bq, bk) boolean, or None when the whole tile is visible."""
        allowed = None
        if self.structured:
            qp, kp = self.q_pos[i0:i1, None], self.k_pos[None, j0:j1]  # (bq, 1), (1, bk)
            rule = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool, device=qp.device)
            needs = False
            if self.is_causal and j1 - 1 > self.offset + i0:  # tile crosses the diagonal
                rule, needs = rule & (kp <= qp), True
            if self.window is not None and j0 <= self.offset + i1 - 1 - self.window:
                rule, needs = rule & ((qp - kp) < self.window), True
            if self.key_valid is not None:
                rule, needs = rule[None] & self.key_valid[:, None, j0:j1], True  # (B, bq, bk)
            if needs:
                rule = rule | (kp == qp)  # a query always sees itself (attention.build_mask)
                if rule.dim() == 2:
                    rule = rule[None]
                allowed = rule[:, None, None].expand(-1, 1, self.G, -1, -1)  # (B|1, 1, G, bq, bk)
        if self.mask is not None:
            m = self.mask[..., i0:i1, j0:j1]  # (B|1, Hkv|1, G|1, bq, bk)
            allowed = m if allowed is None else allowed & m
        if allowed is None:
            return None
        shape = allowed.shape
        allowed = allowed.expand(*shape[:2], self.G, *shape[3:])
        return allowed.reshape(shape[0], shape[1], self.G * (i1 - i0), j1 - j0)


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Tiles are computed in fp32 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rows(x: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
    """(B, Hkv, G, Tq, ·) -> the tile's rows stacked as (B, Hkv, G·bq, ·), in fp32 or fp64."""
    B, Hkv, G = x.shape[:3]
    return _acc(x[:, :, :, i0:i1].reshape(B, Hkv, G * (i1 - i0), *x.shape[4:]))


_NEG = -1e30  # "minus infinity" for running maxima: finite, so that differences of two stay finite


class _Scratch:
    """One reusable buffer per role, sized for the largest tile: a fresh (bq, bk) tensor per tile
    would cost page faults on every allocation, which measured slower than the arithmetic on CPU."""

    def __init__(self, like: torch.Tensor):
        self.like, self.buffers = like, {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n:
            buf = self.buffers[name] = torch.empty(n, dtype=self.like.dtype, device=self.like.device)
        return buf[:n].view(shape)


def _scores(qi, kj, allowed, out):
    """Scores of one tile into ``out``; ``qi`` is already multiplied by the scale."""
    torch.matmul(qi, kj.transpose(-2, -1), out=out)  # (B, Hkv, G·bq, bk)
    if allowed is not None:
        out.masked_fill_(~allowed, float("-inf"))
    return out


def _forward(q, k, v, scale, tiling: _Tiling):
    """Outputs (B, Hkv, G, Tq, D) and row log-sum-exps (B, Hkv, G, Tq)."""
    B, Hkv, G, Tq, D = q.shape
    Dv = v.shape[-1]
    out = torch.empty(B, Hkv, G, Tq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hkv, G, Tq, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    v1 = _acc(v)
    scratch = _Scratch(lse)
    for i0, i1 in tiling.q_tiles():
        qi = _rows(q, i0, i1) * scale  # (B, Hkv, G·bq, D)
        rows = qi.shape[2]
        # the running max starts at a very negative finite number rather than -inf, so that rows with
        # nothing visible yet need no special case: exp(-inf - m) = 0 and exp(m_old - m_new) is finite
        m = torch.full(qi.shape[:-1], _NEG, dtype=qi.dtype, device=q.device)  # (B, Hkv, G·bq)
        acc = torch.zeros(*qi.shape[:-1], Dv, dtype=qi.dtype, device=q.device)  # Σ p·v
        l = torch.zeros_like(m)  # noqa: E741  Σ p
        acc3 = acc.view(-1, rows, Dv)
        for j0, j1 in tiling.k_tiles(i0, i1):
            s = _scores(qi, _acc(k[:, :, j0:j1]), tiling.tile_mask(i0, i1, j0, j1),
                        scratch.get("s", B, Hkv, rows, j1 - j0))  # fmt: skip
            m_new = torch.maximum(m, s.amax(-1))
            p = s.sub_(m_new[..., None]).exp_()  # in place: the scores are not needed again
            alpha = torch.exp(m - m_new)  # rescales what was summed under the old maximum
            l = l * alpha + p.sum(-1)  # noqa: E741
            acc.mul_(alpha[..., None])
            acc3.baddbmm_(p.view(-1, rows, j1 - j0), v1[:, :, j0:j1].reshape(-1, j1 - j0, Dv))
            m = m_new
        o = acc / l.clamp(min=1e-30)[..., None]  # rows with no visible key give 0 (their lse is -inf)
        out[:, :, :, i0:i1] = o.view(B, Hkv, G, i1 - i0, Dv).to(q.dtype)
        lse[:, :, :, i0:i1] = (m + torch.log(l)).view(B, Hkv, G, i1 - i0)
    return out, lse


def _backward(q, k, v, out, lse, dout, dlse, scale, tiling: _Tiling):
    """FlashAttention-2's backward: each tile's probabilities are recomputed from the saved lse.

    With a gradient on lse too (when partial results are merged), ∂lse_i/∂s_ij = P_ij adds dlse_i
    to every dP_ij, i.e. it is subtracted from Δ_i."""
    B, Hkv, G, Tq, D = q.shape
    dq, dk, dv = (torch.zeros(x.shape, dtype=lse.dtype, device=x.device) for x in (q, k, v))  # contiguous
    delta = (_acc(dout) * _acc(out)).sum(-1)  # (B, Hkv, G, Tq): Σ_j P_ij dP_ij = dO_i · O_i
    if dlse is not None:
        delta = delta - torch.where(torch.isinf(lse), torch.zeros_like(lse), _acc(dlse))
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # empty rows: every p is exp(-inf) = 0
    scratch = _Scratch(lse)
    for i0, i1 in tiling.q_tiles():
        qi, doi = _rows(q, i0, i1) * scale, _rows(dout, i0, i1)  # (B, Hkv, G·bq, D)
        lse_i, delta_i = _rows(lse, i0, i1)[..., None], _rows(delta, i0, i1)[..., None]  # (B, Hkv, G·bq, 1)
        rows = qi.shape[2]
        dqi = torch.zeros(qi.shape, dtype=qi.dtype, device=qi.device)  # contiguous, whatever q's layout
        for j0, j1 in tiling.k_tiles(i0, i1):
            kj, vj = _acc(k[:, :, j0:j1]), _acc(v[:, :, j0:j1])
            shape = (B, Hkv, rows, j1 - j0)
            p = _scores(qi, kj, tiling.tile_mask(i0, i1, j0, j1), scratch.get("p", *shape))
            p.sub_(lse_i).exp_()  # P, recomputed
            bk = j1 - j0
            p3, q3, do3 = p.view(-1, rows, bk), qi.reshape(-1, rows, D), doi.reshape(-1, rows, doi.shape[-1])
            # accumulate in place: dV_j += Pᵀ dO (summed over the group's rows), (B·Hkv, bk, Dv)
            dv[:, :, j0:j1].view(-1, bk, dv.shape[-1]).baddbmm_(p3.transpose(-2, -1), do3)
            ds = torch.matmul(doi, vj.transpose(-2, -1), out=scratch.get("ds", *shape))  # dP
            ds3 = ds.sub_(delta_i).mul_(p).view(-1, rows, bk)  # dS = P ∘ (dP − Δ)
            dqi.view(-1, rows, D).baddbmm_(ds3, kj.reshape(-1, bk, D))
            dk[:, :, j0:j1].view(-1, bk, D).baddbmm_(ds3.transpose(-2, -1), q3)  # qi carries the scale already
        dq[:, :, :, i0:i1] = (dqi * scale).view(B, Hkv, G, i1 - i0, D)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class ChunkedAttention(torch.autograd.Function):
    """Forward keeps only (out, lse); backward recomputes the tiles. q (B, Hkv, G, Tq, D)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, tiling):
        out, lse = _forward(q, k, v, scale, tiling)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)  # dlse is None unless lse was used
        ctx.scale, ctx.tiling = scale, tiling
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, ctx.scale, ctx.tiling)
        return dq, dk, dv, None, None


# --- public entry point --------------------------------------------------------------------------
def chunked_attention(
    q: torch.Tensor,  # (B, H, Tq, D)
    k: torch.Tensor,  # (B, Hkv, Tk, D)
    v: torch.Tensor,  # (B, Hkv, Tk, Dv)
    *,
    mask: torch.Tensor | None = None,  # bool, broadcastable to (B, H, Tq, Tk), True = may attend
    is_causal: bool = False,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,  # (B, Tk) False at padding
    scale: float | None = None,
    block_q: int = 1024,
    block_k: int = 1024,
    return_lse: bool = False,
):
    """Exact attention in tiles; equals ``attention.reference_attention`` under the same mask.

    Returns (B, H, Tq, Dv), and with ``return_lse`` also the row log-sum-exps (B, H, Tq) so that
    partial results over disjoint key sets can be merged (``merge_partials``)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if H % Hkv:
        raise AttentionInputError(f"{H} query heads cannot share {Hkv} key/value heads: H must be a multiple of Hkv.")
    if block_q < 1 or block_k < 1:
        raise AttentionInputError(f"block_q={block_q} and block_k={block_k} must be positive tile sizes.")
    if window is not None and window < 1:
        raise AttentionInputError(f"window={window} must be a positive number of positions, or None.")
    if window is not None and window >= Tk:
        raise AttentionInputError(f"window={window} is not smaller than the sequence ({Tk} keys), so it hides nothing: "
                                  "pass window=None, or a window below the sequence length.")  # fmt: skip
    if is_causal and Tq > Tk:
        raise AttentionInputError(f"causal attention needs at least as many keys as queries, got Tq={Tq} > Tk={Tk}.")
    G = H // Hkv
    if mask is not None:  # (B|1, H|1, Tq, Tk) -> (B|1, Hkv|1, G|1, Tq, Tk)
        mask = mask.bool()
        while mask.dim() < 4:
            mask = mask[None]
        mb, mh = mask.shape[:2]
        mask = mask.expand(mb, mh, Tq, Tk)
        mask = mask.reshape(mb, Hkv, G, Tq, Tk) if mh == H and H > 1 else mask[:, :, None]
    if key_valid is not None:
        key_valid = key_valid.bool()
    tiling = _Tiling(Tq, Tk, G, is_causal=is_causal, window=window, key_valid=key_valid, mask=mask,
                     block_q=block_q, block_k=block_k, device=q.device)  # fmt: skip
    scale = D**-0.5 if scale is None else scale
    qg = q.view(B, Hkv, G, Tq, D)  # the group's query heads share one K/V head
    out, lse = ChunkedAttention.apply(qg, k, v, scale, tiling)
    out = out.view(B, H, Tq, -1)
    return (out, lse.view(B, H, Tq)) if return_lse else out
