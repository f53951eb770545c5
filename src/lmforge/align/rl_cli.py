"""``lmforge rm | dpo | ppo | grpo RECIPE.yaml --data PATH --out DIR [--resume] [--key=value ...]``.

Each verb is a few lines over its library function (``train_reward_model``, ``train_dpo``,
``train_ppo``, ``train_grpo``); any recipe key can be overridden on the command line.
"""

from __future__ import annotations

import argparse
import json


def _run(kind: str, args: argparse.Namespace) -> None:
    from lmforge.align.rl_common import load_config

    if kind == "rm":
        from lmforge.align.rm import RMConfig as Config, train_reward_model as train
    elif kind == "dpo":
        from lmforge.align.dpo import DPOConfig as Config, train_dpo as train
    elif kind == "ppo":
        from lmforge.align.ppo import PPOConfig as Config, train_ppo as train
    else:
        from lmforge.align.grpo import GRPOConfig as Config, train_grpo as train
    cfg = load_config(Config, args.config, args.overrides)
    result = train(cfg, args.data, args.out, resume=args.resume)
    summary = {k: v for k, v in vars(result).items() if k not in ("run_dir",)}
    print(json.dumps({"kind": kind, **{k: str(v) if hasattr(v, "parts") else v for k, v in summary.items()}}))


def cmd_rm(args: argparse.Namespace) -> None:
    _run("rm", args)


def cmd_dpo(args: argparse.Namespace) -> None:
    _run("dpo", args)


def cmd_ppo(args: argparse.Namespace) -> None:
    _run("ppo", args)


def cmd_grpo(args: argparse.Namespace) -> None:
    _run("grpo", args)


VERBS = {
    "rm": (cmd_rm, "train a reward model (Bradley-Terry) on chosen/rejected pairs; saved as HF *ForSequenceClassification",
           "JSONL of {prompt, chosen, rejected}"),
    "dpo": (cmd_dpo, "preference fine-tuning with DPO (--loss_type=sigmoid|ipo|hinge) against a frozen reference",
            "JSONL of {prompt, chosen, rejected}"),
    "ppo": (cmd_ppo, "RLHF with PPO: value head, KL penalty to a frozen reference, GAE; --reward=rm:DIR|module:fn|http://.../v1",
            "JSONL of {prompt, ...fields for the reward function}"),
    "grpo": (cmd_grpo, "GRPO with verifiable rewards (a Python function per sample, group-normalised advantages)",
             "JSONL of {prompt, ...fields for the reward function}"),
}  # fmt: skip


def add_parser(sub) -> None:
    for verb, (func, help_text, data_help) in VERBS.items():
        s = sub.add_parser(verb, allow_abbrev=False, help=help_text,
                           epilog="Any recipe key can be overridden as --key=value (see docs/align-rl.md). Run under "
                                  "`torchrun --nproc_per_node N` for DDP (--strategy=ddp) or FSDP2 (--strategy=fsdp).")  # fmt: skip
        s.add_argument("config", help="YAML recipe (see configs/)")
        s.add_argument("--data", required=True, help=data_help)
        s.add_argument("--out", required=True, help="run directory: metrics.jsonl, curves.png, checkpoints/, final/")
        s.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
        s.set_defaults(func=func, accepts_overrides=True)
