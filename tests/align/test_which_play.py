"""``which_play``: held-out questions never share a line with training, the plays are balanced, and
passages are consecutive lines of the play."""

import pytest

from lmforge.align.tasks import DEFAULT_PLAYS, play, which_play
from lmforge.errors import UserError


def _quoted(example) -> str:
    return example["messages"][0]["content"].split('"')[1]


@pytest.mark.parametrize("lines", [1, 3])
def test_held_out_lines_never_seen_in_training(lines):
    train, held = which_play(n_train_per_play=40, n_eval_per_play=10, lines=lines, seed=1)
    assert len(train) == 160 and len(held) == 40
    seen = {line for e in train for line in _quoted(e).split(" / ")}
    assert not any(line in seen for e in held for line in _quoted(e).split(" / "))
    titles = [play(p)[0] for p in DEFAULT_PLAYS]
    assert sorted({e["answer"] for e in held}) == sorted(titles)
    assert all(sum(e["answer"] == t for e in held) == 10 for t in titles)
    assert all(e["messages"][1]["content"] == e["answer"] for e in train)
    if lines == 3:
        _, spoken = play(DEFAULT_PLAYS[0])
        text = " / ".join(spoken)
        ex = next(e for e in held if e["answer"] == play(DEFAULT_PLAYS[0])[0])
        assert _quoted(ex).count(" / ") == 2 and _quoted(ex) in text  # three consecutive lines of that play
        assert "this passage from" in ex["messages"][0]["content"]
    assert which_play(n_train_per_play=40, n_eval_per_play=10, lines=lines, seed=1) == (train, held)


def test_too_few_passages_and_bad_lines_say_so():
    with pytest.raises(UserError, match="3-line passages, fewer than"):
        which_play(n_train_per_play=5000, lines=3)
    with pytest.raises(UserError, match="lines must be at least 1"):
        which_play(lines=0)
