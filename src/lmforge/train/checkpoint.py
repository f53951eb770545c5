"""Training checkpoints: a Hugging Face directory plus everything needed to continue exactly.

    RUN/checkpoints/step-00000500/
        config.json, model.safetensors, tokenizer.json ...   the model (loads with load_model / transformers)
        optimizer/                                          AdamW state, torch.distributed.checkpoint format:
                                                            sharded per process, re-sharded on load, so a run
                                                            resumes on any number of processes
        rng-rank0.pt ...                                    each process's torch RNG states
        trainer_state.json                                  step, scheduler, data position, configs

A checkpoint is written into ``.tmp-step-...`` and renamed when complete; the rename is atomic,
so ``latest_checkpoint`` never returns a partial one. Only the last ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from lmforge.errors import CheckpointError
from lmforge.train.distributed import DistContext, unwrap

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (partial ``.tmp-*`` folders are not listed)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [path, *[p for p in path.rglob("*") if p.is_dir()]]:
        _fsync_dir(d)


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_model_state(model: nn.Module, *, every_rank: bool = False) -> dict[str, torch.Tensor] | None:
    """The unsharded parameters on the CPU (FSDP2: gathered on every process, kept on rank 0 only).
    ``every_rank``: FSDP2 keeps the full tensors on every process, on the model's device."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)
        return get_model_state_dict(model, options=options) or None
    return unwrap(model).state_dict()


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The inverse of ``full_model_state``: unsharded tensors (every process holds them) into
    ``model``; FSDP2 keeps each process's shard of them."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    unwrap(model).load_state_dict(state)


def _quiet_dcp():
    """DCP warns when it runs in one process without a process group; that is our intent."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")
    return ctx


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    ctx: DistContext,
    tokenizer=None,
    keep_last: int = 2,
    export=None,
) -> Path:
    """Write checkpoint ``step`` (every process calls this; rank 0 writes the shared files).
    ``export(model, directory)`` writes the model files (default: a Hugging Face directory)."""
    from lmforge.checkpoints import save_pretrained
    from lmforge.models import build_model

    root = checkpoint_root(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    ctx.barrier()

    full = full_model_state(model)  # collective under FSDP
    save_optimizer(tmp, model, optimizer)
    rng = {"cpu": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(ctx.device)
    torch.save(rng, tmp / f"rng-rank{ctx.rank}.pt")
    ctx.barrier()

    if ctx.is_main:
        raw = unwrap(model)
        if _is_fsdp(model):  # a plain CPU copy to export
            with torch.device("meta"):
                raw = build_model(raw.config)
            raw.load_state_dict(full, assign=True)
            raw.tie_weights()
        if export is not None:
            export(raw, tmp)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*saving in lmforge's own format.*")
                save_pretrained(raw, tmp, tokenizer=tokenizer)
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "world_size": ctx.world_size}, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # a checkpoint of this step from an earlier attempt
            shutil.rmtree(final)
        os.rename(tmp, final)  # the commit point
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


def read_state(ckpt: str | os.PathLike) -> dict:
    file = Path(ckpt) / STATE_FILE
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} cannot be read ({e}); resume from another checkpoint.") from None


def load_model_weights(ckpt: str | os.PathLike, model: nn.Module) -> None:
    """Copy a checkpoint's weights into ``model`` (unwrapped, before sharding)."""
    from lmforge.checkpoints import load_model

    saved = load_model(ckpt)
    missing, unexpected = model.load_state_dict(saved.state_dict(), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}.")


def save_optimizer(ckpt: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """AdamW's state into ``ckpt/optimizer`` (torch.distributed.checkpoint): every process calls it
    and writes its own shard; ``load_optimizer`` re-shards it for any number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    quiet = _quiet_dcp()
    try:
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(Path(ckpt) / "optimizer"))
    finally:
        quiet.__exit__(None, None, None)


def load_optimizer(ckpt: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore AdamW's state, re-sharded for this run's processes (call after wrapping the model)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    quiet = _quiet_dcp()
    try:
        osd = get_optimizer_state_dict(model, optimizer)
        dcp.load({"optimizer": osd}, checkpoint_id=str(Path(ckpt) / "optimizer"))
        set_optimizer_state_dict(model, optimizer, osd)
    finally:
        quiet.__exit__(None, None, None)


def load_rng(ckpt: str | os.PathLike, ctx: DistContext) -> bool:
    """Restore this process's RNG states if the checkpoint has them (same rank); False otherwise."""
    file = Path(ckpt) / f"rng-rank{ctx.rank}.pt"
    if not file.is_file():
        return False
    rng = torch.load(file, weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], ctx.device)
    return True
