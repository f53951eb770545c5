"""What the reward-model, DPO, PPO and GRPO runs share: the recipe, the run directory (metrics,
curves, atomic checkpoints, resume), loading and partly freezing the model, the optimizer.

A recipe is a flat YAML mapping of the run's config fields (``RMConfig``, ``DPOConfig``,
``PPOConfig``, ``GRPOConfig``); ``--key=value`` overrides any of them and an unknown key is refused
with the closest known names (the pretraining recipe's rules, ``lmforge.train.config``).

    RUN/
      metrics.jsonl           one JSON line per logged step (lmforge.train.metrics.MetricsLog)
      curves.png              every logged series, one panel each
      checkpoints/step-N/     policy (Hugging Face format) + extra heads + optimizer + RNG + state,
                              written into .tmp-step-N and renamed: a checkpoint is whole or absent
      final/                  the trained model

The pair trainers (rm, dpo) also run data-parallel under ``torchrun`` (``DataParallel``): every
process takes its share of each batch and the gradients are summed across processes, so N
processes take the step one process would; only rank 0 writes the run directory. ``strategy``
chooses how: ``ddp`` keeps a full replica per process, ``fsdp`` shards parameters, gradients and
optimizer state with FSDP2 (``lmforge.train.distributed.wrap_model``, as pretraining does).

A checkpoint holds the modules' full weights (``training.pt``, gathered on rank 0 under FSDP) and the
optimizer state in ``optimizer/`` (torch.distributed.checkpoint, one shard per process, re-sharded
on load), so a run resumes on one process or several, with either strategy.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import torch
import torch.distributed as dist
from torch import nn

from lmforge.config import ConfigError
from lmforge.errors import UserError
from lmforge.plots import save_figure
from lmforge.train.checkpoint import (STATE_FILE, _fsync_dir, _fsync_tree, _is_fsdp, checkpoint_root, full_model_state,
                                     latest_checkpoint, list_checkpoints, load_full_model_state, load_optimizer,
                                     save_optimizer)  # fmt: skip
from lmforge.train.config import STRATEGIES, coerce, parse_overrides, read_yaml_recipe, unknown_key
from lmforge.train.metrics import MetricsLog, read_metrics
from lmforge.train.optim import param_groups


@dataclass
class AlignConfig:
    """Fields every alignment run has."""

    model: str | None = None  # HF directory or .gguf file; None: the bundled SmolLM2-135M-Instruct
    tokenizer: str | None = None  # default: the model's own
    chat: bool | None = None  # text prompts through the chat template; None: when the tokenizer has one
    max_steps: int = 100  # optimizer updates
    batch_size: int = 8  # pairs (rm, dpo) or prompts (ppo, grpo) per update
    micro_batch_size: int | None = None  # sequences per forward (gradient accumulation); None: batch_size
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0: off
    warmup_steps: int = 0
    max_length: int = 256  # prompt + response tokens
    train_layers: int | None = None  # train only the last N blocks (and the final norm, heads); None: all
    eval_fraction: float = 0.1  # share of the data held out (rm, dpo)
    eval_interval: int = 50  # 0: only at the end
    log_interval: int = 1
    checkpoint_interval: int = 50  # 0: only at the end
    keep_last: int = 2
    seed: int = 0
    progress: bool = True
    dtype: str = "float32"
    strategy: str = "ddp"  # under torchrun: ddp (a full replica per process) | fsdp (FSDP2: everything sharded)

    def __post_init__(self) -> None:
        for name in ("max_steps", "eval_interval", "checkpoint_interval", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}.")
        for name in ("batch_size", "log_interval", "keep_last", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size:
            raise ConfigError(f"micro_batch_size must be at least 1, got {self.micro_batch_size}.")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}.")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must lie in [0, 1), got {self.eval_fraction}.")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype={self.dtype!r} is not supported; choose float32 or bfloat16.")
        _check_strategy(self.strategy)

    @property
    def micro(self) -> int:
        return self.micro_batch_size or self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy!r} is not supported; choose ddp or fsdp (it matters only under torchrun).")


def load_config(cls, path: str | os.PathLike | None = None, overrides: dict | list[str] | None = None):
    """A config of class ``cls`` from a flat YAML recipe plus ``--key=value`` overrides."""
    raw = read_yaml_recipe(path)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    values = {**raw, **(overrides or {})}
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            raise unknown_key(key, known)
    return cls(**{k: coerce(cls, k, v) for k, v in values.items()})


# --- model ------------------------------------------------------------------------------------------
def load_policy(cfg: AlignConfig):
    """(model, tokenizer) in train mode on the CPU, in the config's dtype."""
    from lmforge.checkpoints import load_model
    from lmforge.tokenizer import load_tokenizer

    dtype = getattr(torch, cfg.dtype)
    model = load_model(cfg.model, dtype=dtype, quantize="none")
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    model.train()
    return model, tokenizer


