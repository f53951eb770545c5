"""`lmforge eval ...`, `lmforge scaling ...`, `lmforge viz ...`: thin verbs over ``lmforge.eval``.

Registered in ``lmforge.cli.build_parser`` by ``add_parser(sub)``.
"""

from __future__ import annotations

import argparse
import json

MODEL_HELP = "HF directory or .gguf file (default: bundled SmolLM2-135M-Instruct, dequantized to fp32)"


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


# --- eval --------------------------------------------------------------------------------------------
def cmd_eval_perplexity(args: argparse.Namespace) -> None:
    from lmforge.eval.perplexity import file_perplexity

    r = file_perplexity(args.model, args.data, context=args.context, stride=args.stride, max_tokens=args.max_tokens)
    print(f"perplexity {r.ppl:.4f}  bits/byte {r.bits_per_byte:.4f}  ({r.tokens:,} tokens, {r.bytes:,} bytes, "
          f"{r.windows} windows of {r.context} every {r.stride})")  # fmt: skip
    if args.json:
        _print_json(r.to_dict())


def cmd_eval_tasks(args: argparse.Namespace) -> None:
    from lmforge.eval.tasks import run_tasks

    results = run_tasks(args.model, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit, seed=args.seed,
                        max_new_tokens=args.max_new_tokens, out=args.out)  # fmt: skip
    for r in results:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in r.metrics.items())
        print(f"{r.task} ({r.kind}, {r.num_fewshot}-shot, n={r.n}): {shown}")
    if args.out:
        print(f"wrote {args.out}")


def cmd_eval_make_task(args: argparse.Namespace) -> None:
    from lmforge.eval.make_tasks import make_task

    options = {"digits": args.digits} if args.kind == "arithmetic" else {"max_words": args.max_words}
    path = make_task(args.kind, args.out, n=args.n, seed=args.seed, **options)
    print(f"wrote {path} ({sum(1 for _ in open(path, encoding='utf-8'))} examples)")


# --- scaling -----------------------------------------------------------------------------------------
def cmd_scaling_sweep(args: argparse.Namespace) -> None:
    from lmforge.eval.scaling import sweep

    r = sweep(args.recipe, args.data, args.out, budget_minutes=args.budget_minutes, dry_run=args.dry_run,
              bootstrap_samples=args.bootstrap, threads=args.threads)  # fmt: skip
    print(f"estimated training time {r['estimated_minutes']:.1f} min (budget {r['budget_minutes']:g} min)")
    if args.dry_run:
        _print_json(r)
        return
    _print_fit(r, args.out)


def cmd_scaling_fit(args: argparse.Namespace) -> None:
    from lmforge.eval.scaling import refit

    _print_fit(refit(args.out, bootstrap_samples=args.bootstrap), args.out)


def cmd_scaling_emergence(args: argparse.Namespace) -> None:
    from lmforge.eval.emergence import emergence

    r = emergence(args.out, args.task, num_fewshot=args.num_fewshot, limit=args.limit, max_new_tokens=args.max_new_tokens)
    for row in r["runs"]:
        print(f"{row['name']:>18}  C {row['C']:.2e}  loss {row['loss']:.3f}  exact {row['exact_match']:.3f}  "
              f"answer-token prob {row['target_token_prob']:.3f}  edit distance {row['edit_distance']:.3f}")  # fmt: skip
    print(f"wrote {args.out}/emergence.json and {args.out}/emergence.png")


def _print_fit(r: dict, out) -> None:
    p, ci = r["params"], r["ci95"]
    shown = ", ".join(f"{k} {p[k]:.4g}" + (f" [{ci[k][0]:.3g}, {ci[k][1]:.3g}]" if k in ci else "") for k in p)
    print(f"fit on {r['fit_runs']} runs: {shown}")
    if r.get("undetermined"):
        print(f"warning: the runs do not determine {', '.join(r['undetermined'])} (a parameter on the edge of its range, "
              "or a term under 1% of the loss): the fit is degenerate, its predictions are guesses")  # fmt: skip
    for h in r["held_out"]:
        print(f"held-out {h['name']}: measured {h['loss']:.4f}, predicted {h['predicted']:.4f} ({100 * h['rel_error']:+.2f}%)")
    print(f"wrote {out}/fit.json, {out}/scaling.png, {out}/runs.json")
    if "emergence" in r:
        for row in r["emergence"]["runs"]:
            print(f"emergence {row['name']:>16}: exact {row['exact_match']:.3f}, answer-token prob {row['target_token_prob']:.3f}, "
                  f"edit distance {row['edit_distance']:.3f}")  # fmt: skip
        print(f"wrote {out}/emergence.json and {out}/emergence.png")


# --- viz ---------------------------------------------------------------------------------------------
def cmd_viz_attention(args: argparse.Namespace) -> None:
    from lmforge.eval.viz import attention_report

    r = attention_report(args.model, args.prompt, args.out)
    print(f"{r['layers']} layers x {r['heads']} heads over {r['tokens']} tokens (recomputed vs model output: "
          f"max |diff| {r['max_error']:.2e}); wrote {r['png']} and {r['html']}")  # fmt: skip


