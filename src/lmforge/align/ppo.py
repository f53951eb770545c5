"""RLHF with PPO: a policy with a value head, a frozen reference, a per-token KL penalty and GAE.

One step:
  1. rollout   sample ``batch_size`` prompts, generate a completion for each (``lmforge.inference``);
  2. score     the reward source scores each completion (a reward model, a Python function, an
               OpenAI-compatible judge — ``rewards.py``);
  3. rewards   per token: -β·(log π - log π_ref), plus the score on the last token; β fixed or
               adapted towards ``kl_target`` (``losses.KLController``);
  4. GAE       advantages and returns from the value head's estimates (whitened per batch);
  5. update    ``ppo_epochs`` passes over the rollout in mini-batches, minimising the clipped
               policy loss + vf_coef × the clipped value loss.

    lmforge ppo configs/ppo-vader-smollm2.yaml --data prompts.jsonl --out runs/ppo \\
        --reward=lmforge.align.rl_tasks:vader_reward

``data`` is JSONL with a ``prompt`` per line (text or chat messages); other keys reach reward
functions. Held-out prompts (``eval_data``, or a share ``eval_fraction`` of ``data``) are sampled at step 0 and at every
evaluation: ``eval_reward`` (by ``eval_reward_source``, default the training reward) and
``eval_kl`` (the sequence-level KL to the reference of those samples) are logged.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.align import losses as L
from lmforge.align.logprobs import pack, response_logprobs
from lmforge.align.pairs import read_prompt_records
from lmforge.align.rewards import resolve_reward
from lmforge.align.rl_common import (AlignConfig, DataParallel, Run, batch_indices, clip_gradients, freeze_lower_layers,
                                     frozen_copy, load_policy, lr_factor, make_optimizer, micro_batches, progress_bar,
                                     seed_everything, split_eval)  # fmt: skip
from lmforge.align.rollouts import Rollout, draw_seed, sample_rollouts
from lmforge.config import ConfigError


@dataclass
class SamplingConfig(AlignConfig):
    """What PPO and GRPO add to every run: the reward and how completions are sampled."""

    reward: str | None = None  # rm:PATH | module:function | file.py:function | http(s)://HOST/v1
    eval_reward_source: str | None = None  # the held-out reward; None: the training reward
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eval_prompts: int = 64  # held-out prompts sampled per evaluation (at most)
    eval_data: str | None = None  # JSONL of held-out prompts; None: eval_fraction of --data

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_new_tokens < 1 or self.temperature <= 0:
            raise ConfigError("max_new_tokens must be at least 1 and temperature positive (PPO/GRPO sample).")


@dataclass
class PPOConfig(SamplingConfig):
    learning_rate: float = 1e-5
    ppo_epochs: int = 2  # passes over each rollout
    mini_batch_size: int | None = None  # rollouts per gradient step; None: the whole batch
    clip: float = 0.2  # policy ratio clip ε
    value_clip: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # β of the per-token KL penalty (its start value when adaptive)
    kl_target: float | None = None  # adaptive β towards this sequence KL (Ziegler et al.); None: fixed
    kl_horizon: int = 10000
    kl_estimator: str = "k1"
    whiten_rewards: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_estimator not in L.KL_ESTIMATORS:
            raise ConfigError(f"kl_estimator={self.kl_estimator!r} is not supported; choose one of {', '.join(L.KL_ESTIMATORS)}.")
        if self.ppo_epochs < 1:
            raise ConfigError(f"ppo_epochs must be at least 1, got {self.ppo_epochs}.")


@dataclass
class RLResult:
    run_dir: Path
    model_dir: Path
    first_eval: dict
    last_eval: dict
    steps: int


class ValueHead(nn.Module):
    """V(s_t): a scalar per position from the policy's final hidden state (B, R, D) -> (B, R)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h.float()).squeeze(-1)


def pad_id_of(policy, tok) -> int:
    return next(v for v in (policy.config.pad_token_id, tok.pad_id, tok.eos_id, 0) if v is not None)


@torch.no_grad()
def rollout_logprobs(model, rollout: Rollout, pad_id: int, micro: int, value_head: nn.Module | None = None):
    """log-probs (B, R) of the rollout's responses under ``model`` (and values (B, R) with a value head),
    in micro-batches; plus the batch's mask (B, R)."""
    was = model.training
    model.eval()
    logps, values = [], []
    R = max(len(r) for r in rollout.response_ids)
    for i in range(0, len(rollout.response_ids), micro):
        batch = pack(rollout.prompt_ids[i : i + micro], rollout.response_ids[i : i + micro], pad_id, model.device)
        lp, h = response_logprobs(model, batch, return_hidden=True)
        logps.append(nn.functional.pad(lp, (0, R - lp.shape[1])))
        if value_head is not None:
            values.append(nn.functional.pad(value_head(h) * batch.mask, (0, R - lp.shape[1])))
    model.train(was)
    mask = torch.zeros(len(rollout.response_ids), R, device=model.device)
    for i, r in enumerate(rollout.response_ids):
        mask[i, : len(r)] = 1
    return torch.cat(logps), (torch.cat(values) if values else None), mask


