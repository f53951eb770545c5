"""The Shakespeare question generator and the retrieval metrics."""

import random
import re

import pytest

from lmforge.rag.eval import Candidates, Question, corpus_dir, make_questions, metrics, paraphrase, score, speech_lines


@pytest.fixture(scope="module")
def plays(tmp_path_factory):
    """Three real plays, cut short (the generator reads the folder like the full corpus)."""
    src = corpus_dir()
    root = tmp_path_factory.mktemp("plays")
    for rel in ("tragedies/hamlet.md", "tragedies/macbeth.md", "comedies/twelfth-night.md"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("\n".join((src / rel).read_text().splitlines()[:800]) + "\n")
    return root


def test_the_full_corpus_is_38_plays():
    assert len(list(corpus_dir().rglob("*.md"))) == 38


def test_speech_lines_know_play_and_speaker(plays):
    lines = speech_lines(plays / "tragedies/hamlet.md", "tragedies/hamlet.md")
    first = lines[0]
    assert (first.play, first.speaker, first.text, first.line) == ("Hamlet", "BERNARDO", "Who's there?", 10)
    assert not any(ln.text.startswith("_") for ln in lines)  # stage directions are not speech


def test_questions_are_seeded_and_point_at_their_line(plays):
    qs = make_questions(plays, n=40, seed=3)
    assert qs == make_questions(plays, n=40, seed=3) and qs != make_questions(plays, n=40, seed=4)
    assert [q.kind for q in qs[:4]] == ["quote", "paraphrase", "quote", "paraphrase"]
    assert len({(q.path, q.line) for q in qs}) == 40
    for q in qs:
        file_lines = (plays / q.path).read_text().splitlines()
        assert q.quote.replace(" ", "") in re.sub(r"[*_]", "", file_lines[q.line - 1]).replace(" ", "")
        speaker = next(ln for ln in reversed(file_lines[: q.line - 1]) if re.fullmatch(r"\*\*.+\*\*\s*", ln))
        assert speaker.strip().strip("*") == q.speaker  # the speech's speaker is the gold answer
        assert len(q.quote.split()) >= 8
        if q.kind == "quote":
            assert f'"{q.quote}"' in q.query
        assert q.play not in q.query and q.speaker not in q.query.split('"')[0]  # the facts are held out


def test_paraphrase_modernises_and_drops_words():
    p = paraphrase("Thou art more lovely and more temperate, 'tis said, than thy summer's day", random.Random(0))
    assert "thou" not in p.split() and "art" not in p.split() and "thy" not in p.split()
    assert len(p.split()) < len("you are more lovely and more temperate it is said than your summer's day".split())


def test_metrics_and_fusion_scoring():
    q = Question("quote", "q", "a.md", 1, "A", "X", "text")
    cands = [Candidates(q, bm25=[5, 1, 2], vector=[2, 5], relevant={2}),  # bm25 rank 3, vector rank 1
             Candidates(q, bm25=[7], vector=[8], relevant={9})]  # missed by both  # fmt: skip
    assert metrics([3, None], k=5) == {"recall@5": 0.5, "mrr": pytest.approx((1 / 3) / 2)}
    assert score(cands, "bm25")["all"] == metrics([3, None])
    assert score(cands, "vector")["all"] == metrics([1, None])
    # RRF with k=60: id 5 = 1/61 + 1/62 > id 2 = 1/63 + 1/61 > id 1 = 1/62 -> the relevant id 2 second
    assert score(cands, "hybrid", rrf_k=60)["all"] == metrics([2, None])
    assert score(cands, "hybrid", rrf_k=60, weights=(1.0, 5.0))["all"] == metrics([1, None])  # vectors trusted more


@pytest.mark.slow
def test_eval_end_to_end_on_three_plays(plays, embedder, tmp_path):
    from lmforge.rag.eval import evaluate, format_table, plot
    from lmforge.rag.index import index_directory

    index_directory(plays, tmp_path / "p.db", embedder, progress=False)
    result = evaluate(tmp_path / "p.db", make_questions(plays, n=40, seed=0), embedder=embedder, progress=False)
    table = format_table(result)
    for name in ("bm25", "vector", "hybrid"):
        assert name in table
    assert result["results"]["bm25"]["all"]["recall@5"] > 0.5  # quotes of lines from these very files
    assert plot(result, tmp_path / "e.png").stat().st_size > 1000
