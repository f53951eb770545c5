"""GRPO: group-relative policy optimisation with verifiable rewards (Shao et al. 2024).

No value model: each prompt is sampled ``num_generations`` times, each completion is scored (a
Python function per sample, e.g. an exact-match checker), and a completion's advantage is its
reward relative to its group, ``(r - mean) / (std + 1e-4)``. The loss is PPO's clipped surrogate
with that one advantage on every token, plus β·KL (the k3 estimator) to the frozen reference.

    lmforge grpo configs/grpo-arithmetic-smollm2.yaml --data problems.jsonl --out runs/grpo \\
        --reward=lmforge.align.rl_tasks:arithmetic_reward

Held-out prompts are sampled at step 0 and at every evaluation, as in PPO (``eval_reward``,
``eval_kl``); with the exact-match reward, ``eval_reward`` is the held-out exact-match rate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lmforge.align import losses as L
from lmforge.align.logprobs import pack, response_logprobs
from lmforge.align.ppo import RLResult, SamplingConfig, _setup, check_world, evaluate_policy, pad_id_of, rollout_logprobs
from lmforge.align.rl_common import (DataParallel, Run, batch_indices, clip_gradients, lr_factor, make_optimizer, micro_batches,
                                     progress_bar)  # fmt: skip
from lmforge.align.rollouts import draw_seed, sample_rollouts
from lmforge.config import ConfigError


@dataclass
class GRPOConfig(SamplingConfig):
    learning_rate: float = 1e-5
    batch_size: int = 4  # prompts per step; each is sampled num_generations times
    num_generations: int = 8  # G, the group size
    num_iterations: int = 1  # μ, updates per rollout (old log-probs matter when > 1)
    beta: float = 0.04  # weight of the KL to the reference in the loss; 0: no reference pass
    clip: float = 0.2
    clip_high: float | None = None  # asymmetric upper clip (DAPO); None: clip
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO)
    normalize: str = "sequence"  # sequence (GRPO) | token (BNPO/DAPO)
    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be at least 2 (advantages are relative to the group), got {self.num_generations}.")
        if self.scale_rewards not in ("group", "batch", "none") or self.normalize not in ("sequence", "token"):
            raise ConfigError("scale_rewards must be group, batch or none, and normalize sequence or token.")


def train_grpo(cfg: GRPOConfig, data: str | os.PathLike, out: str | os.PathLike, resume: bool = False) -> RLResult:
    """GRPO on the prompts of ``data`` with ``cfg.reward``; the final policy is ``out/final``.
    Under ``torchrun`` each process samples and trains on its share of the batch's prompts (whole
    groups); the rewards are gathered so every process computes the same advantages, gradients are
    summed, and rank 0 writes ``out``. ``strategy=fsdp`` shards the policy; rollouts are sampled and
    scored by a plain copy of its full weights gathered once per step (as in PPO)."""
    with DataParallel(cfg.strategy) as dp:
        check_world(cfg, dp, "grpo")
        return _train_grpo(cfg, data, out, resume, dp)


def _train_grpo(cfg: GRPOConfig, data, out, resume: bool, dp: DataParallel) -> RLResult:
    train, held, reward, eval_reward, policy, ref, tok = _setup(cfg, data, "grpo")
    policy = dp.prepare(policy)  # after the reference was copied: FSDP shards the policy only
    pad_id = pad_id_of(policy, tok)
    opt = make_optimizer([policy], cfg)
    trainable = [p for g in opt.param_groups for p in g["params"]]
    run = Run(out, cfg, "grpo", resume, main=dp.main)
    extra: dict = {}
    step = run.start({"policy": policy}, opt, extra)
    first_eval = extra.get("first_eval") or {}
    if step == 0 and held:
        first_eval = evaluate_policy(policy, ref, tok, held, cfg, eval_reward, pad_id, dp)
        run.log({"step": 0, **first_eval})
    last_eval = dict(first_eval)
    G = cfg.num_generations
    bar = progress_bar(cfg.max_steps, step, cfg.progress and dp.main, "grpo")
    while step < cfg.max_steps:
        for g in opt.param_groups:
            g["lr"] = cfg.learning_rate * lr_factor(step, cfg)
        records = [train[i] for i in batch_indices(step, cfg.batch_size, len(train), cfg.seed)]
        mine = dp.shard(list(range(len(records))))  # this process's prompts of the batch (all of them alone)
        sampler = dp.full_copy(policy)  # the policy itself, or under FSDP its gathered weights
        ro = sample_rollouts(sampler, tok, [records[i] for i in mine], cfg, n=G, seed=draw_seed(), indices=mine)
        own = reward([r["prompt"] for r in ro.records], ro.texts, ro.records)
        every = [0.0] * (len(records) * G)  # the whole batch's rewards, gathered: advantages as one process has them
        for k, i in enumerate(mine):
            every[i * G : (i + 1) * G] = own[k * G : (k + 1) * G]
        rewards = torch.tensor(dp.sum(every), dtype=torch.float32, device=policy.device)
        rows_of = torch.tensor([i * G + j for i in mine for j in range(G)], device=policy.device)
        adv = L.group_advantages(rewards, G, cfg.scale_rewards)[rows_of]
        old_logps = rollout_logprobs(sampler, ro, pad_id, cfg.micro)[0] if cfg.num_iterations > 1 else None
        del sampler
        ref_logps = rollout_logprobs(ref, ro, pad_id, cfg.micro)[0] if cfg.beta else None

        stats = {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0}
        total = len(records) * G  # completions in the whole batch
        local = {i * G + j: k * G + j for k, i in enumerate(mine) for j in range(G)}  # batch row -> rollout row
        # this process's completions (whole groups), padded under FSDP, where every forward is collective
        chunks = micro_batches(list(range(total)), cfg.micro, dp, owner=lambda r: (r // G) % dp.ctx.world_size,
                               pad=mine[0] * G)  # fmt: skip
        for _ in range(cfg.num_iterations):
            opt.zero_grad(set_to_none=True)
            for c, (chunk, counted) in enumerate(chunks):
                rows = [local[r] for r in chunk]
                with dp.accumulate(policy, last=c == len(chunks) - 1):
                    batch = pack([ro.prompt_ids[i] for i in rows], [ro.response_ids[i] for i in rows], pad_id, policy.device)
                    R = batch.mask.shape[1]
                    sel = torch.tensor(rows, device=policy.device)
                    logps = response_logprobs(policy, batch)
                    old = old_logps[sel, :R] if old_logps is not None else logps.detach()
                    ref_lp = ref_logps[sel, :R] if ref_logps is not None else None
                    loss, s = L.grpo_loss(logps, old, ref_lp, adv[sel], batch.mask, beta=cfg.beta, clip=cfg.clip,
                                          clip_high=cfg.clip_high, normalize=cfg.normalize)  # fmt: skip
                    share = len(rows) / total if counted else 0.0  # padding weighs nothing
                    (loss * share).backward()
                stats["loss"] += loss.item() * share / cfg.num_iterations
                stats["clip_fraction"] += s["clip_fraction"].item() * share / cfg.num_iterations
                if "kl" in s:
                    stats["kl"] += s["kl"].item() * share / cfg.num_iterations
            dp.sync_grads(trainable)
            clip_gradients(trainable, cfg.grad_clip)
            opt.step()
        step += 1
        sums = dp.sum([*stats.values(), float(sum(len(r) for r in ro.response_ids))])
        grouped = rewards.view(-1, G)
        record = {"step": step, "reward": rewards.mean().item(), "reward_std": grouped.std(1).mean().item(),
                  "groups_with_signal": (grouped.max(1).values > grouped.min(1).values).float().mean().item(),
                  "length": sums[-1] / total, **dict(zip(stats, sums[:-1])), "lr": opt.param_groups[0]["lr"]}  # fmt: skip
        evaluate = (lambda: evaluate_policy(policy, ref, tok, held, cfg, eval_reward, pad_id, dp)) if held else None
        last_eval = run.end_step(step, record, evaluate) or last_eval
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.4f}")
        if run.checkpoint_due(step):
            run.save(step, {"policy": policy}, opt, policy, tok, {"first_eval": first_eval})
    bar.close()
    final = run.finish(policy, tok, f"GRPO (G={G}, beta={cfg.beta})")
    return RLResult(run.out, final, first_eval, last_eval, step)
