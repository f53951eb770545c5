"""Block-sparse attention: sliding window, Sparse Transformer's strided and fixed patterns, global tokens.

A pattern says which keys j each query i may see (token level, ``sparse_mask`` draws it densely):

    local    0 ≤ i − j < window  (bidirectional: |i − j| < window)              Longformer's window
    strided  0 ≤ i − j < stride,  or  i − j a multiple of stride                 Child et al. 2019
    fixed    j in i's block of ``stride`` positions (j ≤ i), or j among the last
             ``summary`` positions of any earlier block                          Child et al. 2019
    global_tokens (any pattern)  these positions see every key and every query sees them
                                                                             Longformer / BigBird

``sparse_attention`` never computes a masked-out block. It splits the pattern into disjoint parts,
each a dense computation on gathered keys only, and merges them with their log-sum-exps (the
online-softmax merge of ``chunked.merge_partials``), which gives exactly the softmax over the union:

    band     query block b (``block`` rows) against the few key blocks around it, gathered with
             ``unfold``: cost T · (window + block) instead of T²
    columns  strided only: reshaping the sequence to (T/stride, stride) puts i − j ≡ 0 (mod stride)
             in one column, so the column part is a small causal attention per column: cost T²/stride
    shared   key positions every query may see (fixed's summaries, global tokens): one gather
    rows     global queries attend to all keys densely: cost |global| · T
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.nn.chunked import AttentionInputError, chunked_attention, merge_partials

PATTERNS = ("local", "strided", "fixed")


@dataclass(frozen=True)
class SparsePattern:
    """Which keys each query sees; ``block`` is the tile of the block-sparse computation."""

    pattern: str = "local"
    window: int = 256  # local: keys at most window−1 positions back
    stride: int = 128  # strided: the local span and the column step; fixed: the block length
    summary: int = 1  # fixed: the last `summary` positions of each block are seen by all later queries
    global_tokens: tuple[int, ...] = ()  # positions that attend to, and are attended by, everything
    causal: bool = True
    block: int = 64

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise AttentionInputError(f"unknown sparse pattern {self.pattern!r}; choose one of {', '.join(PATTERNS)}.")
        for name in ("window", "stride", "summary", "block"):
            if getattr(self, name) < 1:
                raise AttentionInputError(f"sparse attention's {name}={getattr(self, name)} must be at least 1.")
        if self.pattern != "local" and not self.causal:
            raise AttentionInputError(f"the {self.pattern} pattern is causal (Sparse Transformer); "
                                      "use pattern='local' for bidirectional attention.")  # fmt: skip
        if self.pattern == "fixed":
            if self.stride % self.block:
                raise AttentionInputError(f"block={self.block} does not divide the fixed pattern's stride={self.stride}: "
                                          "choose a block size that divides the stride.")  # fmt: skip
            if self.summary > self.stride:
                raise AttentionInputError(f"summary={self.summary} cannot exceed the fixed pattern's stride={self.stride}.")
        object.__setattr__(self, "global_tokens", tuple(sorted(set(int(g) for g in self.global_tokens))))

    @classmethod
    def from_options(cls, options: dict | None, causal: bool = True) -> "SparsePattern":
        """From ``ModelConfig.attention_options`` (unknown keys refused with the known ones)."""
        options = dict(options or {})
        known = {"pattern", "window", "stride", "summary", "global_tokens", "block"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise AttentionInputError(f"unknown sparse attention option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        options["global_tokens"] = tuple(options.get("global_tokens", ()))
        return cls(causal=causal, **options)

    # --- the token-level rules (also the dense reference) ------------------------------------------
    def band(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        d = i - j
        if self.pattern == "local":
            return (d >= 0) & (d < self.window) if self.causal else d.abs() < self.window
        if self.pattern == "strided":
            return (d >= 0) & (d < self.stride)
        return (d >= 0) & (torch.div(i, self.stride, rounding_mode="floor") == torch.div(j, self.stride, rounding_mode="floor"))

    def column(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """strided: i − j a positive multiple of the stride (the part the band does not cover)."""
        d = i - j
        if self.pattern != "strided":
            return torch.zeros(torch.broadcast_shapes(d.shape), dtype=torch.bool, device=d.device)
        return (d >= self.stride) & (d % self.stride == 0)

    def shared_keys(self, T: int, device=None) -> torch.Tensor:
        """Key positions that any later (or, bidirectional, any) query may see: summaries and globals."""
        keys = set(g for g in self.global_tokens if g < T)
        if self.pattern == "fixed":
            keys |= {j for j in range(T) if j % self.stride >= self.stride - self.summary}
        return torch.tensor(sorted(keys), dtype=torch.long, device=device)

    def is_global(self, i: torch.Tensor) -> torch.Tensor:
        g = torch.tensor(self.global_tokens, dtype=torch.long, device=i.device)
        return torch.isin(i, g)


def sparse_mask(pattern: SparsePattern, T: int, key_valid: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """The dense (B|1, 1, T, T) boolean mask of a pattern: what ``sparse_attention`` must equal."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    seen = j <= i if pattern.causal else torch.ones(T, T, dtype=torch.bool, device=device)
    allowed = pattern.band(i, j) | pattern.column(i, j)
    allowed = allowed | (torch.isin(j, pattern.shared_keys(T, device)) & seen)
    allowed = allowed | (pattern.is_global(i) & seen)
    allowed = allowed[None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :].bool()
    return (allowed | (i == j))[:, None]  # a query always sees itself (attention.build_mask)


