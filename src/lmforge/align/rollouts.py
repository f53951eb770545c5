"""Rollouts for PPO and GRPO: sampled completions of a batch of prompts, through the one decode engine.

Every prompt is sampled with its own seed, ``seed + index * n`` (its n samples take the next n
seeds), so a completion depends on the prompt, the weights and the seed, and not on which other
prompts share its batch. That is what lets several processes under ``torchrun`` each sample their
share of a batch and still produce the completions one process would (``indices`` are the prompts'
places in the whole batch). The engine is built for the call (continuous batching over a paged
KV cache sized for ``micro_batch_size`` sequences in flight) and dropped afterwards, because the
weights change after every update.

    ro = sample_rollouts(policy, tokenizer, records, cfg, n=8, seed=1234)
    ro.prompt_ids[i], ro.response_ids[i], ro.texts[i]     # one row per completion
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.errors import UserError


@dataclass
class Rollout:
    """Sampled completions of a batch of prompts, one row per completion (a prompt's n samples
    are consecutive rows)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # generated ids, the eos that ended them included
    texts: list[str]
    records: list[dict]  # the prompt records (prompt + fields for reward functions), one per row
    truncated: list[bool]  # hit max_new_tokens without an end of sequence


def draw_seed() -> int:
    """A rollout seed from torch's global generator (so a seeded, resumed run repeats its rollouts)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def encode_prompts(tokenizer, records: list[dict], cfg, max_len: int) -> list[list[int]]:
    """Token ids of each record's prompt; one sentence naming the record if it leaves no room for
    ``max_new_tokens``."""
    from lmforge.align.pairs import encode_prompt

    budget = max_len - cfg.max_new_tokens
    prompts = []
    for r in records:
        ids = encode_prompt(tokenizer, r["prompt"], cfg.chat)
        if len(ids) > budget:
            raise UserError(f"{r.get('_where', 'a prompt')}: the prompt has {len(ids)} tokens, more than max_length - "
                            f"max_new_tokens = {budget}; raise max_length or shorten it.")  # fmt: skip
        prompts.append(ids)
    return prompts


@torch.no_grad()
def sample_rollouts(policy, tokenizer, records: list[dict], cfg, n: int = 1, *, seed: int | None = None,
                    indices: list[int] | None = None) -> Rollout:  # fmt: skip
    """``n`` completions per prompt record, sampled by the engine with the config's max_new_tokens,
    temperature, top_k and top_p. Prompt ``k`` is seeded ``seed + indices[k] * n`` (``indices``
    default to 0..len-1; ``seed`` defaults to one drawn from torch's global generator)."""
    from lmforge.engine import Engine, EngineConfig, SamplingParams

    if not records:
        return Rollout([], [], [], [], [])
    max_len = min(cfg.max_length, policy.config.max_seq_len)
    prompts = encode_prompts(tokenizer, records, cfg, max_len)
    seed = draw_seed() if seed is None else seed
    indices = list(range(len(records))) if indices is None else list(indices)
    in_flight = max(1, min(len(records) * n, cfg.micro))
    block = 16
    params = [SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                             top_p=cfg.top_p, n=n, seed=(seed + i * n) % 2**63) for i in indices]  # fmt: skip
    was = policy.training  # the engine puts the model in eval mode
    try:
        engine = Engine(policy, tokenizer, EngineConfig(
            block_size=block, max_num_seqs=in_flight, max_model_len=max_len, num_blocks=in_flight * -(-max_len // block),
            max_num_batched_tokens=max(512, max_len), max_queue=len(records) * n, compile=False,
        ))  # fmt: skip
        done = engine.generate(prompts, params)
    finally:
        policy.train(was)
    failed = [r.error for group in done for r in group if r.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"sampling a rollout failed: {failed[0]}")
    rows = [k for k in range(len(records)) for _ in range(n)]
    flat = [r for group in done for r in group]
    return Rollout(
        prompt_ids=[prompts[k] for k in rows],
        response_ids=[list(r.token_ids) for r in flat],
        texts=[r.text for r in flat],
        records=[records[k] for k in rows],
        truncated=[r.finish_reason == "length" for r in flat],
    )