def freeze_lower_layers(model: nn.Module, train_layers: int | None) -> None:
    """Train only the last ``train_layers`` blocks, the final norm and any head; freeze the rest
    (embeddings included: with tied embeddings the LM head stays frozen too)."""
    if train_layers is None:
        return
    layers = model.stack.layers
    if not 0 <= train_layers <= len(layers):
        raise ConfigError(f"train_layers={train_layers} must lie between 0 and the model's {len(layers)} layers.")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in list(layers)[len(layers) - train_layers:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    if model.stack.norm is not None and train_layers > 0:
        for p in model.stack.norm.parameters():
            p.requires_grad_(True)


def frozen_copy(model: nn.Module) -> nn.Module:
    """The reference: a copy in eval mode with no gradients. Make it before ``DataParallel.prepare``:
    under FSDP the reference stays a full replica on every process (it never trains, and its forward
    then needs no collective), while the policy is sharded."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def make_optimizer(modules: list[nn.Module], cfg: AlignConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (decay on linear weights only, lmforge.train's groups)."""
    groups: list[dict] = []
    for m in modules:
        groups += [g for g in param_groups(m, cfg.weight_decay) if g["params"]]
    if not groups:
        raise ConfigError("no parameter is trainable; raise train_layers.")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8, foreach=True)


def lr_factor(step: int, cfg: AlignConfig) -> float:
    """Linear warmup over warmup_steps, then constant (the usual choice for short fine-tuning)."""
    return min(1.0, (step + 1) / (cfg.warmup_steps + 1)) if cfg.warmup_steps else 1.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def split_eval(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) after a seeded shuffle."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(items) * fraction))
    if fraction > 0 and n_eval == 0 and len(items) > 1:
        n_eval = 1
    held = [items[i] for i in order[:n_eval]]
    train = [items[i] for i in order[n_eval:]]
    if not train:
        raise UserError(f"{len(items)} examples leave nothing to train on after holding out {fraction:.0%}; add data.")
    return train, held


