"""Weight-only quantisation: linear layers keep int8 or int4 weights; activations stay floating point.

    int8   W ≈ scale[:, None] * Q              Q in [-127, 127], one scale per output channel
    int4   W ≈ scale[g] * (Q - 8) + zero[g]    Q in [0, 15], one scale and zero per group of 32
                                               inputs of a row (min/max asymmetric)

Decoding one token reads every weight once, so its speed is set by the bytes of the weights: int8
reads a quarter of fp32's, int4 an eighth. The products run in PyTorch's packed CPU kernels,
``aten._weight_int8pack_mm`` and ``aten._weight_int4pack_mm_for_cpu``, which are fast with
bfloat16 activations (with fp32 ones they are 10-100x slower), so inputs are rounded to bfloat16
for the product and the result returns in the model's dtype.

GGUF files already hold block-quantised weights; ``Int4Linear.from_blocks`` and
``Int8Linear.from_blocks`` take them as they are (``checkpoints.gguf.Blocks``): llama.cpp's Q4_1
block ``w = d * q + m`` is exactly the int4 kernel's ``d * (q - 8) + zero`` with ``zero = m + 8 d``,
and Q4_0's ``w = d * (q - 8)`` is the same with ``zero = 0``.

The output head stays int8 under every scheme: in int4 it costs +6% WikiText-2 perplexity on
SmolLM2-135M, in int8 nothing measurable, and int8 already makes it the cheaper part of a step.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import UserError

SCHEMES = ("int8", "int4")
GROUP_SIZE = 32  # int4: inputs sharing one scale and zero (GGUF's block size too)
INT4_ROWS = 16  # int4: the packed kernel takes output features in multiples of this
HEAD = "lm_head"  # the output head of decoder models: int8 under every scheme


class QuantizeError(UserError, ValueError):
    """A quantisation request that cannot be honoured; the message names the supported choices."""


class QuantizedLinear(nn.Module):
    """What the int8 and int4 layers share: ``.to(dtype)`` / ``.float()`` on the model move them but
    keep the dtype of their scales, which is the kernel's activation dtype (bfloat16 is its fast one)."""

    def _apply(self, fn, recurse=True):
        kept = {name: b.dtype for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, dtype in kept.items():
            if name != "bias":
                self._buffers[name] = self._buffers[name].to(dtype)
        return self


# --- int8 ----------------------------------------------------------------------------------------
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q int8 (N, K), scale float32 (N,)) with weight ≈ scale[:, None] * Q, per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return q, scale


INT8_KERNEL_K = 16  # torch's int8 CPU kernel takes in_features in multiples of this


class Int8Linear(QuantizedLinear):
    """A drop-in for ``nn.Linear`` in inference, holding int8 weights and per-channel scales.

    ``Int8Linear(linear)`` quantises a float layer; ``Int8Linear.from_blocks`` takes GGUF Q8_0
    rows (int8 in blocks of 32 with a scale each), whose blocks are merged into one scale per row.
    """

    def __init__(self, linear: nn.Linear | None = None, act_dtype: torch.dtype = torch.bfloat16, *,
                 q: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):  # fmt: skip
        super().__init__()
        if linear is not None:
            q, scale = quantize_int8(linear.weight)
            bias = None if linear.bias is None else linear.bias.detach().clone()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q)  # (N, K) int8
        self.register_buffer("scales", scale.to(act_dtype))  # (N,); its dtype is the product's
        self.register_buffer("bias", bias)

    @classmethod
    def from_blocks(cls, blocks, bias: torch.Tensor | None = None) -> Int8Linear:
        """From GGUF blocks (Q8_0, or any ``Blocks``): dequantised, then one scale per row."""
        q, scale = quantize_int8(blocks.dequantize())
        return cls(q=q, scale=scale, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.scales.dtype)  # (M, K)
        if self.in_features % INT8_KERNEL_K:
            # torch's CPU kernel reads past the row when K is not a multiple of 16: a segfault from two
            # rows up (measured: K = 4, 8, 12, 20, 24, 40). The same product, unfused:
            y = F.linear(x2, self.weight.to(x2.dtype)) * self.scales
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


# --- int4 ----------------------------------------------------------------------------------------
def int4_fits(out_features: int, in_features: int) -> bool:
    """Whether the packed int4 kernel takes a (out_features, in_features) weight."""
    return in_features % GROUP_SIZE == 0 and out_features % INT4_ROWS == 0


