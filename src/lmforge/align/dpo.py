"""Direct preference optimisation (and IPO, hinge) against a frozen reference.

The policy learns from chosen/rejected pairs directly, with no reward model and no sampling:
raise log π(chosen) - log π(rejected) relative to the reference (``losses.dpo_loss``). The
reference is the starting model, frozen (or another checkpoint: ``reference: PATH``).

    lmforge dpo configs/dpo-vader-smollm2.yaml --data pairs.jsonl --out runs/dpo [--loss_type=ipo]

Logged per step: loss, accuracy (share of pairs with a larger implicit reward for chosen), the
implicit rewards β·log(π/π_ref) of chosen and rejected and their margin, and ``kl``: the exact
KL(π || π_ref) of the next-token distributions along the chosen responses. Held-out pairs give
``eval_loss`` / ``eval_accuracy`` / ``eval_margin``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.align import losses as L
from lmforge.align.logprobs import pack, response_logprobs, token_kl
from lmforge.align.pairs import EncodedPair, encode_pairs, read_pairs
from lmforge.align.rl_common import (AlignConfig, DataParallel, Run, batch_indices, clip_gradients, freeze_lower_layers, frozen_copy, load_policy,
                                     lr_factor, make_optimizer, micro_batches, progress_bar, seed_everything,
                                     split_eval)  # fmt: skip
from lmforge.config import ConfigError


@dataclass
class DPOConfig(AlignConfig):
    learning_rate: float = 5e-6
    beta: float = 0.1  # strength of the pull towards the reference (smaller: further from it)
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge
    reference: str | None = None  # a checkpoint to use as reference; None: the starting policy

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in L.DPO_LOSS_TYPES:
            raise ConfigError(f"loss_type={self.loss_type!r} is not supported; choose one of {', '.join(L.DPO_LOSS_TYPES)}.")
        if self.beta <= 0:
            raise ConfigError(f"beta must be positive, got {self.beta}.")


@dataclass
class DPOResult:
    run_dir: Path
    model_dir: Path
    eval: dict
    steps: int


def _pair_batch(pairs: list[EncodedPair], pad_id: int, device):
    """Chosen rows then rejected rows, one packed batch (2B sequences)."""
    return pack([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, device)


def dpo_step_losses(policy, ref, pairs: list[EncodedPair], cfg: DPOConfig, pad_id: int, with_kl: bool = False) -> dict:
    """The DPO loss of a micro-batch (mean over pairs) and its statistics."""
    batch = _pair_batch(pairs, pad_id, policy.device)
    B = len(pairs)
    if with_kl:
        logps, logits = response_logprobs(policy, batch, return_logits=True)
    else:
        logps = response_logprobs(policy, batch)
    with torch.no_grad():
        if with_kl:
            ref_logps, ref_logits = response_logprobs(ref, batch, return_logits=True)
        else:
            ref_logps = response_logprobs(ref, batch)
    seq, ref_seq, lengths = logps.sum(-1), ref_logps.sum(-1), batch.lengths
    losses, chosen_r, rejected_r = L.dpo_loss(seq[:B], seq[B:], ref_seq[:B], ref_seq[B:], beta=cfg.beta,
                                              loss_type=cfg.loss_type, chosen_lengths=lengths[:B],
                                              rejected_lengths=lengths[B:])  # fmt: skip
    out = {"loss": losses.mean(), "chosen_reward": chosen_r, "rejected_reward": rejected_r}
    if with_kl:
        with torch.no_grad():
            out["kl"] = token_kl(logits[:B].detach(), ref_logits[:B], batch.mask[:B])
    return out


@torch.no_grad()
def evaluate_dpo(policy, ref, pairs: list[EncodedPair], cfg: DPOConfig, pad_id: int, dp: DataParallel | None = None) -> dict[str, float]:
    """Held-out loss, accuracy and margin; under torchrun each process scores its share of the pairs."""
    was = policy.training
    policy.eval()
    loss, correct, margin = 0.0, 0.0, 0.0
    for chunk, counted in micro_batches(pairs, cfg.micro, dp):
        o = dpo_step_losses(policy, ref, chunk, cfg, pad_id)  # every chunk: under FSDP the processes run in step
        if not counted:
            continue
        c, r = o["chosen_reward"], o["rejected_reward"]
        loss += o["loss"].item() * len(chunk)
        correct += (c > r).sum().item()
        margin += (c - r).sum().item()
    policy.train(was)
    if dp is not None:
        loss, correct, margin = dp.sum([loss, correct, margin])
    n = len(pairs)
    return {"eval_loss": loss / n, "eval_accuracy": correct / n, "eval_margin": margin / n}


def train_dpo(cfg: DPOConfig, data: str | os.PathLike, out: str | os.PathLike, resume: bool = False) -> DPOResult:
    """Fine-tune ``cfg.model`` with DPO on the pairs of ``data``; the final policy is ``out/final``.
    Under ``torchrun`` the processes share each batch (``DataParallel``, ``cfg.strategy``: ddp or fsdp)
    and rank 0 writes ``out``; under FSDP the policy is sharded and the frozen reference stays a full
    replica on every process."""
    with DataParallel(cfg.strategy) as dp:
        return _train_dpo(cfg, data, out, resume, dp)


def _train_dpo(cfg: DPOConfig, data, out, resume: bool, dp: DataParallel) -> DPOResult:
    seed_everything(cfg.seed)
    pairs = read_pairs(data)
    policy, tok = load_policy(cfg)
    if cfg.reference is not None:
        from lmforge.checkpoints import load_model

        ref = frozen_copy(load_model(cfg.reference, dtype=policy.dtype, quantize="none"))
    else:
        ref = frozen_copy(policy)
    freeze_lower_layers(policy, cfg.train_layers)
    policy = dp.prepare(policy)  # after frozen_copy: FSDP shards the policy only
    trainable = [p for p in policy.parameters() if p.requires_grad]
    pad_id = next(v for v in (policy.config.pad_token_id, tok.pad_id, tok.eos_id, 0) if v is not None)
    encoded = encode_pairs(tok, pairs, min(cfg.max_length, policy.config.max_seq_len), cfg.chat)
    train, held = split_eval(encoded, cfg.eval_fraction, cfg.seed)
    opt = make_optimizer([policy], cfg)
    run = Run(out, cfg, "dpo", resume, main=dp.main)
    step = run.start({"policy": policy}, opt)
    last_eval: dict = {}
    bar = progress_bar(cfg.max_steps, step, cfg.progress and dp.main, f"dpo ({cfg.loss_type})")
    while step < cfg.max_steps:
        for g in opt.param_groups:
            g["lr"] = cfg.learning_rate * lr_factor(step, cfg)
        batch = [train[i] for i in batch_indices(step, cfg.batch_size, len(train), cfg.seed)]
        chunks = micro_batches(batch, cfg.micro, dp)
        opt.zero_grad(set_to_none=True)
        sums = [0.0] * 5  # loss, kl, correct, chosen reward, rejected reward (sums over the batch)
        for i, (chunk, counted) in enumerate(chunks):
            with dp.accumulate(policy, last=i == len(chunks) - 1):
                o = dpo_step_losses(policy, ref, chunk, cfg, pad_id, with_kl=True)
                (o["loss"] * len(chunk) / len(batch) if counted else o["loss"] * 0.0).backward()
            if not counted:
                continue
            c, r = o["chosen_reward"], o["rejected_reward"]
            for k, v in enumerate((o["loss"].item() * len(chunk), o["kl"].item() * len(chunk), (c > r).sum().item(),
                                   c.sum().item(), r.sum().item())):  # fmt: skip
                sums[k] += v
        dp.sync_grads(trainable)
        clip_gradients(trainable, cfg.grad_clip)
        opt.step()
        step += 1
        loss, kl, correct, chosen, rejected = (v / len(batch) for v in dp.sum(sums))
        record = {"step": step, "loss": loss, "accuracy": correct, "margin": chosen - rejected, "chosen_reward": chosen,
                  "rejected_reward": rejected, "kl": kl, "lr": opt.param_groups[0]["lr"]}  # fmt: skip
        if held and ((cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.max_steps):
            last_eval = evaluate_dpo(policy, ref, held, cfg, pad_id, dp)
            record.update(last_eval)
        if step % cfg.log_interval == 0 or "eval_loss" in record:
            run.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", margin=f"{record['margin']:.3f}", kl=f"{kl:.4f}")
        if (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0) or step == cfg.max_steps:
            run.save(step, {"policy": policy}, opt, policy, tok)
    bar.close()
    final = run.finish(policy, tok, f"DPO ({cfg.loss_type}, beta={cfg.beta})")
    return DPOResult(Path(out), final, last_eval, step)