# --- parts ---------------------------------------------------------------------------------------
def _softmax_part(s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(s) @ v, logsumexp(s)) for masked scores s (…, n, k) and v (…, k, D); empty rows: (0, −inf)."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(-1)  # noqa: E741
    o = (p @ v) / l.clamp(min=1e-30)[..., None]
    return o, m[..., 0] + torch.log(l)


def _band(q, k, v, pat: SparsePattern, key_ok, scale):
    """q (B, Hkv, G, T, D): every query block against the key blocks its band reaches.

    All query blocks advance together: step ``o`` pairs query block n with key block n − o (a
    shifted view of the padded keys), and an online softmax (as in ``chunked``) folds the steps in.
    Only the band's blocks are ever multiplied: cost T · (window + block), memory T · block per step.
    """
    B, Hkv, G, T, D = q.shape
    b = pat.block
    if pat.pattern == "fixed":
        back, fwd = pat.stride // b - 1, 0  # a query block sits inside one stride block
    else:
        span = pat.window if pat.pattern == "local" else pat.stride
        back = math.ceil((span - 1) / b)
        fwd = 0 if pat.causal else back
    nq = math.ceil(T / b)
    Tp = nq * b
    pad = (back * b, Tp - T + fwd * b)  # key blocks before the first and after the last query block
    nk = nq + back + fwd
    # block index first: every step's slice of blocks is contiguous, so the batched matmuls copy nothing
    kt = F.pad(k, (0, 0, *pad)).view(B, Hkv, nk, b, D).permute(2, 0, 1, 4, 3).contiguous()  # (nk, B, Hkv, D, b)
    vp = F.pad(v, (0, 0, *pad)).view(B, Hkv, nk, b, -1).permute(2, 0, 1, 3, 4).contiguous()  # (nk, B, Hkv, b, Dv)
    okp = F.pad(key_ok, pad, value=False).view(-1, nk, b)  # (B|1, nk, b)
    qb = F.pad(q * scale, (0, 0, 0, Tp - T)).view(B, Hkv, G, nq, b, D)
    qb = qb.permute(3, 0, 1, 2, 4, 5).reshape(nq, B, Hkv, G * b, D)  # the group's heads stacked as rows
    inplace = not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))  # autograd keeps s
    r = torch.arange(b, device=q.device)
    blocks = torch.arange(nq, device=q.device)
    pad_keys = key_ok.shape[0] > 1 or not bool(key_ok.all()) or (Tp > T and fwd > 0)
    m = torch.full(qb.shape[:-1], -1e30, dtype=q.dtype, device=q.device)  # (nq, B, Hkv, G·b), finite: see chunked
    l = torch.zeros_like(m)  # noqa: E741
    acc = torch.zeros(*qb.shape[:-1], vp.shape[-1], dtype=q.dtype, device=q.device)
    scores = None
    for o in range(-fwd, back + 1):  # key block = query block − o
        sl = slice(back - o, back - o + nq)
        if inplace:  # one scores buffer for every step: no fresh (T·b) allocation (page faults) per step
            s = torch.matmul(qb, kt[sl], out=scores if o != -fwd else None)  # (nq, B, Hkv, G·b, b)
            scores = s
        else:
            s = qb @ kt[sl]  # (nq, B, Hkv, G·b, b)
        # what a step hides: the band's edge inside the tile (for local / strided it depends on i − j
        # only, the same (b, b) tile for every block), whole blocks (before the sequence; fixed: other
        # stride blocks), and padded keys
        d = o * b + r[:, None] - r[None, :]  # (b, b) query − key position
        if pat.pattern == "fixed":
            tile, blk = d >= 0, (blocks % (pat.stride // b)) >= o
        else:
            tile, blk = pat.band(d, torch.zeros_like(d)), None
        blk = (blocks >= o) if blk is None else blk & (blocks >= o)  # (nq,)
        hide = ~tile[None].expand(G, b, b).reshape(G * b, b)  # (G·b, b)
        if pad_keys:
            kj = (blocks - o)[:, None] * b + r  # (nq, b) key positions
            ok = okp[:, sl][:, :, None, :] | (kj[:, None, :] == (blocks[:, None] * b + r)[:, :, None])  # (B|1, nq, b, b)
            ok = ok.transpose(0, 1)[:, :, None, None].expand(-1, -1, 1, G, b, b)
            hide = hide | ~ok.reshape(nq, -1, 1, G * b, b)  # (nq, B|1, 1, G·b, b)
        if bool(hide.any()):
            s = s.masked_fill_(hide, float("-inf")) if inplace else s.masked_fill(hide, float("-inf"))
        if not bool(blk.all()):
            gone = ~blk.view(nq, 1, 1, 1, 1)
            s = s.masked_fill_(gone, float("-inf")) if inplace else s.masked_fill(gone, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        alpha = torch.exp(m - m_new)
        p = s.sub_(m_new[..., None]).exp_() if inplace else torch.exp(s - m_new[..., None])
        l = l * alpha + p.sum(-1)  # noqa: E741
        if inplace:
            acc3 = acc.mul_(alpha[..., None]).view(-1, G * b, acc.shape[-1])  # (nq·B·Hkv, G·b, Dv)
            acc3.baddbmm_(p.view(-1, G * b, b), vp[sl].view(-1, b, vp.shape[-1]))
        else:
            acc = acc * alpha[..., None] + p @ vp[sl]
        m = m_new
    o = acc / l.clamp(min=1e-30)[..., None]
    lse = m + torch.log(l)
    o = o.view(nq, B, Hkv, G, b, -1).permute(1, 2, 3, 0, 4, 5).reshape(B, Hkv, G, Tp, -1)[:, :, :, :T]
    lse = lse.view(nq, B, Hkv, G, b).permute(1, 2, 3, 0, 4).reshape(B, Hkv, G, Tp)[:, :, :, :T]
    return o, lse


def _columns(q, k, v, pat: SparsePattern, key_ok, scale):
    """strided: keys i − stride·r. With the sequence as (R rows, stride columns), they share i's column."""
    B, Hkv, G, T, D = q.shape
    L = pat.stride
    R = math.ceil(T / L)
    P = R * L - T
    qc = F.pad(q, (0, 0, 0, P)).view(B, Hkv, G, R, L, D).permute(0, 1, 4, 2, 3, 5).reshape(B, Hkv, L, G * R, D)
    kc = F.pad(k, (0, 0, 0, P)).view(B, Hkv, R, L, D).transpose(2, 3)  # (B, Hkv, L, R, D)
    vc = F.pad(v, (0, 0, 0, P)).view(B, Hkv, R, L, -1).transpose(2, 3)
    ok = torch.ones(R, R, dtype=torch.bool, device=q.device).tril(-1)  # earlier rows only (the band has r = r')
    key_ok = F.pad(key_ok, (0, P), value=False).view(-1, R, L).transpose(1, 2)  # (B|1, L, R)
    ok = ok & key_ok[:, :, None, :]  # (B|1, L, R, R)
    ok = ok[:, None, :, None].expand(-1, 1, L, G, R, R).reshape(-1, 1, L, G * R, R)
    s = (qc @ kc.transpose(-2, -1)) * scale  # (B, Hkv, L, G·R, R)
    o, lse = _softmax_part(s.masked_fill(~ok, float("-inf")), vc)
    o = o.view(B, Hkv, L, G, R, -1).permute(0, 1, 3, 4, 2, 5).reshape(B, Hkv, G, R * L, -1)[:, :, :, :T]
    lse = lse.view(B, Hkv, L, G, R).permute(0, 1, 3, 4, 2).reshape(B, Hkv, G, R * L)[:, :, :, :T]
    return o, lse


def _shared(q, k, v, pat: SparsePattern, key_ok, scale, keys: torch.Tensor):
    """Keys every query may see (summaries, global tokens), minus what the band and columns cover:
    the gathered keys go through the tiled online softmax of ``chunked``, so memory stays O(T)."""
    B, Hkv, G, T, D = q.shape
    i = torch.arange(T, device=q.device)[:, None]  # (T, 1)
    j = keys[None, :]  # (1, S)
    ok = ~pat.band(i, j) & ~pat.column(i, j)
    if pat.causal:
        ok = ok & (j <= i)
    ok = (ok[None] & key_ok[:, keys][:, None, :])[:, None]  # (B|1, 1, T, S)
    o, lse = chunked_attention(q.reshape(B, Hkv * G, T, D), k[:, :, keys], v[:, :, keys], mask=ok, scale=scale,
                               return_lse=True)  # fmt: skip
    return o.view(B, Hkv, G, T, -1), lse.view(B, Hkv, G, T)


def _global_rows(q, k, v, pat: SparsePattern, key_ok, scale, rows: torch.Tensor):
    """Global queries see every (earlier) key: a dense attention for those few rows."""
    T = k.shape[2]
    ok = key_ok[:, None, :] | (torch.arange(T, device=q.device)[None, None] == rows[None, :, None])  # (B|1, n, T)
    if pat.causal:
        ok = ok & (torch.arange(T, device=q.device)[None, None] <= rows[None, :, None])
    s = (q[:, :, :, rows] @ k[:, :, None].transpose(-2, -1)) * scale  # (B, Hkv, G, n, T)
    o, _ = _softmax_part(s.masked_fill(~ok[:, None, None], float("-inf")), v[:, :, None])
    return o


def sparse_attention(
    q: torch.Tensor,  # (B, H, T, D)
    k: torch.Tensor,  # (B, Hkv, T, D)
    v: torch.Tensor,  # (B, Hkv, T, Dv)
    pattern: SparsePattern,
    *,
    key_valid: torch.Tensor | None = None,  # (B, T) False at padding
    scale: float | None = None,
) -> torch.Tensor:
    """Attention under ``pattern`` computed block-sparse; equals reference attention under
    ``sparse_mask(pattern, T)``. Self-attention over one sequence (Tq = Tk)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if k.shape[2] != T:
        raise AttentionInputError(f"sparse attention is self-attention over one sequence; got {T} queries and {k.shape[2]} keys.")
    if H % Hkv:
        raise AttentionInputError(f"{H} query heads cannot share {Hkv} key/value heads: H must be a multiple of Hkv.")
    if pattern.pattern == "local" and pattern.window >= T:
        raise AttentionInputError(f"window={pattern.window} is not smaller than the sequence ({T} tokens), so it hides "
                                  "nothing: use dense attention, or a window below the sequence length.")  # fmt: skip
    if pattern.pattern != "local" and pattern.stride >= T:
        raise AttentionInputError(f"stride={pattern.stride} is not smaller than the sequence ({T} tokens): "
                                  "choose a stride below the sequence length.")  # fmt: skip
    scale = D**-0.5 if scale is None else scale
    G = H // Hkv
    qg = q.view(B, Hkv, G, T, D)
    key_ok = torch.ones(1, T, dtype=torch.bool, device=q.device) if key_valid is None else key_valid.bool()
    o, lse = _band(qg, k, v, pattern, key_ok, scale)
    if pattern.pattern == "strided":
        o, lse = merge_partials(o, lse, *_columns(qg, k, v, pattern, key_ok, scale))
    keys = pattern.shared_keys(T, q.device)
    if keys.numel():
        o, lse = merge_partials(o, lse, *_shared(qg, k, v, pattern, key_ok, scale, keys))
    rows = torch.tensor([g for g in pattern.global_tokens if g < T], dtype=torch.long, device=q.device)
    if rows.numel():
        o = o.index_copy(3, rows, _global_rows(qg, k, v, pattern, key_ok, scale, rows).to(o.dtype))
    return o.reshape(B, H, T, -1).to(q.dtype)
