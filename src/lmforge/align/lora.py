"""LoRA (Hu et al. 2021) on lmforge models, saved and loaded in PEFT's adapter format.

    y = W x + (alpha / r) · B A dropout(x)       A (r, in), B (out, r); B starts at zero

lmforge fuses projections that Hugging Face keeps apart (``attn.qkv`` is q_proj, k_proj and
v_proj stacked by rows; ``mlp.up`` is gate_proj and up_proj). A fused linear layer carries one
adapter per Hugging Face module it is made of, each adding to that module's rows only, so an
adapter on ``q_proj`` and ``v_proj`` is exactly PEFT's and is saved under PEFT's names:

    adapter_config.json              {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors        base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   (r, in)
                                     base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   (out, r)

The frozen base may be weight-only int8 (``Int8Linear`` from ``lmforge.inference.quantize``):
QLoRA-style training, the base at a quarter of fp32's bytes; its backward pass multiplies by the
dequantized matrix. ``merge_lora`` folds the adapters into plain ``nn.Linear`` weights.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.config import ConfigError
from lmforge.errors import CheckpointError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_BLOCK_LINEARS = ("attn.qkv", "attn.o", "mlp.up", "mlp.down")  # the projections of a decoder block


@dataclass
class Piece:
    """One Hugging Face module inside an lmforge linear layer: rows [start, end) of its output."""

    name: str  # the HF module path (model.layers.0.self_attn.q_proj), or ours for lmforge-format models
    start: int
    end: int


def hf_pieces(model: nn.Module) -> tuple[dict[str, list[Piece]], bool]:
    """For each projection of the blocks (our module path), the Hugging Face modules it is made of,
    and whether HF stores them transposed (GPT-2's Conv1D: PEFT's ``fan_in_fan_out``). Models with no
    Hugging Face twin keep our names, one piece per layer."""
    from lmforge.checkpoints.hf import FAMILIES

    cfg = model.config
    fam = FAMILIES.get(cfg.family)
    names = fam.names(cfg) if fam is not None and fam.fits(cfg) is None else None
    out, transposed = {}, False
    for path, module in model.named_modules():
        if not (path.startswith("stack.layers.") and path.endswith(_BLOCK_LINEARS)):
            continue
        linear = module.base if isinstance(module, LoRALinear) else module
        n = linear.out_features
        if names is None:
            out[path] = [Piece(path, 0, n)]
            continue
        src = names[path + ".weight"]
        transposed |= src.transpose
        k = len(src.names)
        sizes = [n] if k == 1 else [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim] if k == 3 else [n // 2, n // 2]
        starts = [sum(sizes[:i]) for i in range(k)]
        out[path] = [Piece(name.removesuffix(".weight"), s, s + size) for name, s, size in zip(src.names, starts, sizes)]
    return out, transposed


def select_pieces(model: nn.Module, targets: list[str]) -> dict[str, list[Piece]]:
    """The pieces the target names pick, by our module path. A target matches a piece whose HF name
    ends with it (PEFT's rule: ``q_proj``, ``self_attn.q_proj``), a whole layer of ours (``qkv``,
    ``attn.o``), or every projection (``all-linear``); a target that matches nothing is an error."""
    table, _ = hf_pieces(model)
    picked: dict[str, list[Piece]] = {}
    for target in targets:
        hits = 0
        for path, pieces in table.items():
            for p in pieces:
                if target == "all-linear" or p.name == target or p.name.endswith("." + target) or path.endswith("." + target):
                    if p not in picked.setdefault(path, []):
                        picked[path].append(p)
                    hits += 1
        if not hits:
            known = sorted({p.name.rsplit(".", 1)[-1] for ps in table.values() for p in ps} | {p.split(".", 2)[-1] for p in table})
            raise ConfigError(
                f"lora_targets: {target!r} names no module of this {model.config.family} model; "
                f"choose from {', '.join(known)} or all-linear."
            )
    return {path: sorted(ps, key=lambda p: p.start) for path, ps in picked.items() if ps}


class _FrozenInt8(torch.autograd.Function):
    """``Int8Linear``'s forward; gradients flow to the input through the dequantized matrix (the
    int8 kernel has no backward), never to the frozen weights."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer(x)

    @staticmethod
    def backward(ctx, grad_y):
        w = ctx.layer.dequantized().to(grad_y.dtype)  # (N, K)
        return grad_y @ w, None