@torch.no_grad()
def evaluate_policy(policy, ref, tok, records: list[dict], cfg: SamplingConfig, reward, pad_id: int,
                    dp: DataParallel | None = None) -> dict[str, float]:  # fmt: skip
    """Sample the held-out prompts (seeded by ``cfg.seed``: the same completions at every evaluation
    of the same weights), score them with the evaluation reward, and measure the sequence-level KL
    (k1, summed over tokens) to the reference. Under torchrun each process takes its share (every
    process calls this: under FSDP it gathers the policy's full weights first)."""
    if not records:
        return {}
    policy = dp.full_copy(policy) if dp is not None else policy
    idx = dp.shard(list(range(len(records)))) if dp is not None else list(range(len(records)))
    sums = [0.0, 0.0, 0.0]  # reward, KL, length
    if idx:
        ro = sample_rollouts(policy, tok, [records[i] for i in idx], cfg, seed=cfg.seed + 7919, indices=idx)
        scores = reward([r["prompt"] for r in ro.records], ro.texts, ro.records)
        lp, _, mask = rollout_logprobs(policy, ro, pad_id, cfg.micro)
        ref_lp, _, _ = rollout_logprobs(ref, ro, pad_id, cfg.micro)
        sums = [float(sum(scores)), ((lp - ref_lp) * mask).sum().item(), mask.sum().item()]
    if dp is not None:
        sums = dp.sum(sums)
    n = len(records)
    return {"eval_reward": sums[0] / n, "eval_kl": sums[1] / n, "eval_length": sums[2] / n}


def _setup(cfg: SamplingConfig, data, kind: str):
    """What PPO and GRPO start from: prompt records split, policy, frozen reference, rewards."""
    seed_everything(cfg.seed)
    records = read_prompt_records(data)
    eval_records = read_prompt_records(cfg.eval_data) if cfg.eval_data is not None else None
    reward = resolve_reward(cfg.reward)
    eval_reward = resolve_reward(cfg.eval_reward_source) if cfg.eval_reward_source else reward
    policy, tok = load_policy(cfg)
    if policy.config.arch != "decoder":
        raise ConfigError(f"{kind} trains a decoder-only policy; {cfg.model} is {policy.config.arch}.")
    ref = frozen_copy(policy)
    freeze_lower_layers(policy, cfg.train_layers)
    if eval_records is not None:
        train, held = records, eval_records
    else:
        train, held = split_eval(records, cfg.eval_fraction, cfg.seed)
    held = held[: cfg.eval_prompts]
    return train, held, reward, eval_reward, policy, ref, tok


def check_world(cfg: SamplingConfig, dp: DataParallel, kind: str) -> None:
    world = dp.ctx.world_size
    if cfg.batch_size < world:
        raise ConfigError(f"{kind} under torchrun shares each batch's prompts among the processes: batch_size={cfg.batch_size} "
                          f"gives some of the {world} processes nothing; raise batch_size to at least {world}.")  # fmt: skip


def train_ppo(cfg: PPOConfig, data: str | os.PathLike, out: str | os.PathLike, resume: bool = False) -> RLResult:
    """PPO on the prompts of ``data`` with ``cfg.reward``; the final policy is ``out/final``.
    Under ``torchrun`` each process samples, scores and trains on its share of every batch (the
    statistics that whiten advantages are taken over the whole batch, gradients summed) and rank 0
    writes ``out``. ``strategy=fsdp`` shards the policy (FSDP2); each step every process gathers its
    full weights once into a plain copy that samples the rollouts and scores them (old log-probs,
    values), the way TRL gathers ZeRO-3 weights for generation; the value head and the reference
    stay full replicas."""
    with DataParallel(cfg.strategy) as dp:
        check_world(cfg, dp, "ppo")
        return _train_ppo(cfg, data, out, resume, dp)


