"""Scaled dot-product attention, masks and multi-head (GQA/MQA) attention; the KV cache (``nn/kv_cache.py``) sits behind it.

    Attention(Q, K, V) = softmax(Q Kᵀ / √d_k + bias, masked) · V

``reference_attention`` is that formula in plain tensor ops; ``attend`` dispatches to it, to
PyTorch's fused ``F.scaled_dot_product_attention`` or to the tiled online softmax of ``nn/chunked.py``
(``cfg.attn_impl``). Tests hold them equal. Sparse and linear layers (``cfg.attention``) are
dispatched to ``nn/long_context.py``.
Masks are boolean, True = may attend, broadcastable to (B, H, Tq, Tk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.nn import long_context
from lmforge.nn.chunked import chunked_attention
from lmforge.nn.kv_cache import KVCache, PagedCross, PagedLayer
from lmforge.nn.positions import apply_rope


def reference_attention(
    q: torch.Tensor,  # (B, H, Tq, D)
    k: torch.Tensor,  # (B, Hkv, Tk, D)
    v: torch.Tensor,  # (B, Hkv, Tk, D)
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The textbook formula. GQA: each group of H/Hkv query heads shares one K/V head."""
    if k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if bias is not None:
        scores = scores + bias
    if is_causal:
        mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v  # (B, H, Tq, D)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    impl: str = "sdpa",
) -> torch.Tensor:
    if callable(impl):  # an attention function with this signature (lmforge.parallel's ring attention)
        return impl(q, k, v, mask, bias, is_causal, scale, dropout_p)
    if impl == "reference" or (q.shape[-2] == 1 and torch.compiler.is_compiling()):
        # compiled one-token decoding: inductor fuses the formula with RoPE and the cache write into
        # one kernel per layer, faster than a call to the SDPA kernel (~36 vs ~56 us a layer, SmolLM2)
        return reference_attention(q, k, v, mask, bias, is_causal, scale, dropout_p)
    if impl == "chunked" and bias is None and dropout_p == 0:
        return chunked_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale)
    attn_mask = mask
    if bias is not None:  # fold the mask into the additive bias
        attn_mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        attn_mask = attn_mask.to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal and attn_mask is None,
        scale=scale, enable_gqa=k.shape[1] != q.shape[1],
    )


# --- masks ---------------------------------------------------------------------------------------
def causal_mask(tq: int, tk: int, device=None) -> torch.Tensor:
    """(Tq, Tk): query i (the last Tq of Tk positions) sees keys up to its own position."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)


def build_mask(
    q_pos: torch.Tensor,  # (Tq,) positions (cache slots) of the queries
    k_pos: torch.Tensor,  # (Tk,) positions of the keys
    *,
    causal: bool,
    key_valid: torch.Tensor | None = None,  # (B, Tk) False at padding
    prefix_len: torch.Tensor | None = None,  # (B,) prefix LM: keys before this are seen by every query
    window: int | None = None,  # sliding window: keys at most window-1 positions back
) -> torch.Tensor:
    """Combine causal / prefix-LM / sliding-window / padding rules into one (B|1, 1, Tq, Tk) mask.

    Every query may always attend to itself, so no row is empty (padded queries then produce
    finite garbage that is ignored, instead of NaNs that would poison a batch).
    """
    qp, kp = q_pos[:, None], k_pos[None, :]  # (Tq, 1), (1, Tk)
    allowed = torch.ones(1, q_pos.numel(), k_pos.numel(), dtype=torch.bool, device=q_pos.device)
    if causal:
        allowed = (kp <= qp)[None]
        if prefix_len is not None:
            allowed = allowed | (kp[None] < prefix_len[:, None, None])  # (B, Tq, Tk)
    if window is not None:
        allowed = allowed & ((qp - kp) < window)[None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :].bool()
    allowed = allowed | (kp == qp)[None]
    return allowed[:, None]  # (B|1, 1, Tq, Tk)


# --- multi-head attention ------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention with n_kv_head <= n_head (MHA, GQA, MQA); self- or cross-attention.

    Self-attention projects Q, K, V with one fused matmul; cross-attention projects Q from the
    decoder and K, V from the encoder's memory (computed once, then served from ``cache``).
    """

    def __init__(self, cfg: ModelConfig, *, cross: bool = False):
        super().__init__()
        self.cross = cross
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.scale, self.impl, self.dropout_p = cfg.scale, cfg.attn_impl, cfg.attn_dropout
        self.kind = "softmax" if cross else cfg.attention  # softmax | sparse | linear
        long_context.setup(self, cfg)
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        if cross:
            self.q = nn.Linear(cfg.n_embd, q_dim, bias=cfg.qkv_bias)
            self.kv = nn.Linear(cfg.n_embd, 2 * kv_dim, bias=cfg.qkv_bias)
        else:
            self.qkv = nn.Linear(cfg.n_embd, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.o = nn.Linear(q_dim, cfg.n_embd, bias=cfg.attn_out_bias)

    def new_cache(self, batch: int, max_len: int, dtype=torch.float32, device=None) -> nn.Module:
        """This layer's decoding memory: a KVCache, or a linear layer's constant-size state."""
        return long_context.new_cache(self, batch, max_len, dtype, device)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, D)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | PagedLayer | PagedCross | None = None,
        input_pos: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,  # (B, S, C) encoder output, cross-attention only
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q_dim = self.n_head * self.head_dim
        opts = dict(scale=self.scale, dropout_p=self.dropout_p if self.training else 0.0, impl=self.impl)
        if self.cross:
            q = self._heads(self.q(x), self.n_head)
            if isinstance(cache, PagedCross):  # each sequence's own encoder keys and values
                y = cache.attend(q, None, None, attend, **opts)
                return self.o(y.transpose(1, 2).reshape(B, T, q_dim))
            if memory is not None:
                k, v = self.memory_kv(memory)
                if cache is not None:
                    k, v = cache.update(torch.arange(k.shape[2], device=k.device), k, v)
            else:
                k, v = cache.k, cache.v
        else:
            kv_dim = self.n_kv_head * self.head_dim
            q, k, v = self.qkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
            q, k, v = self._heads(q, self.n_head), self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if isinstance(cache, PagedLayer):  # a packed row of many sequences over the block pool
                y = cache.attend(q, k, v, attend, **opts)
                return self.o(y.transpose(1, 2).reshape(B, T, q_dim))
            if self.kind != "softmax":  # sparse / linear layers: nn/long_context.py
                y = long_context.attend_kind(self, q, k, v, mask=mask, is_causal=is_causal, cache=cache, input_pos=input_pos)
                return self.o(y.transpose(1, 2).reshape(B, T, q_dim))
            if cache is not None:  # read the slots the mask covers
                k, v = cache.update(input_pos, k, v, None if mask is None else mask.shape[-1])
        y = attend(q, k, v, mask=mask, bias=bias, is_causal=is_causal, **opts)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(B, T, q_dim))

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values (B, H_kv, S, D) of an encoder output (B, S, C)."""
        k, v = self.kv(memory).split(self.n_kv_head * self.head_dim, dim=-1)
        return self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)