class LoRALinear(nn.Module):
    """A frozen linear layer (``nn.Linear`` or ``Int8Linear``) plus one low-rank update per piece
    (no pieces: just the frozen layer, which an int8 base needs to pass gradients to its input)."""

    def __init__(self, base: nn.Module, pieces: list[Piece], r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.pieces, self.r, self.scale = pieces, r, alpha / r
        self.in_features, self.out_features = base.in_features, base.out_features
        device = base.weight.device
        self.dtype = dtype = base.weight.dtype if base.weight.is_floating_point() else torch.float32
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype)) for _ in pieces)
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(p.end - p.start, r, device=device, dtype=dtype)) for p in pieces)
        for a in self.lora_A:  # as nn.Linear's default init (and PEFT's)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        from lmforge.inference.quantize import Int8Linear

        y = _FrozenInt8.apply(x, self.base) if isinstance(self.base, Int8Linear) else self.base(x)
        xd = self.dropout(x)
        parts, at = [], 0
        for p, A, B in zip(self.pieces, self.lora_A, self.lora_B):
            if p.start > at:
                parts.append(y.new_zeros(*y.shape[:-1], p.start - at))
            parts.append((xd @ A.t()) @ B.t() * self.scale)  # (..., r) -> (..., end - start)
            at = p.end
        if not parts:
            return y
        if at < self.out_features:
            parts.append(y.new_zeros(*y.shape[:-1], self.out_features - at))
        return y + torch.cat(parts, dim=-1)

    def delta(self) -> torch.Tensor:
        """The update to the (out, in) weight: scale · B A on each piece's rows."""
        d = torch.zeros(self.out_features, self.in_features, dtype=self.dtype, device=self.base.weight.device)
        for p, A, B in zip(self.pieces, self.lora_A, self.lora_B):
            d[p.start : p.end] += self.scale * (B @ A)
        return d

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, pieces={[p.name.rsplit('.', 1)[-1] for p in self.pieces]}"


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def apply_lora(model: nn.Module, targets: list[str], r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               quantize_base: str | None = None) -> nn.Module:  # fmt: skip
    """Freeze ``model`` and add adapters to the target projections (in place; returns the model).
    ``quantize_base="int8"`` makes the adapted layers' frozen weights weight-only int8."""
    from lmforge.inference.quantize import Int8Linear

    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ConfigError("the model already has LoRA adapters; merge them first (merge_lora) or start from the base.")
    picked = select_pieces(model, targets)
    model.requires_grad_(False)
    if quantize_base is not None:  # every projection of the blocks goes int8; those without adapters stay frozen
        picked = {path: picked.get(path, []) for path in hf_pieces(model)[0]}
    for path, pieces in picked.items():
        base = model.get_submodule(path)
        if quantize_base == "int8":
            base = Int8Linear(base)
        elif quantize_base is not None:
            raise ConfigError(f"quantize_base={quantize_base!r} is not supported; choose int8.")
        _set_module(model, path, LoRALinear(base, pieces, r, alpha, dropout))
    model.lora_settings = {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(targets), "quantize_base": quantize_base}
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight (W + scale · B A; an int8 base is dequantized first)
    and put plain ``nn.Linear`` layers back: a model ``save_pretrained`` writes in its family's format."""
    from lmforge.inference.quantize import Int8Linear

    for path, layer in lora_layers(model).items():
        base = layer.base
        weight = base.dequantized() if isinstance(base, Int8Linear) else base.weight.detach().float()
        linear = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None, device=weight.device)
        linear.weight.copy_(weight + layer.delta().float())
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        _set_module(model, path, linear.to(layer.dtype))
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


# --- PEFT's files ---------------------------------------------------------------------------------
def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's tensor names."""
    out = {}
    for layer in lora_layers(model).values():
        for p, A, B in zip(layer.pieces, layer.lora_A, layer.lora_B):
            out[f"{PEFT_PREFIX}{p.name}.lora_A.weight"] = A.detach().contiguous().clone()
            out[f"{PEFT_PREFIX}{p.name}.lora_B.weight"] = B.detach().contiguous().clone()
    return out