def _train_ppo(cfg: PPOConfig, data, out, resume: bool, dp: DataParallel) -> RLResult:
    train, held, reward, eval_reward, policy, ref, tok = _setup(cfg, data, "ppo")
    policy = dp.prepare(policy)  # after the reference was copied: FSDP shards the policy only
    pad_id = pad_id_of(policy, tok)
    value_head = ValueHead(policy.config.n_embd).to(policy.device)
    kl_ctl = L.KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    opt = make_optimizer([policy, value_head], cfg)
    trainable = [p for g in opt.param_groups for p in g["params"]]
    run = Run(out, cfg, "ppo", resume, main=dp.main)
    extra: dict = {}
    step = run.start({"policy": policy, "value_head": value_head}, opt, extra)
    if "kl_ctl" in extra:
        kl_ctl.load_state_dict(extra["kl_ctl"])
    first_eval = extra.get("first_eval") or {}
    if step == 0 and held:
        first_eval = evaluate_policy(policy, ref, tok, held, cfg, eval_reward, pad_id, dp)
        run.log({"step": 0, **first_eval})
    last_eval = dict(first_eval)
    mini = cfg.mini_batch_size or cfg.batch_size
    all_sum = dp.ctx.all_reduce_sum
    bar = progress_bar(cfg.max_steps, step, cfg.progress and dp.main, "ppo")
    while step < cfg.max_steps:
        for g in opt.param_groups:
            g["lr"] = cfg.learning_rate * lr_factor(step, cfg)
        records = [train[i] for i in batch_indices(step, cfg.batch_size, len(train), cfg.seed)]
        mine = dp.shard(list(range(len(records))))  # this process's rows of the batch (all of them alone)
        sampler = dp.full_copy(policy)  # the policy itself, or under FSDP its gathered weights
        ro = sample_rollouts(sampler, tok, [records[i] for i in mine], cfg, seed=draw_seed(), indices=mine)
        scores = torch.tensor(reward([r["prompt"] for r in ro.records], ro.texts, ro.records), device=policy.device)

        # --- rewards, values, advantages (no gradients); whitening statistics over the whole batch ---
        old_logps, old_values, mask = rollout_logprobs(sampler, ro, pad_id, cfg.micro, value_head)
        del sampler
        ref_logps, _, _ = rollout_logprobs(ref, ro, pad_id, cfg.micro)
        rewards, kl = L.token_rewards(scores, old_logps, ref_logps, mask, kl_ctl.value, cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = L.whiten(rewards, mask, shift_mean=False, all_sum=all_sum) * mask
        adv, returns = L.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        adv = L.whiten(adv, mask, all_sum=all_sum) * mask

        # --- PPO epochs over mini-batches of the whole batch; each process backpropagates its rows ---
        stats = {"pg_loss": 0.0, "vf_loss": 0.0, "clip_fraction": 0.0, "vf_clip_fraction": 0.0}
        n_updates = 0
        local = {g: k for k, g in enumerate(mine)}  # batch row -> row of this process's rollout
        order = list(range(len(records)))
        for _ in range(cfg.ppo_epochs):
            random.shuffle(order)  # the same order in every process (same seed, same draws)
            for s in range(0, len(order), mini):
                idx = order[s : s + mini]
                # this process's rows of the mini-batch (padded under FSDP, where every forward is collective)
                chunks = micro_batches(idx, cfg.micro, dp, owner=lambda i: i % dp.ctx.world_size, pad=mine[0])
                opt.zero_grad(set_to_none=True)
                for c, (chunk, counted) in enumerate(chunks):
                    rows = [local[i] for i in chunk]
                    with dp.accumulate(policy, last=c == len(chunks) - 1):
                        batch = pack([ro.prompt_ids[i] for i in rows], [ro.response_ids[i] for i in rows], pad_id, policy.device)
                        R = batch.mask.shape[1]
                        logps, h = response_logprobs(policy, batch, return_hidden=True)
                        values = value_head(h)
                        sel = torch.tensor(rows, device=policy.device)
                        mk, a, ret = batch.mask, adv[sel, :R], returns[sel, :R]
                        per_token, clipped = L.policy_loss(logps, old_logps[sel, :R], a, mk, cfg.clip)
                        pg = L.masked_mean(per_token, mk)
                        vf, vf_clip = L.value_loss(values, old_values[sel, :R], ret, mk, cfg.value_clip)
                        share = len(rows) / len(idx) if counted else 0.0  # padding weighs nothing
                        ((pg + cfg.vf_coef * vf) * share).backward()
                    for k, v in (("pg_loss", pg), ("vf_loss", vf), ("clip_fraction", L.masked_mean(clipped, mk)),
                                 ("vf_clip_fraction", vf_clip)):  # fmt: skip
                        stats[k] += v.item() * share
                dp.sync_grads(trainable)
                clip_gradients(trainable, cfg.grad_clip)
                opt.step()
                n_updates += 1
        step += 1
        B = len(records)
        sums = dp.sum([scores.sum().item(), kl.sum().item(), mask.sum().item(), float(sum(ro.truncated)), *stats.values()])
        seq_kl = sums[1] / B
        kl_ctl.update(seq_kl, B)
        record = {"step": step, "score": sums[0] / B, "kl": seq_kl, "kl_coef": kl_ctl.value, "length": sums[2] / B,
                  "truncated": sums[3] / B, **{k: v / n_updates for k, v in zip(stats, sums[4:])},
                  "lr": opt.param_groups[0]["lr"]}  # fmt: skip
        evaluate = (lambda: evaluate_policy(policy, ref, tok, held, cfg, eval_reward, pad_id, dp)) if held else None
        last_eval = run.end_step(step, record, evaluate) or last_eval
        bar.update(1)
        bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{seq_kl:.3f}")
        if run.checkpoint_due(step):
            run.save(step, {"policy": policy, "value_head": value_head}, opt, policy, tok,
                     {"kl_ctl": kl_ctl.state_dict(), "first_eval": first_eval})  # fmt: skip
    bar.close()
    final = run.finish(policy, tok, f"PPO (kl_coef={cfg.kl_coef}{', adaptive' if kl_ctl.adaptive else ''})")
    return RLResult(Path(out), final, first_eval, last_eval, step)
