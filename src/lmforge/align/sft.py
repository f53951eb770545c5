"""Supervised fine-tuning: ``sft(recipe, data, out_dir)`` on the pretraining trainer.

    for each update:   batch = conversations rendered with the chat template (padded, or packed)
                       loss  = cross-entropy on the assistant tokens only
                       AdamW on every weight (finetune=full) or on LoRA adapters over a frozen,
                       optionally int8, base (finetune=lora)

Everything else is ``lmforge.train``'s loop: metrics.jsonl, loss.png, tqdm, atomic checkpoints
(the adapter in PEFT's format, or the whole model), exact ``--resume``, DDP under torchrun.

Batches are a function of (seed, index) only, so N processes see exactly the examples one
process would: update s takes micro-batches s·accum .. s·accum + accum - 1 of one stream that
walks the training set in a fresh seeded order every epoch.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.align.chat_data import (
    ChatDataError,
    Example,
    encode_conversations,
    read_conversations,
    require_chat_template,
)
from lmforge.align.lora import apply_lora, load_adapter_weights, lora_layers, save_adapter
from lmforge.align.recipe import AlignRecipe, LoRAConfig, load_align_recipe
from lmforge.config import ConfigError
from lmforge.data import IGNORE_INDEX
from lmforge.train.distributed import init_distributed
from lmforge.train.trainer import Trainer, TrainResult


@dataclass
class SFTConfig(LoRAConfig):
    """The keys of an SFT recipe besides the trainer's (``TrainConfig``) and LoRA's (``LoRAConfig``)."""

    model: str | None = None  # the checkpoint to fine-tune: HF directory or .gguf (default: bundled SmolLM2-135M-Instruct)
    chat_template: str | None = None  # a Jinja file, for checkpoints whose tokenizer has none
    packing: bool = False  # concatenate examples into full block_size rows (no padding)
    val_data: str | None = None  # held-out conversations; default: val_fraction of --data, drawn by seed

    def __post_init__(self) -> None:
        self.validate_lora()


def load_sft_recipe(path=None, overrides=None) -> AlignRecipe[SFTConfig]:
    return load_align_recipe(SFTConfig, path, overrides)


# --- data ----------------------------------------------------------------------------------------------
def _fit(example: Example, length: int) -> Example | None:
    """Cut to ``length`` tokens (one more than the block: inputs and shifted targets); None when
    nothing to learn is left."""
    ids, mask = example.ids[:length], example.mask[:length]
    return Example(ids, mask, example.where) if any(mask[1:]) else None


def pack(examples: list[Example], length: int) -> list[Example]:
    """Concatenate examples in order and cut the stream into rows of ``length`` tokens (the last
    row shorter). As in TRL's classic packing, a token may attend to the examples before it in
    its row; the loss still falls on assistant tokens only."""
    ids = [t for e in examples for t in e.ids]
    mask = [m for e in examples for m in e.mask]
    return [Example(ids[i : i + length], mask[i : i + length], f"packed row {i // length}") for i in range(0, len(ids) - 1, length)]


def collate(rows: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs and shifted labels (-100 off the assistant tokens and on padding)."""
    T = max(len(r.ids) for r in rows) - 1
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, r in enumerate(rows):
        ids, mask = torch.tensor(r.ids), torch.tensor(r.mask)
        n = len(r.ids) - 1
        input_ids[b, :n] = ids[:-1]
        labels[b, :n] = torch.where(mask[1:], ids[1:], IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels}  # causal masking: padding on the right is never attended to


