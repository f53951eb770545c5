"""Alignment: making a pretrained model useful.

    from lmforge.align.sft import load_sft_recipe, sft
    recipe = load_sft_recipe("configs/align/sft-lora-smollm2.yaml", ["--max_iters=50"])
    sft(recipe, "chats.jsonl", "out/sft")                 # adapter in PEFT's format + loss.png

Recipes (``recipe.py``) are flat YAML mappings of the trainer's keys plus the verb's own; every
verb runs on ``lmforge.train``'s loop. Chat data (``chat_data.py``), LoRA (``lora.py``), SFT
(``sft.py``), Constitutional AI (``cai.py``) and task generators (``tasks.py``) live here.
Names are imported on first use, so the command line stays quick to start.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AlignRecipe": "recipe", "LoRAConfig": "recipe", "load_align_recipe": "recipe",
    "ChatDataError": "chat_data", "read_conversations": "chat_data", "tokenize_conversation": "chat_data",
    "write_jsonl": "chat_data",
    "apply_lora": "lora", "load_adapter": "lora", "merge_adapter": "lora", "merge_lora": "lora", "save_adapter": "lora",
    "SFTConfig": "sft", "load_sft_recipe": "sft",
    "CAIConfig": "cai", "load_cai_recipe": "cai", "run_cai": "cai",
}  # fmt: skip


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lmforge.align.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lmforge.align' has no attribute {name!r}")


__all__ = list(_EXPORTS)