# --- run directory ----------------------------------------------------------------------------------
class Run:
    """A run directory: metrics, curves, checkpoints. ``start()`` returns the step to begin at
    (0, or the latest checkpoint's with ``resume``), having restored what was saved.

    Under torchrun every process calls ``start``, ``save`` and ``finish`` (with FSDP they gather the
    sharded weights and write the optimizer's shards together); only rank 0 writes the rest."""

    def __init__(self, out: str | os.PathLike, cfg: AlignConfig, kind: str, resume: bool = False, main: bool = True):
        self.out, self.cfg, self.kind, self.resume = Path(out), cfg, kind, resume
        self.main = main  # under torchrun only rank 0 writes; every rank reads a checkpoint to resume
        self.metrics: MetricsLog | None = None

    def start(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, extra: dict | None = None) -> int:
        step = 0
        ckpt = latest_checkpoint(self.out) if self.resume else None
        if self.resume and ckpt is None:
            raise UserError(f"--resume: {self.out} has no checkpoint to resume from; run without --resume.")
        if ckpt is not None:
            state = json.loads((ckpt / STATE_FILE).read_text())
            if state.get("kind") != self.kind:
                raise UserError(f"{ckpt} is a {state.get('kind')} checkpoint, not {self.kind}; resume it with `lmforge {state.get('kind')}`.")
            if not (ckpt / "optimizer").is_dir():
                raise UserError(f"{ckpt} has no optimizer/ folder (an older lmforge wrote it); resume it with that version "
                                "or start the run again.")  # fmt: skip
            blob = torch.load(ckpt / "training.pt", weights_only=True)
            for name, m in modules.items():
                load_full_model_state(m, blob["modules"][name])  # FSDP: each process keeps its shard
            load_optimizer(ckpt, nn.ModuleDict(modules), optimizer)  # re-sharded for this run's processes
            torch.set_rng_state(blob["rng"])
            random.setstate(_tuple(blob["py_rng"]))
            if extra is not None:
                extra.update(blob.get("extra", {}))
            step = int(state["step"])
        if not self.main:
            return step
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps({"kind": self.kind, **self.cfg.to_dict()}, indent=2))
        self.metrics = MetricsLog(self.out, resume_step=step if ckpt is not None else None, tensorboard=False)
        return step

    def log(self, record: dict) -> None:
        if not self.main:
            return
        self.metrics.log({k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in record.items()})

    def end_step(self, step: int, record: dict, evaluate: Callable[[], dict] | None) -> dict | None:
        """The end of an RL update: evaluate on the held-out prompts when due (``evaluate``; None: no
        held-out set), then log ``record`` when due. Returns the new evaluation, or None."""
        cfg, result = self.cfg, None
        if evaluate is not None and ((cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.max_steps):
            result = evaluate()
            record.update(result)
        if step % cfg.log_interval == 0 or result is not None:
            self.log(record)
        return result

    def checkpoint_due(self, step: int) -> bool:
        return bool(self.cfg.checkpoint_interval and step % self.cfg.checkpoint_interval == 0) or step == self.cfg.max_steps

    def save(self, step: int, modules: dict[str, nn.Module], optimizer, policy, tokenizer, extra: dict | None = None) -> Path:
        """Checkpoint ``step``: the policy (Hugging Face format), ``training.pt`` (the modules' full
        weights, RNG states, ``extra``) and ``optimizer/`` (every process writes its shard), written
        into a temporary folder, fsynced, then renamed (atomic)."""
        root = checkpoint_root(self.out)
        final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
        if self.main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        states = {k: full_model_state(m) for k, m in modules.items()}  # FSDP: gathered, kept on rank 0
        name = next((k for k, m in modules.items() if m is policy), None)
        plain = _exportable(policy, states[name]) if name is not None else _gathered(policy)
        save_optimizer(tmp, nn.ModuleDict(modules), optimizer)
        _barrier()
        if self.main:
            save_model(plain, tmp, tokenizer)
            torch.save({"modules": states, "rng": torch.get_rng_state(), "py_rng": random.getstate(), "extra": extra or {}},
                       tmp / "training.pt")  # fmt: skip
            (tmp / STATE_FILE).write_text(json.dumps({"kind": self.kind, "step": step}))
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(root)
            for old in list_checkpoints(self.out)[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def finish(self, policy, tokenizer, title: str) -> Path:
        """Write the final model (atomically, as a folder renamed into place) and the curves."""
        final, tmp = self.out / "final", self.out / ".tmp-final"
        plain = _gathered(policy)  # a collective under FSDP
        if not self.main:
            return final
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(plain, tmp, tokenizer)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        if self.metrics is not None:
            self.metrics.close()
        plot_curves(self.out, title)
        return final


class DataParallel:
    """Data parallelism for the pair trainers under ``torchrun`` (gloo on the CPU): each process takes
    every world-th example of a batch and scales its losses by the *global* batch size; the gradients
    are summed across processes, so every process takes exactly the step one process would take on
    the whole batch. Alone: a no-op, whatever the strategy.

    ``strategy="ddp"``: every process keeps a full replica; ``sync_grads`` sums the gradients after
    the backward passes (one flat all-reduce). ``strategy="fsdp"``: ``prepare`` shards the trainable
    model with FSDP2 (each transformer block, then the root; ``lmforge.train.distributed.wrap_model``);
    its parameters, gradients and optimizer state are DTensor shards, FSDP's reduce-scatter sums the
    gradients and ``torch.nn.utils.clip_grad_norm_`` clips by the global
    norm. Every forward pass gathers parameters with the other processes, so they all run the same
    number of them: ``micro_batches`` pads a process that is short of examples.

    - ``shard(items)``: this process's share of ``items`` (``micro_batches(items, micro, dp)``: in
      micro-batches, padded under FSDP).
    - ``prepare(model)``: the model the trainer uses (FSDP: sharded in place, its ``hidden`` method
      registered as a forward so ``lmforge.align.logprobs.response_logprobs`` works on it; the root's
      parameters, the tied embedding / LM head among them, stay gathered after a forward, so the
      ``lm_head`` call that follows ``hidden`` reads the full matrix). Make frozen copies (a DPO or
      PPO reference) before: they stay full replicas on every process.
    - ``accumulate(model, last)``: wraps a micro-batch's forward and backward (FSDP reduces the
      gradients after the last micro-batch of an update only).
    - ``sync_grads(params)``, ``sum(values)``: gradients and logged sums over the processes
      (``sync_grads`` leaves FSDP's shards alone: a replicated module next to a sharded one, a
      value head say, still has its gradients summed).
    - ``full_copy(model)``: a plain (unsharded) module with the current full weights, in eval mode
      and without gradients, on every process: a collective, so every process calls it. For what
      cannot run on DTensor parameters, e.g. the paged engine sampling RL rollouts (as TRL gathers
      ZeRO-3 parameters for generation). A model ``prepare`` did not shard (alone, DDP) comes back
      as itself, its mode untouched.
    """

    def __init__(self, strategy: str = "ddp"):
        from lmforge.train.distributed import init_distributed

        _check_strategy(strategy)
        self.ctx = init_distributed("cpu", strategy)
        self.fsdp = self.ctx.distributed and strategy == "fsdp"

    def __enter__(self) -> "DataParallel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def main(self) -> bool:
        return self.ctx.is_main

    def shard(self, items: list) -> list:
        return items[self.ctx.rank :: self.ctx.world_size]

    def prepare(self, model: nn.Module) -> nn.Module:
        if not self.fsdp:
            return model
        from lmforge.train.distributed import wrap_model

        _SKELETONS[model] = _skeleton(model)
        methods = ("hidden",) if callable(getattr(model, "hidden", None)) else ()
        return wrap_model(model, self.ctx, forward_methods=methods, sum_gradients=True)

    def accumulate(self, model: nn.Module, last: bool):
        if not self.fsdp:
            return contextlib.nullcontext()
        from lmforge.train.distributed import gradient_sync

        return gradient_sync(model, self.ctx, sync=last)

    def sync_grads(self, params: list[torch.Tensor]) -> None:
        if not self.ctx.distributed:
            return
        from torch.distributed.tensor import DTensor

        params = [p for p in params if not isinstance(p, DTensor)]  # FSDP reduced its shards' gradients in backward
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.ctx.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p).clone()

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes."""
        if not self.ctx.distributed:
            return list(values)
        return self.ctx.all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()

    def full_copy(self, model: nn.Module) -> nn.Module:
        if not _is_fsdp(model):
            return model
        return _plain_copy(model, full_model_state(model, every_rank=True))

    def close(self) -> None:
        self.ctx.barrier()
        self.ctx.close()


# FSDP cannot deep-copy a sharded module, so ``prepare`` keeps a twin of each one it shards: the same
# modules and buffers with parameters on the meta device (no memory), to be filled with full weights.
_SKELETONS: WeakKeyDictionary[nn.Module, nn.Module] = WeakKeyDictionary()


def _skeleton(model: nn.Module) -> nn.Module:
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo)  # a tied matrix is one parameter, so it stays tied


def _plain_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain module of ``model``'s structure holding the full weights ``state``, in eval mode."""
    skeleton = _SKELETONS.get(model)
    if skeleton is None:
        raise ValueError(f"this {type(model).__name__} was sharded without DataParallel.prepare, which keeps its unsharded twin.")
    memo = {id(p): nn.Parameter(state[name].detach(), requires_grad=False) for name, p in skeleton.named_parameters()}
    return copy.deepcopy(skeleton, memo).eval()


def _gathered(model: nn.Module) -> nn.Module | None:
    """``model`` to write on rank 0: itself, or under FSDP a plain copy with its full weights (a
    collective: every process calls it; the others get None)."""
    return _exportable(model, full_model_state(model) if _is_fsdp(model) else None)


def _exportable(model: nn.Module, state: dict[str, torch.Tensor] | None) -> nn.Module | None:
    """``model`` itself when it is not sharded, else its plain copy from ``full_model_state`` (None off rank 0)."""
    if not _is_fsdp(model):
        return model
    return _plain_copy(model, state) if state is not None else None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> None:
    """Scale the gradients so their global norm is at most ``max_norm`` (0: off), for any mix of
    plain and FSDP-sharded (DTensor) parameters: PPO's replicated value head beside a sharded policy,
    which ``torch.nn.utils.clip_grad_norm_`` refuses to combine."""
    if not max_norm:
        return
    from torch.distributed.tensor import DTensor

    with_grad = [p for p in params if p.grad is not None]
    sharded = [p for p in with_grad if isinstance(p.grad, DTensor)]
    plain = [p for p in with_grad if not isinstance(p.grad, DTensor)]
    if not sharded or not plain:
        torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
        return
    a = torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor()
    b = torch.nn.utils.get_total_norm([p.grad for p in plain])
    total = torch.sqrt(a.float() ** 2 + b.float() ** 2)
    torch.nn.utils.clip_grads_with_norm_(sharded, max_norm, total)
    torch.nn.utils.clip_grads_with_norm_(plain, max_norm, total)


def micro_batches(items: list, micro: int, dp: DataParallel | None = None, owner=None, pad=None) -> list[tuple[list, bool]]:
    """``items`` as ``(chunk, counted)`` micro-batches of at most ``micro``: all of them alone (no
    ``dp``), else this process's share -- every world-th item, or those ``owner(item)`` assigns to
    this process's rank (PPO and GRPO, whose rollout rows live where they were sampled). Under FSDP
    every forward gathers parameters with the other processes, so each runs as many micro-batches as
    the largest share needs: a process short of examples gets padding chunks (``counted`` False,
    holding ``pad``, default the first item) whose loss it weights by 0 and whose numbers it leaves
    out of the logged sums."""
    if dp is None:
        mine = items
    elif owner is None:
        mine = dp.shard(items)
    else:
        mine = [x for x in items if owner(x) == dp.ctx.rank]
    chunks = [(mine[i : i + micro], True) for i in range(0, len(mine), micro)]
    if dp is not None and dp.fsdp and items:
        world = dp.ctx.world_size
        if owner is None:
            largest = -(-len(items) // world)  # rank 0's share
        else:
            largest = max(sum(owner(x) == r for x in items) for r in range(world))
        chunks += [([items[0] if pad is None else pad], False)] * (-(-largest // micro) - len(chunks))
    return chunks


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


def save_model(model, directory: Path, tokenizer=None) -> None:
    """A policy (Hugging Face format) or anything with its own ``save_pretrained`` (a reward model)."""
    import warnings

    from lmforge.checkpoints import save_pretrained

    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained") and not hasattr(model, "stack"):
        model.save_pretrained(directory, tokenizer=tokenizer)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*saving in lmforge's own format.*")
        save_pretrained(model, directory, tokenizer=tokenizer)


def plot_curves(run_dir: str | os.PathLike, title: str, path: str = "curves.png") -> Path | None:
    """``run_dir/curves.png``: one panel per logged number (loss, reward, KL, accuracy, ...)."""
    records = read_metrics(run_dir)
    keys = []
    for r in records:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys:
                keys.append(k)
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), dpi=110, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, markersize=3, linewidth=1.2)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(run_dir) / path)


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The examples of update ``step``: epochs of seeded permutations, read in order, so a resumed
    run sees exactly the batches the uninterrupted one would have."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        take = perm[offset : offset + batch_size - len(out)]
        out += take
        pos += len(take)
    return out