class SFTBatches:
    """Batch ``index`` of a list of rows: an endless stream over them, reshuffled every epoch by seed."""

    def __init__(self, rows: list[Example], batch_size: int, seed: int, pad_id: int, *, shuffle: bool = True):
        self.rows, self.batch_size, self.seed, self.pad_id, self.shuffle = rows, batch_size, seed, pad_id, shuffle
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.rows)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # batches are asked for in order: one epoch is enough to keep
        return self._orders[epoch]

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.rows)
        picks = [index * self.batch_size + i for i in range(self.batch_size)]
        return collate([self.rows[self._order(p // n)[p % n]] for p in picks], self.pad_id)

    def epoch_of(self, index: int) -> float:
        return index * self.batch_size / len(self.rows)


def split_examples(conversations, fraction: float, seed: int):
    """(train, held out): ``fraction`` of the conversations drawn by seed (at least one each)."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    k = min(max(1, round(fraction * len(order))), len(order) - 1)
    held = set(order[:k])
    return [c for i, c in enumerate(conversations) if i not in held], [c for i, c in enumerate(conversations) if i in held]


# --- the trainer ---------------------------------------------------------------------------------------
class SFTTrainer(Trainer):
    """lmforge.train's Trainer with chat batches, a pretrained start and (optionally) LoRA."""

    name = "sft"

    def __init__(self, recipe: AlignRecipe[SFTConfig], data, out_dir, ctx, *, resume: bool = False):
        self.method, self.cfg, self.ctx = recipe.method, recipe.train, ctx
        self._load(data)  # bad data fails here, before the run directory is created
        super().__init__(self.cfg, None, data, out_dir, ctx, resume=resume)

    def setup_data(self, data, model, *, resume: bool) -> None:
        pass  # done by _load

    def _load(self, data) -> None:
        from lmforge.checkpoints import load_model
        from lmforge.tokenizer import load_tokenizer

        cfg, m = self.cfg, self.method
        if cfg.answer_prefix is not None:
            raise ConfigError("answer_prefix weighs a pretraining corpus; SFT already takes its loss on the assistant tokens only: remove it.")
        if m.finetune == "lora" and self.ctx.distributed and self.ctx.strategy == "fsdp":
            raise ConfigError("finetune=lora trains a few small matrices: use --strategy=ddp (FSDP shards whole models).")
        if data is None:
            raise ChatDataError("no training data given; pass --data with a .jsonl file of conversations.")
        train = read_conversations(data)
        held = read_conversations(m.val_data) if m.val_data else None
        self.tokenizer = load_tokenizer(m.model)
        if m.chat_template:
            path = Path(m.chat_template)
            if not path.is_file():
                raise ConfigError(f"chat_template: {path} does not exist; give a Jinja file.")
            self.tokenizer.chat_template = path.read_text(encoding="utf-8")
        require_chat_template(self.tokenizer, data, m.model)
        self.base = load_model(m.model, quantize="none")  # trainable float base (int8 QLoRA quantizes it later)
        self.model_config = self.base.config
        if self.model_config.arch != "decoder":
            raise ConfigError(f"SFT trains decoder-only models; {m.model} is an {self.model_config.arch} model.")
        if m.finetune == "lora":  # a target that names no module fails now, not after the run has started
            from lmforge.align.lora import select_pieces

            select_pieces(self.base, m.lora_targets)
        self.block_size = cfg.block_size or min(self.model_config.max_seq_len, 1024)
        if self.block_size > self.model_config.max_seq_len:
            raise ConfigError(f"block_size={self.block_size} is above the model's context of {self.model_config.max_seq_len} tokens.")
        if held is None:
            if len(train) < 2:
                raise ChatDataError(f"{data} has one conversation; give more, or a separate val_data file.")
            train, held = split_examples(train, cfg.val_fraction, cfg.seed)
        length = self.block_size + 1
        encoded = {"train": encode_conversations(self.tokenizer, train), "val": encode_conversations(self.tokenizer, held)}
        fitted = {k: [f for f in (_fit(e, length) for e in v) if f is not None] for k, v in encoded.items()}
        self.truncated = sum(len(e.ids) > length for v in encoded.values() for e in v)
        if not fitted["train"]:
            raise ChatDataError(f"{data}: no conversation has an assistant token within block_size={self.block_size}; raise block_size.")
        if not fitted["val"]:
            raise ChatDataError(f"the held-out conversations have no assistant token within block_size={self.block_size}.")
        rows = fitted["train"]
        if m.packing:
            shuffled = list(rows)
            random.Random(cfg.seed).shuffle(shuffled)
            rows = pack(shuffled, length)
        self.n_examples = {k: len(v) for k, v in fitted.items()}
        self.learn_tokens = sum(sum(e.mask[1:]) for e in fitted["train"])
        pad = next((i for i in (self.tokenizer.pad_id, self.tokenizer.eos_id) if i is not None), 0)
        self.train_loader = SFTBatches(rows, cfg.batch_size, cfg.seed, pad)
        self.eval_loaders = {"train": SFTBatches(fitted["train"], cfg.batch_size, cfg.seed, pad, shuffle=False),
                             "val": SFTBatches(fitted["val"], cfg.batch_size, cfg.seed, pad, shuffle=False)}  # fmt: skip
        # evaluate each held-out conversation once (at most eval_iters batches)
        self.cfg = cfg.replace(eval_iters=min(cfg.eval_iters, -(-len(fitted["val"]) // cfg.batch_size)))
        mean_len = sum(len(r.ids) - 1 for r in rows) / len(rows)  # the rate counts real tokens, not padding
        self.tokens_per_step = round(cfg.gradient_accumulation_steps * cfg.batch_size * mean_len)

    def build_model(self) -> torch.nn.Module:
        from lmforge.train import checkpoint as ckpt_io

        m, model = self.method, self.base.train()
        del self.base
        if m.finetune == "lora":
            apply_lora(model, m.lora_targets, r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout, quantize_base=m.quantize_base)
            if self.ckpt is not None:
                load_adapter_weights(model, self.ckpt)
        elif self.ckpt is not None:
            ckpt_io.load_model_weights(self.ckpt, model)
        return model

    def train_batch(self, index: int) -> dict[str, torch.Tensor]:
        return self._to_device(self.train_loader.batch(index))

    def eval_batch(self, split: str, index: int) -> dict[str, torch.Tensor]:
        return self._to_device(self.eval_loaders[split].batch(index))

    def data_state(self) -> dict:
        index = self.step * self.cfg.gradient_accumulation_steps
        return {"batch_index": index, "epoch": self.train_loader.epoch_of(index), "examples": self.n_examples,
                "packing": self.method.packing}  # fmt: skip

    def export_model(self, raw: torch.nn.Module, directory: Path) -> None:
        """LoRA: the adapter in PEFT's format (plus the tokenizer); full: a Hugging Face checkpoint."""
        if lora_layers(raw):
            from lmforge.checkpoints import resolve

            save_adapter(raw, directory, base_model=str(resolve(self.method.model).resolve()))
            self.tokenizer.save(directory)
        else:
            super().export_model(raw, directory)

    def plot_title(self) -> str:
        return f"{self.out.name}: SFT ({self.method.finetune}), loss on assistant tokens"

    def describe(self) -> str:
        trainable = sum(p.numel() for p in self.raw.parameters() if p.requires_grad)
        m = self.method
        how = (f"LoRA r={m.lora_r} on {', '.join(m.lora_targets)}" + (", int8 base" if m.quantize_base else "")
               if m.finetune == "lora" else "full fine-tuning")  # fmt: skip
        note = f", {self.truncated} cut to block_size" if self.truncated else ""
        return (f"SFT of {m.model or 'SmolLM2-135M-Instruct'} ({how}): {trainable:,} of "
                f"{self.raw.num_parameters():,} parameters trained; {self.n_examples['train']} train / "
                f"{self.n_examples['val']} held-out conversations, {self.learn_tokens:,} assistant tokens{note}")  # fmt: skip


def sft(recipe: AlignRecipe[SFTConfig], data: Any, out_dir: str | os.PathLike = "out", *, resume: bool = False) -> TrainResult:
    """Fine-tune ``recipe.method.model`` on the conversations in ``data`` (a .jsonl file or folder),
    writing metrics.jsonl, loss.png, checkpoints and the result (a PEFT adapter, or a whole
    Hugging Face checkpoint with finetune=full) into ``out_dir``. Under torchrun: DDP."""
    ctx = init_distributed(recipe.train.device, recipe.train.strategy)
    try:
        return SFTTrainer(recipe, data, out_dir, ctx, resume=resume).run()
    finally:
        ctx.close()


__all__ = ["SFTConfig", "SFTTrainer", "load_sft_recipe", "sft", "pack", "collate"]