def adapter_config(model: nn.Module, base_model: str | None = None) -> dict:
    """PEFT's LoraConfig for these adapters (``target_modules``: the HF module names adapted)."""
    s = model.lora_settings
    layers = lora_layers(model)
    _, transposed = hf_pieces(model)
    targets = sorted({p.name.rsplit(".", 1)[-1] for layer in layers.values() for p in layer.pieces})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": s["r"], "lora_alpha": s["alpha"], "lora_dropout": s["dropout"], "target_modules": targets,
        "fan_in_fan_out": transposed, "bias": "none", "use_rslora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
    }  # fmt: skip


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (each to a temporary name, then renamed)."""
    from safetensors.torch import save_file

    from lmforge.checkpoints import _atomic_write

    if not lora_layers(model):
        raise ConfigError("the model has no LoRA adapters to save; train with finetune=lora.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state, config = adapter_state(model), adapter_config(model, base_model)
    _atomic_write(out / ADAPTER_WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    _atomic_write(out / ADAPTER_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return out


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    file = Path(adapter_dir) / ADAPTER_CONFIG
    if not file.is_file():
        raise CheckpointError(f"{adapter_dir} has no {ADAPTER_CONFIG}: it is not a LoRA adapter directory.")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} cannot be read ({e}).") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{file} describes a {config.get('peft_type')} adapter; only LoRA is supported.")
    if config.get("use_rslora") or config.get("modules_to_save") or config.get("bias", "none") != "none":
        raise CheckpointError(f"{file} uses rsLoRA, modules_to_save or trained biases, which lmforge does not load.")
    return config


def load_adapter_weights(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Copy an adapter's tensors into the model's LoRA layers (which must match it exactly)."""
    from safetensors.torch import load_file

    file = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}.")
    saved = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v for k, v in load_file(file).items()}
    ours = adapter_state(model)
    if set(saved) != set(ours):
        missing, extra = sorted(set(ours) - set(saved)), sorted(set(saved) - set(ours))
        raise CheckpointError(f"{file} does not match the adapters: missing {missing[:3]}, unexpected {extra[:3]}.")
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p, A, B in zip(layer.pieces, layer.lora_A, layer.lora_B):
                for name, param in (("lora_A", A), ("lora_B", B)):
                    t = saved[f"{PEFT_PREFIX}{p.name}.{name}.weight"]
                    if t.shape != param.shape:
                        raise CheckpointError(f"{file}: {p.name}.{name} has shape {tuple(t.shape)}, the model needs {tuple(param.shape)}.")
                    param.copy_(t)


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, *, quantize_base: str | None = None) -> nn.Module:
    """Add the adapters of a PEFT LoRA directory (ours or PEFT's own) to ``model``."""
    config = read_adapter_config(adapter_dir)
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        raise CheckpointError(f"{adapter_dir}: target_modules given as a pattern ({targets!r}) is not supported; list the module names.")
    apply_lora(model, list(targets), r=int(config["r"]), alpha=float(config["lora_alpha"]),
               dropout=float(config.get("lora_dropout", 0.0)), quantize_base=quantize_base)  # fmt: skip
    load_adapter_weights(model, adapter_dir)
    return model


def merge_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """``lmforge lora merge``: base checkpoint + adapter -> one Hugging Face checkpoint directory.
    The base defaults to the adapter's ``base_model_name_or_path``."""
    from lmforge.checkpoints import load_model, save_pretrained
    from lmforge.tokenizer import load_tokenizer

    config = read_adapter_config(adapter_dir)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{adapter_dir}/{ADAPTER_CONFIG} names no base model; pass --base MODEL.")
    model = merge_lora(load_adapter(load_model(base, quantize="none"), adapter_dir))
    tok_dir = adapter_dir if (Path(adapter_dir) / "tokenizer.json").is_file() else base
    return save_pretrained(model, out_dir, tokenizer=load_tokenizer(tok_dir))
