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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge", description="A complete, fast, hackable LLM stack on PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="describe a checkpoint: family, parameters, dims, context, tokenizer")
    s.add_argument("model", nargs="?", default=None, help="HF directory or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    s.set_defaults(func=cmd_info)

    # Other verbs register here (one add_parser block each).
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
