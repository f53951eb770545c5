"""`lmforge <verb>`: a thin command line over the library.

Each verb is a ``cmd_*`` function of a few lines over a public function, registered in
``build_parser``. Errors that a user can fix (bad paths, bad configs, bad inputs) are printed as
one sentence and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys


def cmd_info(args: argparse.Namespace) -> None:
    from lmforge.checkpoints import describe

    for key, value in describe(args.model).items():
        print(f"{key:>16}: {value}")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from lmforge.data import PRETRAIN_SPECIAL_TOKENS
    from lmforge.tokenizer import train_bpe

    specials = args.special_tokens or PRETRAIN_SPECIAL_TOKENS
    tok = train_bpe(args.files, args.vocab_size, special_tokens=specials)
    tok.save(args.out)
    print(f"wrote {args.out}/tokenizer.json ({tok.vocab_size} tokens, {len(specials)} special)")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from lmforge.data import prepare

    prepare(args.inputs, args.out, args.tokenizer, val_fraction=args.val_fraction, field=args.field,
            shard_tokens=args.shard_tokens)  # fmt: skip


def cmd_pretrain(args: argparse.Namespace) -> None:
    from lmforge.train import load_recipe, pretrain

    recipe = load_recipe(args.config, args.overrides)
    pretrain(recipe.train, recipe.model, args.data, args.out, resume=args.resume)


def cmd_sample(args: argparse.Namespace) -> None:
    from lmforge.train.sample import sample

    texts = sample(args.model, args.prompt, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed)  # fmt: skip
    print("\n---------------\n".join(texts))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge", description="A complete, fast, hackable LLM stack on PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="describe a checkpoint: family, parameters, dims, context, tokenizer")
    s.add_argument("model", nargs="?", default=None, help="HF directory or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("tokenizer", help="tokenizer tools: train a byte-level BPE")
    tsub = s.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train a byte-level BPE on text files; writes DIR/tokenizer.json")
    t.add_argument("files", nargs="+", help="text files to learn from")
    t.add_argument("--vocab-size", type=int, required=True, help="number of token ids, special tokens included")
    t.add_argument("-o", "--out", required=True, help="output directory")
    t.add_argument("--special-tokens", nargs="+", default=None,
                   help="special tokens, the first being BOS/EOS (default: <|endoftext|> <pad> <mask> and 100 T5 sentinels)")
    t.set_defaults(func=cmd_tokenizer_train)

    s = sub.add_parser("data", help="corpora: tokenize text into training shards")
    dsub = s.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    d = dsub.add_parser("prepare", help="tokenize .txt/.md/.jsonl files or folders into memory-mapped shards + meta.json")
    d.add_argument("inputs", nargs="+", help="files or folders")
    d.add_argument("-o", "--out", required=True, help="output directory")
    d.add_argument("--tokenizer", required=True, help="char, bpe:N (train a BPE of N ids here), or a tokenizer path")
    d.add_argument("--val-fraction", type=float, default=0.1, help="share of the token stream kept for validation (the end)")
    d.add_argument("--field", default="text", help="text field of .jsonl records")
    d.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    d.set_defaults(func=cmd_data_prepare)

    s = sub.add_parser(
        "pretrain", allow_abbrev=False,
        help="pretrain a model from a YAML recipe; any config key can be overridden with --key=value",
        epilog="Run under `torchrun --nproc_per_node N` for DDP (--strategy=ddp) or FSDP2 (--strategy=fsdp).",
    )  # fmt: skip
    s.add_argument("config", help="YAML recipe (see configs/)")
    s.add_argument("--data", required=True, help="prepared data directory, or a raw .txt/.md/.jsonl corpus (prepared on the fly)")
    s.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, loss.png, final model")
    s.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    s.set_defaults(func=cmd_pretrain, accepts_overrides=True)

    s = sub.add_parser("sample", help="print text sampled from a trained model or run directory")
    s.add_argument("model", help="run directory or checkpoint directory")
    s.add_argument("-p", "--prompt", default=None, help="text to continue (default: a newline)")
    s.add_argument("-n", "--num-samples", type=int, default=3)
    s.add_argument("--max-new-tokens", type=int, default=300)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=200)
    s.add_argument("--seed", type=int, default=1337)
    s.set_defaults(func=cmd_sample)

    # Other verbs register here (one add_parser block each).
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    from lmforge.errors import UserError

    try:
        args.func(args)
    except UserError as e:
        print(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
