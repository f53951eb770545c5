"""``lmforge sft``, ``lmforge cai`` and ``lmforge lora merge``: thin commands over lmforge.align."""

from __future__ import annotations

import argparse


def cmd_sft(args: argparse.Namespace) -> None:
    from lmforge.align.sft import load_sft_recipe, sft

    sft(load_sft_recipe(args.config, args.overrides), args.data, args.out, resume=args.resume)


def cmd_lora_merge(args: argparse.Namespace) -> None:
    from lmforge.align.lora import merge_adapter

    out = merge_adapter(args.adapter, args.out, base=args.base)
    print(f"merged {args.adapter} into {out}")


def cmd_cai(args: argparse.Namespace) -> None:
    from lmforge.align.cai import load_cai_recipe, run_cai

    run_cai(load_cai_recipe(args.config, args.overrides), args.data, args.out, resume=args.resume)


def add_parser(sub) -> None:
    s = sub.add_parser(
        "sft", allow_abbrev=False,
        help="supervised fine-tuning on chat JSONL (full or LoRA) from a YAML recipe; --key=value overrides any key",
        epilog="Run under `torchrun --nproc_per_node N` for DDP. See docs/align-sft.md and configs/align/sft-*.yaml.",
    )  # fmt: skip
    s.add_argument("config", help="YAML recipe (see configs/align/sft-*.yaml)")
    s.add_argument("--data", required=True, help=".jsonl of {\"messages\": [...]} or {\"prompt\", \"response\"} lines (or a folder of them)")
    s.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, loss.png, the adapter or model")
    s.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    s.set_defaults(func=cmd_sft, accepts_overrides=True)

    s = sub.add_parser(
        "cai", allow_abbrev=False,
        help="Constitutional AI: critique and revise responses (an SFT set), then judge pairs (a preference set)",
        epilog="Run under `torchrun --nproc_per_node N` to share the generation among N processes (rank 0 writes).",
    )  # fmt: skip
    s.add_argument("config", help="YAML recipe (see configs/align/cai-*.yaml); names the constitution file")
    s.add_argument("--data", required=True, help="prompts: a .txt file (one per line) or .jsonl with a 'prompt' field")
    s.add_argument("--out", required=True, help="output directory: sft.jsonl, preferences.jsonl, cai_summary.json")
    s.add_argument("--resume", action="store_true", help="reuse the generation a stopped run of the same recipe finished")
    s.set_defaults(func=cmd_cai, accepts_overrides=True)

    s = sub.add_parser("lora", help="LoRA adapters: merge one into its base model")
    lsub = s.add_subparsers(dest="lora_command", required=True, metavar="ACTION")
    m = lsub.add_parser("merge", help="fold a PEFT-format LoRA adapter into its base: one Hugging Face checkpoint")
    m.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("--out", required=True, help="output checkpoint directory")
    m.add_argument("--base", default=None, help="base checkpoint (default: the adapter's base_model_name_or_path)")
    m.set_defaults(func=cmd_lora_merge)