def cmd_viz_dashboard(args: argparse.Namespace) -> None:
    from lmforge.eval.viz import training_dashboard

    print(f"wrote {training_dashboard(args.run, args.out)}")


def add_parser(sub) -> None:
    """Register the eval, scaling and viz verbs on the top-level subparsers."""
    s = sub.add_parser("eval", help="evaluate a model: strided perplexity, few-shot tasks")
    esub = s.add_subparsers(dest="eval_command", required=True, metavar="ACTION")

    e = esub.add_parser("perplexity", help="strided sliding-window perplexity and bits per byte of a text file")
    e.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    e.add_argument("--data", required=True, help="UTF-8 text file, tokenized whole")
    e.add_argument("--context", type=int, default=None, help="tokens per window (default: the model's context)")
    e.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: context / 2)")
    e.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens (a quick slice)")
    e.add_argument("--json", action="store_true", help="also print the result as JSON")
    e.set_defaults(func=cmd_eval_perplexity)

    e = esub.add_parser("tasks", help="zero-/few-shot multiple-choice and generate-until tasks from JSONL files")
    e.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    e.add_argument("--tasks", nargs="+", required=True, help="JSONL task files (see `lmforge eval make-task`)")
    e.add_argument("--num-fewshot", type=int, default=0, help="examples of the same file before each prompt")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of each file")
    e.add_argument("--seed", type=int, default=1234, help="chooses the few-shot examples")
    e.add_argument("--max-new-tokens", type=int, default=32, help="generate-until: longest answer")
    e.add_argument("--out", default=None, help="write metrics and per-example outputs as JSON here")
    e.set_defaults(func=cmd_eval_tasks)

    e = esub.add_parser("make-task", help="write a seeded task file: arithmetic, cloze (Shakespeare), copy (recall)")
    e.add_argument("kind", choices=["arithmetic", "cloze", "copy"])
    e.add_argument("--out", required=True, help="JSONL file to write")
    e.add_argument("-n", "--n", type=int, default=200, help="number of examples")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--digits", type=int, default=2, help="arithmetic: digits per operand")
    e.add_argument("--max-words", type=int, default=12, help="cloze, copy: longest verse line used, in words")
    e.set_defaults(func=cmd_eval_make_task)

    s = sub.add_parser("scaling", help="scaling laws: train a grid of small models, fit L(N, D), predict larger ones")
    ssub = s.add_subparsers(dest="scaling_command", required=True, metavar="ACTION")
    e = ssub.add_parser("sweep", help="train the recipe's grid within its budget, fit the law, write fit.json + scaling.png")
    e.add_argument("recipe", help="YAML recipe with a scaling: section (see configs/scaling-*.yaml)")
    e.add_argument("--data", required=True, help="prepared data directory or a raw text corpus (prepared once)")
    e.add_argument("--out", required=True, help="sweep directory (finished runs are kept and skipped on a rerun)")
    e.add_argument("--budget-minutes", type=float, default=None, help="override the recipe's budget_minutes")
    e.add_argument("--dry-run", action="store_true", help="measure speeds and print the plan and its cost; train nothing")
    e.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the confidence intervals")
    e.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest for tiny models on a busy machine)")
    e.set_defaults(func=cmd_scaling_sweep)
    e = ssub.add_parser("fit", help="fit again from a sweep directory's runs.json")
    e.add_argument("out", help="sweep directory")
    e.add_argument("--bootstrap", type=int, default=200)
    e.set_defaults(func=cmd_scaling_fit)
    e = ssub.add_parser("emergence", help="score every model of a sweep on a few-shot task: exact match vs continuous metrics")
    e.add_argument("out", help="sweep directory")
    e.add_argument("--task", required=True, help="generate-until JSONL task (e.g. `lmforge eval make-task copy`)")
    e.add_argument("--num-fewshot", type=int, default=1)
    e.add_argument("--limit", type=int, default=50, help="examples per model")
    e.add_argument("--max-new-tokens", type=int, default=48)
    e.set_defaults(func=cmd_scaling_emergence)

    s = sub.add_parser("viz", help="pictures: attention maps (PNG + HTML viewer), a training dashboard")
    vsub = s.add_subparsers(dest="viz_command", required=True, metavar="ACTION")
    e = vsub.add_parser("attention", help="attention of every layer and head for a prompt: attention.png + attention.html")
    e.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    e.add_argument("-p", "--prompt", required=True, help="the text to look at")
    e.add_argument("--out", default="attention", help="output directory (default: ./attention)")
    e.set_defaults(func=cmd_viz_attention)
    e = vsub.add_parser("dashboard", help="loss, learning rate, throughput and perplexity of a run: dashboard.png")
    e.add_argument("run", help="run directory of `lmforge pretrain` (holds metrics.jsonl)")
    e.add_argument("--out", default=None, help="PNG path (default: RUN/dashboard.png)")
    e.set_defaults(func=cmd_viz_dashboard)