def quantize_int4(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q uint8 (N, K) in [0, 15], scale (N, K/g), zero (N, K/g)), float32, min/max asymmetric per
    group of ``group_size`` inputs: weight ≈ scale * (Q - 8) + zero, each group's min and max exact."""
    w = weight.detach().float()
    N, K = w.shape
    g = w.view(N, K // group_size, group_size)  # (N, G, g)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (N, G)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).view(N, K)
    return q, scale, lo + 8 * scale


class Int4Linear(QuantizedLinear):
    """A drop-in for ``nn.Linear`` in inference, holding 4-bit weights packed for the CPU kernel
    and a bfloat16 scale and zero per group of 32 inputs of each row.

    ``Int4Linear.from_linear`` quantises a float layer (min/max per group);
    ``Int4Linear.from_blocks`` takes GGUF Q4_0 / Q4_1 rows as they are.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None,
                 act_dtype: torch.dtype = torch.bfloat16):  # fmt: skip
        super().__init__()
        self.out_features, self.in_features = q.shape
        if not int4_fits(self.out_features, self.in_features):
            raise QuantizeError(
                f"the int4 kernel takes in_features in multiples of {GROUP_SIZE} and out_features in multiples of "
                f"{INT4_ROWS}, not ({self.out_features}, {self.in_features}): quantize this layer to int8."
            )
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        self.register_buffer("weight", packed)  # (N, K/2) uint8, two 4-bit values a byte
        # (K/32, N, 2): the kernel's layout, scale then zero; its dtype is the product's
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(act_dtype))
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_dtype: torch.dtype = torch.bfloat16) -> Int4Linear:
        q, scale, zero = quantize_int4(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale, zero, bias, act_dtype)

    @classmethod
    def from_blocks(cls, blocks, bias: torch.Tensor | None = None, act_dtype: torch.dtype = torch.bfloat16) -> Int4Linear:
        """From GGUF 4-bit blocks (``checkpoints.gguf.Blocks`` with bits=4): no requantisation."""
        return cls(blocks.q, blocks.scale, blocks.zero, bias, act_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.scales_and_zeros.dtype)  # (M, K)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, GROUP_SIZE, self.scales_and_zeros)  # (M, N)
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (N, K) the kernel multiplies by (scales and zeros as stored)."""
        eye = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype)
        w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, GROUP_SIZE, self.scales_and_zeros)  # (K, N)
        return w_t.float().t().contiguous()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int4 g{GROUP_SIZE}"


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def describe_linears(model: nn.Module) -> str:
    """What the linear layers run as, e.g. "int4 x210, int8 x1 (bfloat16 activations), rest float32"."""
    from collections import Counter

    names = {Int4Linear: "int4", Int8Linear: "int8"}
    kinds = Counter(names.get(type(m), "float") for m in model.modules() if isinstance(m, (nn.Linear, QuantizedLinear)))
    parts = [f"{k} x{n}" for k, n in kinds.most_common()]
    return f"linear layers {', '.join(parts)}; other weights {str(model.dtype).removeprefix('torch.')}"


# --- whole models --------------------------------------------------------------------------------
def quantize_linears(model: nn.Module, scheme: str | None, blocks: dict | None = None) -> nn.Module:
    """Replace ``model``'s ``nn.Linear`` layers by quantised ones, in place.

    scheme  "int8" / "int4": every linear layer; None: only the layers in ``blocks``
    blocks  {layer name: ``checkpoints.gguf.Blocks``}: weights already quantised (GGUF), taken as
            they are where the scheme matches their bits (4-bit blocks -> int4, Q8_0 -> int8),
            requantised where it does not; the layer's own weight is then only a placeholder

    The output head is int8 under every scheme; layers whose shapes the int4 kernel does not take
    become int8 too, said once in a warning.
    """
    if scheme is not None and scheme not in SCHEMES:
        raise QuantizeError(f"quantize={scheme!r} is not supported; choose one of {', '.join(SCHEMES)}.")
    blocks = blocks or {}
    unfit: set[tuple[int, int]] = set()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            b = blocks.get(full)
            if type(child) is not nn.Linear or (scheme is None and b is None):
                continue
            bias = None if child.bias is None else child.bias.detach()
            target = scheme or ("int4" if b.bits == 4 else "int8")
            if full == HEAD:
                target = "int8"
            if target == "int4" and not int4_fits(child.out_features, child.in_features):
                unfit.add((child.out_features, child.in_features))
                target = "int8"
            if target == "int8":
                new = Int8Linear(child) if b is None else Int8Linear.from_blocks(b, bias)
            elif b is not None and b.bits == 4:
                new = Int4Linear.from_blocks(b, bias)  # exact: no requantisation
            else:
                new = Int4Linear(*quantize_int4(child.weight if b is None else b.dequantize()), bias)
            setattr(module, child_name, new)
    if unfit:
        shapes = ", ".join(f"{o}x{i}" for o, i in sorted(unfit))
        warnings.warn(
            f"int4 needs in_features divisible by {GROUP_SIZE} and out_features by {INT4_ROWS}, so the linear layers "
            f"of shape {shapes} (out x in) fall back to int8.",
            stacklevel=2,
        )
    return model


def quantize_model(model: nn.Module, scheme: str = "int8") -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers (the output head included) are weight-only
    int8 or int4 (head int8); embeddings and norms stay in the model's dtype. The original model is
    left as it was."""
    if scheme not in SCHEMES:
        raise QuantizeError(f"quantize={scheme!r} is not supported; choose one of {', '.join(SCHEMES)}.")
    if model.dtype != torch.float32:
        raise QuantizeError(
            f"{scheme} quantisation starts from an fp32 model; this one is {model.dtype}: load it with dtype=torch.float32."
        )
    q = copy.deepcopy(model)
    q.config = model.config
    return quantize_linears(q, scheme).eval()
