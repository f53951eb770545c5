"""Norms, feed-forward networks and the residual block.

A block is ``attention -> (cross-attention) -> feed-forward``, each wrapped in a residual
connection with its norm either before the sub-layer (pre-norm: GPT-2, LLaMA, T5) or after the
sum (post-norm: BERT and the 2017 Transformer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.nn.attention import Attention, KVCache


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (LLaMA, T5)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.norm_bias)


ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf): BERT
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2, T5 v1.1 ("gelu_new")
    "relu": F.relu,
    "silu": F.silu,  # SwiGLU: LLaMA, Mistral, Qwen2
}


class FeedForward(nn.Module):
    """mlp: W2 act(W1 x).  glu: W2 (act(Wg x) * Wu x), with Wg and Wu fused into one matmul."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.glu = cfg.ffn == "glu"
        self.act = ACTIVATIONS[cfg.activation]
        self.up = nn.Linear(cfg.n_embd, (2 if self.glu else 1) * cfg.d_ff, bias=cfg.mlp_bias)  # [gate; up] for glu
        self.down = nn.Linear(cfg.d_ff, cfg.n_embd, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.glu:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.down(h)


class Block(nn.Module):
    """One transformer layer: self-attention, optional cross-attention, feed-forward."""

    def __init__(self, cfg: ModelConfig, *, cross: bool = False):
        super().__init__()
        self.pre = cfg.norm_placement == "pre"
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.cross_attn = Attention(cfg, cross=True) if cross else None
        self.cross_norm = make_norm(cfg) if cross else None
        self.mlp_norm = make_norm(cfg)
        self.mlp = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def _residual(self, h: torch.Tensor, norm: nn.Module, fn) -> torch.Tensor:
        if self.pre:
            return h + self.dropout(fn(norm(h)))  # x + f(norm(x))
        return norm(h + self.dropout(fn(h)))  # norm(x + f(x))

    def forward(
        self,
        h: torch.Tensor,  # (B, T, D)
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cross_bias: torch.Tensor | None = None,
        cross_cache: KVCache | None = None,
    ) -> torch.Tensor:
        h = self._residual(
            h, self.attn_norm,
            lambda x: self.attn(x, rope=rope, mask=mask, bias=bias, is_causal=is_causal, cache=cache, input_pos=input_pos),
        )
        if self.cross_attn is not None:
            h = self._residual(
                h, self.cross_norm,
                lambda x: self.cross_attn(x, memory=memory, mask=memory_mask, bias=cross_bias, cache=cross_cache),
            )
        return self._residual(h, self.mlp_norm, self.mlp)
