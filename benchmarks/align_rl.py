"""Acceptance runs of the reward model, DPO, PPO and GRPO on SmolLM2-135M-Instruct (bundled GGUF).

Every task is generated here from a seed (``lmforge.align.rl_tasks``): nothing is downloaded and
no data file is committed. Each stage prints one JSON line with the measured numbers.

    python benchmarks/align_rl.py rm    --out runs/accept   # VADER-labelled pairs of real play sentences
    python benchmarks/align_rl.py dpo   --out runs/accept   # on-policy pairs labelled by VADER
    python benchmarks/align_rl.py ppo   --out runs/accept   # reward: VADER positivity of the completion
    python benchmarks/align_rl.py grpo  --out runs/accept   # reward: exact match on generated arithmetic

rm    held-out accuracy on pairs whose sentences training never saw (labels: VADER, min gap 0.3).
dpo / ppo   held-out VADER positivity of completions of play-line openings, before and after,
      and the sequence-level KL (k1, summed over response tokens) of the trained policy's samples
      to the reference.
grpo  held-out exact match on arithmetic problems (the completion's last integer), before and after.
rm    with ``--set model=DIR`` any decoder or encoder, e.g. the bundled MiniLM
      (``lmforge.rag.embed.default_embedding_model_path()``).

Any trainer key can be overridden: ``--set max_steps=10 --set learning_rate=1e-5``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lmforge.align import rl_tasks as T
from lmforge.align.rl_common import load_config


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _overrides(items: list[str]) -> dict:
    return dict(kv.split("=", 1) for kv in items)


def stage_rm(out: Path, sets: dict) -> dict:
    from lmforge.align.rm import RMConfig, evaluate_reward_model, load_reward_model, train_reward_model
    from lmforge.align.pairs import encode_pairs, read_pairs
    from lmforge.tokenizer import load_tokenizer

    cfg = load_config(RMConfig, None, {"chat": False, "max_steps": 150, "batch_size": 16, "learning_rate": 1e-4,
                                       "train_layers": 4, "max_length": 64, "eval_fraction": 0.05, "eval_interval": 50,
                                       "checkpoint_interval": 0, **sets})  # fmt: skip
    # at least one fresh pair per training example (no pair seen twice)
    n_train = max(3000, round(cfg.max_steps * cfg.batch_size / (1 - cfg.eval_fraction)))
    train = _write(out / "rm-train.jsonl", T.sentiment_pairs(n_train, seed=0, split="train"))
    held = _write(out / "rm-eval.jsonl", T.sentiment_pairs(400, seed=1, split="eval"))
    t = time.time()
    result = train_reward_model(cfg, train, out / "rm")
    rm, tok = load_reward_model(result.model_dir), load_tokenizer(result.model_dir)
    pairs = encode_pairs(tok, read_pairs(held), cfg.max_length, cfg.chat)
    ev = evaluate_reward_model(rm, pairs, 16)
    return {"stage": "rm", "train_layers": cfg.train_layers, "learning_rate": cfg.learning_rate, "held_out_pairs": len(pairs), "held_out_accuracy": ev["eval_accuracy"],
            "held_out_loss": ev["eval_loss"], "steps": result.steps, "train_pairs_seen": result.steps * cfg.batch_size,
            "seconds": round(time.time() - t)}  # fmt: skip


def _prompts(out: Path, n_train: int, n_eval: int) -> tuple[Path, Path]:
    """Openings of real lines to continue; the held-out ones come from sentences training never saw."""
    return (_write(out / "prompts-train.jsonl", T.line_prompts(n_train, seed=0, split="train")),
            _write(out / "prompts-eval.jsonl", T.line_prompts(n_eval, seed=0, split="eval")))  # fmt: skip


def stage_dpo(out: Path, sets: dict) -> dict:
    """On-policy DPO: two samples per training prompt from the starting policy, the more VADER-positive
    one chosen (gap >= 0.2), then DPO; before/after measured by sampling held-out prompts."""
    from lmforge.align.dpo import DPOConfig, train_dpo
    from lmforge.align.ppo import PPOConfig, evaluate_policy, pad_id_of
    from lmforge.align.rl_common import frozen_copy, load_policy
    from lmforge.align.rollouts import sample_rollouts
    from lmforge.checkpoints import load_model

    cfg = load_config(DPOConfig, None, {"max_steps": 80, "batch_size": 8, "learning_rate": 5e-5, "beta": 0.1,
                                        "train_layers": 8, "max_length": 96, "eval_fraction": 0.0,
                                        "checkpoint_interval": 0, **sets})  # fmt: skip
    sample_cfg = PPOConfig(max_new_tokens=24, temperature=1.0, max_length=96, eval_prompts=64, seed=0, micro_batch_size=32)
    t = time.time()
    torch.manual_seed(0)
    policy, tok = load_policy(cfg)
    train_prompts = T.line_prompts(256, seed=1, split="train")
    held = T.line_prompts(64, seed=0, split="eval")
    ro = sample_rollouts(policy, tok, train_prompts, sample_cfg, n=2)
    pairs = []
    for i in range(0, len(ro.texts), 2):
        a, b = ro.texts[i], ro.texts[i + 1]
        sa, sb = T.vader_score(a), T.vader_score(b)
        if abs(sa - sb) >= 0.2 and a.strip() and b.strip() and a.strip() != b.strip():
            pairs.append({"prompt": ro.records[i]["prompt"], "chosen": a if sa > sb else b, "rejected": b if sa > sb else a})
    data = _write(out / "dpo-pairs.jsonl", pairs)
    gen_s = time.time() - t
    vader = T.vader_reward
    from lmforge.align.rewards import FunctionReward

    reward = FunctionReward(vader, "vader")
    ref = frozen_copy(policy)
    before = evaluate_policy(policy, ref, tok, [{"prompt": p["prompt"]} for p in held], sample_cfg, reward, pad_id_of(policy, tok))
    result = train_dpo(cfg, data, out / "dpo")
    trained = load_model(result.model_dir)
    after = evaluate_policy(trained, ref, tok, [{"prompt": p["prompt"]} for p in held], sample_cfg, reward, pad_id_of(trained, tok))
    return {"stage": "dpo", "pairs": len(pairs), "held_out_prompts": len(held), "vader_before": before["eval_reward"],
            "vader_after": after["eval_reward"], "kl_after": after["eval_kl"], "steps": result.steps,
            "generation_seconds": round(gen_s), "seconds": round(time.time() - t)}  # fmt: skip


def stage_ppo(out: Path, sets: dict) -> dict:
    from lmforge.align.ppo import PPOConfig, train_ppo

    data, held = _prompts(out, 512, 64)
    cfg = load_config(PPOConfig, None, {"reward": "lmforge.align.rl_tasks:vader_reward", "max_steps": 30,
                                        "batch_size": 16, "mini_batch_size": 8, "micro_batch_size": 16,
                                        "learning_rate": 3e-5, "train_layers": 8, "max_new_tokens": 24,
                                        "max_length": 96, "kl_coef": 0.05, "kl_target": 6.0, "ppo_epochs": 2,
                                        "eval_data": str(held), "eval_prompts": 64,
                                        "eval_interval": 10, "checkpoint_interval": 0, **sets})  # fmt: skip
    t = time.time()
    result = train_ppo(cfg, data, out / "ppo")
    return {"stage": "ppo", "vader_before": result.first_eval["eval_reward"], "vader_after": result.last_eval["eval_reward"],
            "kl_after": result.last_eval["eval_kl"], "steps": result.steps, "seconds": round(time.time() - t)}  # fmt: skip


def stage_grpo(out: Path, sets: dict) -> dict:
    from lmforge.align.grpo import GRPOConfig, train_grpo

    held = T.arithmetic_problems(100, seed=1, max_operand=20)
    seen = {p["prompt"] for p in held}
    train = [p for p in T.arithmetic_problems(800, seed=0, max_operand=20) if p["prompt"] not in seen]
    data, held_path = _write(out / "arithmetic-train.jsonl", train), _write(out / "arithmetic-eval.jsonl", held)
    cfg = load_config(GRPOConfig, None, {"reward": "lmforge.align.rl_tasks:final_answer_reward", "max_steps": 30,
                                         "batch_size": 4, "num_generations": 8, "micro_batch_size": 32,
                                         "learning_rate": 2e-5, "train_layers": 8, "max_new_tokens": 12,
                                         "max_length": 96, "beta": 0.04, "eval_data": str(held_path),
                                         "eval_prompts": 100, "eval_interval": 10, "checkpoint_interval": 0,
                                         "temperature": 0.8, **sets})  # fmt: skip
    t = time.time()
    result = train_grpo(cfg, data, out / "grpo")
    return {"stage": "grpo", "exact_match_before": result.first_eval["eval_reward"],
            "exact_match_after": result.last_eval["eval_reward"], "kl_after": result.last_eval["eval_kl"],
            "steps": result.steps, "seconds": round(time.time() - t)}  # fmt: skip


STAGES = {"rm": stage_rm, "dpo": stage_dpo, "ppo": stage_ppo, "grpo": stage_grpo}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stages", nargs="+", choices=sorted(STAGES))
    p.add_argument("--out", default="runs/align-accept")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", action="append", default=[], help="trainer key=value (repeatable)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    for stage in a.stages:
        line = STAGES[stage](Path(a.out), _overrides(a.set))
        print(json.dumps(line), flush=True)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
