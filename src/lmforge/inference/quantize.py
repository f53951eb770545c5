"""Weight-only int8 quantisation: each linear layer keeps int8 weights and one scale per output
channel; activations stay floating point.

    W ≈ scale[:, None] * Q,   Q = round(W / scale) in [-127, 127],   scale = max|W_row| / 127

Decoding one token reads every weight once, so its speed is set by the bytes of the weights:
int8 reads a quarter of fp32's. The matmul runs in PyTorch's weight-only int8 kernel
(``aten._weight_int8pack_mm``), which on CPU is fast with bfloat16 activations, so inputs are
rounded to bfloat16 for the product and the result returns in the model's dtype.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lmforge.errors import UserError

SCHEMES = ("int8",)


class QuantizeError(UserError, ValueError):
    """A quantisation request that cannot be honoured; the message names the supported choices."""


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q int8 (N, K), scale float32 (N,)) with weight ≈ scale[:, None] * Q, per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return q, scale


class Int8Linear(nn.Module):
    """A drop-in for ``nn.Linear`` in inference, holding int8 weights and per-channel scales."""

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_int8(linear.weight)
        self.act_dtype = act_dtype
        self.register_buffer("weight", q)  # (N, K) int8
        self.register_buffer("scales", scale.to(act_dtype))  # (N,)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(self.act_dtype), self.weight, self.scales)
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_model(model: nn.Module, scheme: str = "int8") -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers (the output head included) are weight-only
    int8; embeddings and norms stay in the model's dtype. The original model is left as it was."""
    if scheme not in SCHEMES:
        raise QuantizeError(f"quantize={scheme!r} is not supported; choose one of {', '.join(SCHEMES)}.")
    if model.dtype != torch.float32:
        raise QuantizeError(f"int8 quantisation starts from an fp32 model; this one is {model.dtype}: load it with dtype=torch.float32.")
    q = copy.deepcopy(model)
    q.config = model.config
    for name, module in list(q.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child))
    return q.eval()
