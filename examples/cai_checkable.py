"""Constitutional AI end to end on SmolLM2-135M-Instruct with checkable principles.

    python examples/cai_checkable.py --out out/cai [--train-prompts 48 --eval-prompts 30]

1. prompts that tempt three principles (a phone number, over 40 words, the words very/really/
   amazing/awesome): ``lmforge.align.tasks.cai_prompts``, train and held-out sets by seed
2. ``lmforge cai`` stage 1 (the model critiques and revises its own answers) and stage 2 (judged pairs)
3. ``lmforge sft`` (LoRA) on the revisions
4. violation rates on the held-out prompts before and after, by ``tasks.violations``: checkers
   the pipeline never sees. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lmforge import generate, load_model, load_tokenizer
from lmforge.align.cai import load_cai_recipe, run_cai
from lmforge.align.chat_data import write_jsonl
from lmforge.align.lora import load_adapter, merge_lora
from lmforge.align.sft import load_sft_recipe, sft
from lmforge.align.tasks import cai_prompts, violations

REPO = Path(__file__).resolve().parents[1]


def violation_rates(model, tokenizer, prompts: list[str], seed: int, max_new_tokens: int) -> dict[str, float]:
    replies = []
    for i in range(0, len(prompts), 8):
        chunk = [[{"role": "user", "content": p}] for p in prompts[i : i + 8]]
        replies += generate(model, tokenizer, chunk, max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.95, seed=seed + i)
    found = [violations(r) for r in replies]
    rates = {k: sum(f[k] for f in found) / len(found) for k in found[0]}
    rates["any"] = sum(any(f.values()) for f in found) / len(found)
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/cai")
    p.add_argument("--train-prompts", type=int, default=48)
    p.add_argument("--eval-prompts", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--sft-iters", type=int, default=60)
    p.add_argument("--model", default=None, help="checkpoint (default: the bundled SmolLM2-135M-Instruct)")
    args = p.parse_args()
    out, started = Path(args.out), time.perf_counter()
    prompts = cai_prompts(args.train_prompts + args.eval_prompts, seed=args.seed)
    train, held = prompts[: args.train_prompts], [x["prompt"] for x in prompts[args.train_prompts :]]
    write_jsonl(out / "prompts.jsonl", train)

    model_arg = [f"--model={args.model}"] if args.model else []
    tok = load_tokenizer(args.model)
    before = violation_rates(load_model(args.model, quantize="none"), tok, held, args.seed, args.max_new_tokens)
    print("before:", before)
    cai = run_cai(load_cai_recipe(REPO / "configs" / "align" / "cai-smollm2.yaml", [f"--seed={args.seed}", f"--max_new_tokens={args.max_new_tokens}", *model_arg]),
                  out / "prompts.jsonl", out / "cai")  # fmt: skip
    recipe = load_sft_recipe(REPO / "configs" / "align" / "sft-lora-smollm2.yaml",
                             [f"--max_iters={args.sft_iters}", "--eval_interval=0", "--eval_iters=4", "--val_fraction=0.1",
                              "--checkpoint_interval=0", "--tensorboard=false", f"--seed={args.seed}", *model_arg])  # fmt: skip
    sft(recipe, out / "cai" / "sft.jsonl", out / "sft")
    after = violation_rates(merge_lora(load_adapter(load_model(args.model, quantize="none"), out / "sft")), tok, held, args.seed, args.max_new_tokens)
    print("after:", after)
    record = {"task": "cai_checkable", "train_prompts": len(train), "heldout_prompts": len(held), "cai": cai,
              "violation_rate_before": before, "violation_rate_after": after, "sft_iters": args.sft_iters,
              "total_s": round(time.perf_counter() - started, 1)}  # fmt: skip
    (out / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
