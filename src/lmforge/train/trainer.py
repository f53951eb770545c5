"""The pretraining loop: ``pretrain(train_cfg, model, data, out_dir)``.

One loop for every objective and every launch (one process, or torchrun with DDP or FSDP2):

    for each update:
        for each of this process's micro-batches:    batch = objective(windows)   (seeded by its index)
            loss = cross_entropy(model(batch)) / micro-batches; backward (gradients sync on the last)
        clip gradients; AdamW step; scheduler step (warmup + cosine)
        log every log_interval, evaluate every eval_interval, checkpoint every checkpoint_interval

Micro-batch ``k`` of update ``s`` is global batch ``s * gradient_accumulation_steps + k``: a
process handles the k with ``k % world_size == rank``, so N processes see exactly the batches one
process would, and a resumed run sees exactly the batches the killed one would have.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.config import ConfigError, ModelConfig
from lmforge.data import (
    IGNORE_INDEX,
    AnswerWeights,
    DataError,
    RandomWindows,
    SequentialWindows,
    TokenData,
    collect_files,
    generator,
    make_objective,
    mix_seed,
    prepare,
    special_ids,
)
from lmforge.data.objectives import ARCH_OF
from lmforge.errors import UserError
from lmforge.train import checkpoint as ckpt_io
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import DistContext, block_modules, gradient_sync, init_distributed, wrap_model
from lmforge.train.metrics import MetricsLog, plot_loss, read_metrics
from lmforge.train.optim import WarmupCosine, build_optimizer

_DATA_SALT, _EVAL_SALT, _DROPOUT_SALT = 0, 1, 2


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_val_loss: float | None
    final_train_loss: float | None  # the evaluation estimate on the training split
    best_val_loss: float | None
    tokens_per_s: float | None  # median over logging intervals (evaluation and checkpoint time excluded)
    wall_time_s: float
    checkpoint: Path | None
    model_config: ModelConfig
    metrics: list[dict] = field(default_factory=list, repr=False)


# --- setting up ---------------------------------------------------------------------------------------
def _fingerprint(files: list[Path], cfg: TrainConfig) -> dict:
    return {
        "inputs": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        "tokenizer": cfg.tokenizer, "val_fraction": cfg.val_fraction, "field": cfg.field,
    }  # fmt: skip


def _on_main(ctx: DistContext, fn):
    """Run ``fn`` on rank 0 only; if it fails there, every process fails too (none is left waiting)."""
    failure, original = None, None
    if ctx.is_main:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            failure, original = (isinstance(e, UserError), str(e)), e
    if ctx.distributed:
        import torch.distributed as dist

        box = [failure]
        dist.broadcast_object_list(box, src=0)
        failure = box[0]
    if original is not None:
        raise original
    if failure is not None:
        is_user, message = failure
        raise UserError(message) if is_user else RuntimeError(f"rank 0 failed while preparing the data: {message}")


def load_data(data: Any, cfg: TrainConfig, out_dir: Path, ctx: DistContext, *, resume: bool) -> TokenData:
    """A prepared directory as is; a raw corpus (file or folder of .txt/.md/.jsonl) prepared into
    ``out_dir/data`` with ``cfg.tokenizer``, or reused from there when it is unchanged."""
    if isinstance(data, TokenData):
        return data
    if data is None:
        raise DataError("no training data given; pass --data with a prepared directory or a text corpus.")
    path = Path(data)
    if path.is_dir() and (path / "meta.json").is_file():
        return TokenData(path)
    files = collect_files(path)
    if cfg.tokenizer is None:
        raise DataError(
            f"{path} is a raw corpus, so the config needs a tokenizer: set tokenizer to char, bpe:N or a tokenizer path."
        )
    target = out_dir / "data"
    wanted = _fingerprint(files, cfg)

    def build():
        if (target / "meta.json").is_file():
            cached = TokenData(target)
            if cached.meta.get("source_info") == wanted:
                return
            if resume:
                raise DataError(f"the corpus or tokenizer changed since {out_dir} was started; resume with the same --data and tokenizer.")
        prepare(files, target, cfg.tokenizer, val_fraction=cfg.val_fraction, field=cfg.field,
                progress=cfg.progress, source_info=wanted)  # fmt: skip

    _on_main(ctx, build)
    return TokenData(target)


def resolve_model_config(model: ModelConfig | dict | None, tokenizer, cfg: TrainConfig) -> ModelConfig:
    """The model to train. A ModelConfig is used as given. A dict (a recipe's model section: an
    optional ``preset`` plus ModelConfig values) has what it leaves unset filled in from the data:
    the vocabulary size and special token ids from the tokenizer, the MLM head for masked LM."""
    specials = special_ids(tokenizer)
    if isinstance(model, ModelConfig):
        mc = model
        explicit_vocab = True
    else:
        spec = dict(model or {})
        preset = spec.pop("preset", None)
        explicit_vocab = "vocab_size" in spec
        fill: dict[str, Any] = {}
        if not explicit_vocab:
            fill["vocab_size"] = tokenizer.vocab_size
        tokens = {"bos_token_id": specials.bos, "eos_token_id": specials.eos, "pad_token_id": specials.pad}
        if cfg.objective == "span":
            tokens["decoder_start_token_id"] = specials.pad if specials.pad is not None else specials.eos
        fill |= {k: v for k, v in tokens.items() if k not in spec}
        if cfg.objective == "mlm" and "head" not in spec:
            fill["head"] = "mlm"
        values = {**fill, **spec}
        mc = ModelConfig.from_name(preset, **values) if preset else ModelConfig.from_dict(values)
    if tokenizer.vocab_size > mc.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has {mc.vocab_size}; "
            f"set vocab_size to at least {tokenizer.vocab_size} or leave it unset to follow the tokenizer."
        )
    need = ARCH_OF[cfg.objective]
    if mc.arch != need:
        raise ConfigError(f"objective={cfg.objective} needs arch={need} but the model config has arch={mc.arch}; change one of them.")
    if cfg.objective == "mlm" and mc.head != "mlm":
        raise ConfigError("objective=mlm needs the encoder's MLM head; set head: mlm in the model section.")
    block = cfg.block_size or mc.max_seq_len
    if block > mc.max_seq_len:
        raise ConfigError(
            f"block_size={block} is above the model's context of {mc.max_seq_len} tokens; "
            f"lower block_size or raise max_seq_len."
        )
    return mc


def _autocast(cfg: TrainConfig, device: torch.device):
    """(autocast context factory, dtype name, GradScaler-needed)."""
    kind = cfg.dtype
    if kind == "auto":
        if device.type == "cuda":
            kind = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            kind = "float32"
    if kind == "float32":
        return contextlib.nullcontext, kind, False
    dtype = getattr(torch, kind)
    return (lambda: torch.autocast(device.type, dtype=dtype)), kind, kind == "float16"


def answer_weights(cfg: TrainConfig, tokenizer) -> AnswerWeights | None:
    """The per-label loss weights of ``cfg.answer_prefix`` (None without one), its texts as token ids."""
    if cfg.answer_prefix is None:
        return None
    from lmforge.tokenizer import TokenizerError

    try:
        prefix = tokenizer.encode(cfg.answer_prefix, add_special_tokens=False)
        end = tokenizer.encode(cfg.answer_end, add_special_tokens=False)
    except TokenizerError as e:
        raise ConfigError(f"answer_prefix/answer_end cannot be tokenized: {e}") from None
    return AnswerWeights(tuple(prefix), tuple(end), cfg.answer_weight, cfg.context_weight)


def enable_activation_checkpointing(model: torch.nn.Module) -> int:
    """Recompute each block's activations in the backward pass instead of storing them."""
    from torch.utils.checkpoint import checkpoint

    blocks = block_modules(model)
    for block in blocks:
        def checkpointed(*args, _forward=block.forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
    return len(blocks)


_NOT_INPUTS = ("labels", "loss_weights")


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The summed cross-entropy of the labelled positions (labels == -100 are ignored), each
    multiplied by its weight when ``weights`` (the shape of ``labels``) is given."""
    labels = labels.reshape(-1)
    logits = logits.reshape(-1, logits.size(-1)).float()
    if weights is None:
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    nll = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    return (nll * weights.reshape(-1).to(nll.dtype)).sum()


def loss_normalizer(labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """What ``summed_loss`` is divided by: the number of labelled positions, or their total weight."""
    labelled = labels != IGNORE_INDEX
    total = labelled.sum() if weights is None else (weights.float() * labelled).sum()
    return total.clamp(min=1) if weights is None else total.clamp(min=1e-12)


def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions (labels == -100 are ignored); with
    ``loss_weights`` in the batch (B, T, from TrainConfig.answer_prefix), the weighted mean
    sum(w * nll) / sum(w)."""
    labels, weights = batch["labels"], batch.get("loss_weights")
    logits = model(**{k: v for k, v in batch.items() if k not in _NOT_INPUTS})
    return summed_loss(logits, labels, weights) / loss_normalizer(labels, weights)


# --- the trainer ---------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, model, data, out_dir: str | os.PathLike, ctx: DistContext, *, resume: bool = False):
        self.cfg, self.ctx, self.out = cfg, ctx, Path(out_dir)
        self.started = time.perf_counter()
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out} is a file; give a directory for the run (it is created if missing).")
        if resume and (not self.out.is_dir() or ckpt_io.latest_checkpoint(self.out) is None):
            raise UserError(f"--resume: {self.out} holds no checkpoint to continue; drop --resume to start a new run there.")
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        ctx.barrier()
        if ctx.is_main:  # partial checkpoints of a killed run: never listed, now removed
            for partial in ckpt_io.checkpoint_root(self.out).glob(".tmp-step-*"):
                shutil.rmtree(partial, ignore_errors=True)
        ctx.barrier()
        existing = ckpt_io.latest_checkpoint(self.out)
        if existing is not None and not resume:
            raise UserError(f"{self.out} already holds a run (checkpoint {existing.name}); pass --resume to continue it or choose another --out.")
        self.ckpt = existing if resume else None

        self.setup_data(data, model, resume=resume)
        from lmforge.parallel.context import ContextParallel  # context_parallel=N: N ranks share each sequence

        self.cp = ContextParallel.setup(cfg.context_parallel, ctx, self.model_config, self.block_size, cfg.objective, ctx.strategy)
        if cfg.gradient_accumulation_steps % self.cp.dp_size:
            raise ConfigError(
                f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple of the "
                f"{self.cp.dp_size} data-parallel processes (it counts micro-batches over all of them, as in nanoGPT)."
            )
        self.micro_steps = cfg.gradient_accumulation_steps // self.cp.dp_size

        # model, optimizer, schedule
        torch.manual_seed(cfg.seed)
        self.state: dict[str, Any] = ckpt_io.read_state(self.ckpt) if self.ckpt is not None else {}
        raw = self.build_model()
        raw.to(ctx.device)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(raw)
        self.cp.attach(raw)
        if cfg.compile:
            raw.compile()
        self.raw = raw
        self.model = wrap_model(raw, ctx)
        self.eval_model = self.model if ctx.strategy == "fsdp" and ctx.distributed else raw
        self.optimizer = build_optimizer(self.model, cfg, ctx.device)
        self.scheduler = WarmupCosine(self.optimizer, cfg)
        self.autocast, self.dtype_name, use_scaler = _autocast(cfg, ctx.device)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=use_scaler)
        self.step = 0
        if self.ckpt is not None:
            ckpt_io.load_optimizer(self.ckpt, self.model, self.optimizer)
            self.scheduler.load_state_dict(self.state["scheduler"])
            if self.state.get("scaler"):
                self.scaler.load_state_dict(self.state["scaler"])
            self.step = int(self.state["step"])
            same_layout = int(self.state.get("world_size", 1)) == ctx.world_size
            if not (same_layout and ckpt_io.load_rng(self.ckpt, ctx)):
                torch.manual_seed(mix_seed(cfg.seed, _DROPOUT_SALT, ctx.rank, self.step))
        else:
            torch.manual_seed(mix_seed(cfg.seed, _DROPOUT_SALT, ctx.rank))  # dropout differs per process

        self.log = MetricsLog(self.out, resume_step=self.step if self.ckpt else None, tensorboard=cfg.tensorboard) if ctx.is_main else None
        # what the run logged up to its checkpoint (every process reads it: they must agree on the last evaluation)
        previous = [r for r in read_metrics(self.out) if r.get("step", 0) <= self.step] if self.ckpt else []
        vals = [r["val_loss"] for r in previous if "val_loss" in r]
        self.best_val = min(vals) if vals else None
        self.last_eval: dict | None = next((r for r in reversed(previous) if "val_loss" in r), None)
        self.rates: list[float] = []
        if ctx.is_main:
            (self.out / "train_config.json").write_text(
                json.dumps({"train": cfg.to_dict(), "model": self.model_config.to_dict(), "world_size": ctx.world_size}, indent=2)
            )

    # --- what a subclass may replace (lmforge.align's SFT trainer does) --------------------------------
    name = "pretrain"  # the progress bar's label

    def setup_data(self, data, model, *, resume: bool) -> None:
        """Set the tokenizer, ``model_config``, ``block_size``, ``tokens_per_step`` and the loaders
        behind ``train_batch`` / ``eval_batch``: here token shards and a pretraining objective."""
        cfg, ctx = self.cfg, self.ctx
        self.data = load_data(data, cfg, self.out, ctx, resume=resume)
        self.tokenizer = self.data.tokenizer()
        if self.tokenizer.vocab_size != self.data.vocab_size:
            raise DataError(f"{self.data.path}: meta.json says {self.data.vocab_size} tokens but its tokenizer has {self.tokenizer.vocab_size}.")
        self.model_config = resolve_model_config(model, self.tokenizer, cfg)
        self.block_size = cfg.block_size or self.model_config.max_seq_len
        self.specials = special_ids(self.tokenizer)
        self.objective = make_objective(
            cfg.objective, self.block_size, self.specials, self.model_config.vocab_size,
            mlm_probability=cfg.mlm_probability, noise_density=cfg.noise_density,
            mean_noise_span_length=cfg.mean_noise_span_length, decoder_start_id=self.model_config.decoder_start_token_id,
            answers=answer_weights(cfg, self.tokenizer),
        )  # fmt: skip
        if self.objective.decoder_length and self.objective.decoder_length > self.model_config.max_seq_len:
            raise ConfigError(f"span corruption targets have {self.objective.decoder_length} tokens, above max_seq_len={self.model_config.max_seq_len}.")
        self.tokens_per_step = cfg.gradient_accumulation_steps * cfg.batch_size * self.block_size

        # loaders: batch i of each is a function of (seed, i) only
        train = self.data.split("train")
        window = self.objective.window
        if cfg.loader == "random":
            self.train_loader = RandomWindows(train, window, cfg.batch_size, cfg.seed)
        else:
            self.train_loader = SequentialWindows(train, window, cfg.batch_size, stride=self.block_size)
        self.eval_loaders = {
            split: RandomWindows(self.data.split(split), window, cfg.batch_size, cfg.seed, what=split)
            for split in ("train", "val")
        }


    def build_model(self) -> torch.nn.Module:
        """The model to train, on the CPU, with the checkpoint's weights when resuming."""
        from lmforge.models import build_model

        raw = build_model(self.model_config)
        if self.ckpt is not None:
            saved = self.state.get("model_config", {})
            diff = sorted(k for k, v in self.model_config.to_dict().items() if saved.get(k, v) != v)
            if diff:
                k = diff[0]
                raise ConfigError(
                    f"{self.ckpt} was trained with {k}={saved[k]!r} but the config now says {getattr(self.model_config, k)!r}; "
                    "resume with the same model settings."
                )
            ckpt_io.load_model_weights(self.ckpt, raw)
        elif self.cfg.init_from:  # fine-tune: weights from there, positions (RoPE tables) from this config
            ckpt_io.load_model_weights(self.cfg.init_from, raw)
        return raw

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of one micro-batch (a scalar tensor)."""
        return compute_loss(model, batch)

    def micro_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, training: bool) -> torch.Tensor:
        """``loss``, or under context parallelism this rank's share of it over its zig-zag shard."""
        if self.cp.size > 1:
            return self.cp.loss(model, batch, training)
        return self.loss(model, batch)

    def data_state(self) -> dict:
        """Where the data stands, saved in trainer_state.json."""
        return {**self.train_loader.state_dict(self.step * self.cfg.gradient_accumulation_steps),
                "objective": self.cfg.objective, "data_dir": str(self.data.path)}  # fmt: skip

    def export_model(self, raw: torch.nn.Module, directory: Path) -> None:
        """Write the model files of a checkpoint into ``directory`` (rank 0): a Hugging Face directory."""
        from lmforge.checkpoints import save_pretrained

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*saving in lmforge's own format.*")
            save_pretrained(raw, directory, tokenizer=self.tokenizer)

    def plot_title(self) -> str:
        return f"{self.out.name}: {self.cfg.objective} ({self.model_config.arch})"

    def describe(self) -> str:
        """The first words of the start-up line."""
        return f"{self.model_config.arch} model, {self.raw.num_parameters() / 1e6:.2f}M parameters, objective {self.cfg.objective}"

    # --- batches ----------------------------------------------------------------------------------
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self.ctx.device
        if dev.type == "cpu":
            return batch
        return {k: v.pin_memory().to(dev, non_blocking=True) for k, v in batch.items()}

    def train_batch(self, index: int) -> dict[str, torch.Tensor]:
        g = generator(self.cfg.seed, _DATA_SALT, index)
        return self._to_device(self.objective(self.train_loader.batch(index, g), g))

    def eval_batch(self, split: str, index: int) -> dict[str, torch.Tensor]:
        g = generator(self.cfg.seed, _EVAL_SALT, 0 if split == "train" else 1, index)
        return self._to_device(self.objective(self.eval_loaders[split].batch(index, g), g))

    # --- steps --------------------------------------------------------------------------------------
    def train_step(self) -> torch.Tensor:
        """One update; returns this process's mean micro-batch loss (a tensor: no device sync)."""
        cfg, ctx = self.cfg, self.ctx
        loss_sum = torch.zeros((), device=ctx.device)
        for m in range(self.micro_steps):
            k = m * self.cp.dp_size + self.cp.dp_rank
            batch = self.train_batch(self.step * cfg.gradient_accumulation_steps + k)
            with gradient_sync(self.model, ctx, sync=m == self.micro_steps - 1), self.autocast():
                loss = self.micro_loss(self.model, batch, training=True) / self.micro_steps
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return loss_sum

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over ``eval_iters`` fixed batches of each split (the same batches every time)."""
        cfg, ctx = self.cfg, self.ctx
        model = self.eval_model
        model.eval()
        per_process = -(-cfg.eval_iters // self.cp.dp_size)  # equal counts: FSDP forwards are collective
        out = {}
        for split in ("train", "val"):
            total = torch.zeros((), device=ctx.device, dtype=torch.float64)
            for i in range(per_process):
                j = i * self.cp.dp_size + self.cp.dp_rank
                with self.autocast():
                    loss = self.micro_loss(model, self.eval_batch(split, min(j, cfg.eval_iters - 1)), training=False)
                if j < cfg.eval_iters:
                    total += loss.double()
            out[split] = (ctx.all_reduce_sum(total) / cfg.eval_iters).item()
        model.train()
        return out

    def save(self) -> Path:
        state = {
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "data": self.data_state(),
            "model_config": self.model_config.to_dict(),
            "train_config": self.cfg.to_dict(),
            "tokens_seen": self.step * self.tokens_per_step,
        }  # fmt: skip
        return ckpt_io.save_checkpoint(
            self.out, self.step, model=self.model, optimizer=self.optimizer, state=state, ctx=self.ctx,
            tokenizer=self.tokenizer, keep_last=self.cfg.keep_last, export=self.export_model,
        )  # fmt: skip

    # --- the loop -------------------------------------------------------------------------------------
    def _say(self, text: str, bar=None) -> None:
        if self.ctx.is_main and self.cfg.progress:
            (bar.write if bar is not None else print)(text)

    def _eval_and_log(self, bar) -> None:
        losses = self.evaluate()
        record = {"step": self.step, "val_loss": losses["val"], "val_ppl": math.exp(min(losses["val"], 50.0)),
                  "train_loss_eval": losses["train"]}  # fmt: skip
        self.last_eval = record
        if self.best_val is None or losses["val"] < self.best_val:
            self.best_val = losses["val"]
        if self.log is not None:
            self.log.log(record)
        self._say(f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} (ppl {record['val_ppl']:.2f})", bar)

    def run(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        from tqdm.auto import tqdm

        if ctx.is_main and cfg.progress:
            print(
                f"{self.describe()}, "
                f"{self.tokens_per_step:,} tokens/update, {ctx.world_size} process(es)"
                + (f" ({ctx.strategy})" if ctx.distributed else "") + f", {ctx.device}, {self.dtype_name}"
                + (f"; resuming from {self.ckpt.name}" if self.ckpt else "")
            )
        bar = tqdm(total=cfg.max_iters, initial=self.step, desc=self.name, unit="it", dynamic_ncols=True,
                   disable=not (ctx.is_main and cfg.progress))  # fmt: skip
        save_every = cfg.save_interval
        if self.step == 0 and cfg.eval_interval and cfg.eval_iters:
            self._eval_and_log(bar)
        t_log, paused, steps_since = time.perf_counter(), 0.0, 0
        last_saved = self.step if self.ckpt else -1
        while self.step < cfg.max_iters:
            loss = self.train_step()
            steps_since += 1
            bar.update(1)
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_iters:
                loss_value = ctx.all_reduce_mean(loss).item()  # the only sync between logs
                now = time.perf_counter()
                rate = self.tokens_per_step * steps_since / max(now - t_log - paused, 1e-9)
                self.rates.append(rate)
                record = {"step": self.step, "loss": loss_value, "lr": self.last_lr,
                          "tok_s": rate, "elapsed_s": now - self.started}  # fmt: skip
                if self.log is not None:
                    self.log.log(record)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
                t_log, paused, steps_since = now, 0.0, 0
            t0 = time.perf_counter()
            if cfg.eval_interval and cfg.eval_iters and (self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters):
                self._eval_and_log(bar)
            if (save_every and self.step % save_every == 0) or self.step == cfg.max_iters:
                self.save()
                last_saved = self.step
            paused += time.perf_counter() - t0
        bar.close()
        if cfg.eval_iters and (self.last_eval is None or self.last_eval["step"] != self.step):
            self._eval_and_log(None)
        if last_saved != self.step:
            self.save()
        self._export()
        wall = time.perf_counter() - self.started
        metrics = read_metrics(self.out) if ctx.is_main else []
        if ctx.is_main:
            self.log.close()
            png = plot_loss(self.out, title=self.plot_title())
            self._say(f"done in {wall:.1f}s; final val loss {self.last_eval['val_loss']:.4f}" if self.last_eval else f"done in {wall:.1f}s")
            if png is not None:
                self._say(f"loss curve: {png}; model: {self.out}; metrics: {self.out / 'metrics.jsonl'}")
        rates = self.rates[1:] if len(self.rates) > 1 else self.rates
        return TrainResult(
            out_dir=self.out, steps=self.step,
            final_val_loss=self.last_eval["val_loss"] if self.last_eval else None,
            final_train_loss=self.last_eval.get("train_loss_eval") if self.last_eval else None,
            best_val_loss=self.best_val, tokens_per_s=statistics.median(rates) if rates else None,
            wall_time_s=wall, checkpoint=ckpt_io.latest_checkpoint(self.out), model_config=self.model_config,
            metrics=metrics,
        )  # fmt: skip

    def _export(self) -> None:
        """The final model as a Hugging Face directory at the run's top level (``load_model(out_dir)``)."""
        latest = ckpt_io.latest_checkpoint(self.out)
        if self.ctx.is_main and latest is not None:
            for name in os.listdir(latest):
                src = latest / name
                if src.is_file() and name != ckpt_io.STATE_FILE and not name.startswith("rng-"):
                    tmp = self.out / f".{name}.tmp"
                    shutil.copyfile(src, tmp)
                    os.replace(tmp, self.out / name)
        self.ctx.barrier()


def pretrain(
    train_cfg: TrainConfig,
    model: ModelConfig | dict | None = None,
    data: Any = None,
    out_dir: str | os.PathLike = "out",
    *,
    resume: bool = False,
) -> TrainResult:
    """Pretrain a model on ``data`` (a prepared directory, or a raw corpus prepared with
    ``train_cfg.tokenizer``), writing checkpoints, metrics.jsonl, loss.png and the final model
    (a Hugging Face directory) into ``out_dir``. Under torchrun it trains with DDP or FSDP2
    (``train_cfg.strategy``). ``resume=True`` continues from the latest checkpoint in ``out_dir``."""
    ctx = init_distributed(train_cfg.device, train_cfg.strategy)
    fresh = not Path(out_dir).exists()
    try:
        try:
            trainer = Trainer(train_cfg, model, data, out_dir, ctx, resume=resume)
        except Exception:
            if fresh and ctx.is_main:  # a run that could not start leaves no half-made directory behind
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
        return trainer.run()
    finally:
        ctx.close()
