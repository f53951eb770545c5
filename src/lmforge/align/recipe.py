"""Alignment recipes: one YAML format for every ``lmforge <verb>`` of ``lmforge.align``.

A recipe is the pretraining recipe's flat mapping (``TrainConfig`` keys: ``max_iters``,
``batch_size``, ``block_size``, ``learning_rate``, ``gradient_accumulation_steps``, ``strategy``,
...) plus the keys of the verb's own dataclass (``SFTConfig`` for ``sft``), all at the top level:

    model: path/to/checkpoint        # HF directory or .gguf; default: the bundled SmolLM2-135M-Instruct
    finetune: lora
    lora_r: 8
    lora_targets: [q_proj, v_proj]
    max_iters: 200
    learning_rate: 2e-4

``--key=value`` overrides reach any key; an unknown key is refused with the closest known names,
and values are converted to the field's type (``lmforge.train.config.coerce``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar


from lmforge.config import ConfigError
from lmforge.train.config import TRAIN_KEYS, TrainConfig, coerce, parse_overrides, read_yaml_recipe, unknown_key

M = TypeVar("M")


@dataclass
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021), PEFT's names and defaults where PEFT has them.

    W x  ->  W x + (lora_alpha / lora_r) · B A dropout(x),   A (r, in) random, B (out, r) zero.
    """

    finetune: str = "lora"  # lora | full
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    # PEFT module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; GPT-2: c_attn,
    # c_proj, c_fc), lmforge's own (qkv, o, up, down), or "all-linear" (every projection in the blocks)
    lora_targets: list[str] | str = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])
    quantize_base: str | None = None  # int8: the frozen base holds weight-only int8 matrices (QLoRA-style)

    def validate_lora(self) -> None:
        if self.finetune not in ("lora", "full"):
            raise ConfigError(f"finetune={self.finetune!r} is not supported; choose lora or full.")
        if self.lora_r < 1:
            raise ConfigError(f"lora_r must be at least 1, got {self.lora_r}.")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be positive, got {self.lora_alpha}.")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout={self.lora_dropout} must lie in [0, 1).")
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        if not self.lora_targets:
            raise ConfigError("lora_targets is empty; name at least one module, e.g. [q_proj, v_proj].")
        if self.quantize_base not in (None, "int8"):
            raise ConfigError(f"quantize_base={self.quantize_base!r} is not supported; choose int8 or leave it unset.")
        if self.quantize_base and self.finetune != "lora":
            raise ConfigError("quantize_base=int8 freezes the base weights, so it needs finetune=lora.")


@dataclass
class AlignRecipe(Generic[M]):
    """The trainer's config plus the verb's own (``method``)."""

    train: TrainConfig
    method: M
    path: Path | None = None


def load_align_recipe(method_cls: type[M], path: str | os.PathLike | None = None,
                      overrides: dict[str, Any] | list[str] | None = None) -> AlignRecipe[M]:  # fmt: skip
    """Read a recipe for the verb whose settings are ``method_cls`` (a dataclass), apply overrides."""
    values = read_yaml_recipe(path)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    values.update(overrides or {})
    own = [f.name for f in dataclasses.fields(method_cls)]
    assert not set(own) & set(TRAIN_KEYS), f"{method_cls.__name__} reuses a TrainConfig key"
    train, method = {}, {}
    for key, value in values.items():
        if key in TRAIN_KEYS:
            train[key] = value
        elif key in own:
            method[key] = coerce(method_cls, key, value)
        else:
            raise unknown_key(key, list(TRAIN_KEYS) + own)
    return AlignRecipe(TrainConfig.from_dict(train), method_cls(**method), Path(path) if path else None)
