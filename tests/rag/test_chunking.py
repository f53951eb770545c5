"""Chunking: token budget, heading paths, overlap, positions, and the windows inside chunks."""

import pytest

from lmforge.rag.chunking import chunk_blocks
from lmforge.rag.loaders import Block


def words(text: str) -> int:  # a tokenizer stand-in: one token per word
    return len(text.split())


def play(n_speeches=40):
    blocks = [Block("Play", 1, 1), Block("ACT I", 2, 3), Block("SCENE I. A hall.", 3, 5)]
    line = 7
    for i in range(n_speeches):
        text = f"**SPEAKER{i}**\n" + "\n".join(f"speech {i} line {j} has several words in it" for j in range(3))
        blocks.append(Block(text, 0, line))
        line += 5
    blocks += [Block("SCENE II. A field.", 3, line), Block("one short closing line", 0, line + 2)]
    return blocks


def test_chunks_fit_the_budget_and_cover_every_line():
    blocks = play()
    chunks = chunk_blocks(blocks, words, max_tokens=64, overlap=12)
    assert all(c.n_tokens <= 64 for c in chunks)
    assert all(c.n_tokens == words(c.embed_text) for c in chunks)  # section path counted
    covered = "\n".join(c.text for c in chunks)
    for b in blocks:
        if not b.level:
            for line in b.text.split("\n"):
                assert line in covered


def test_heading_path_and_no_chunk_crosses_a_heading():
    chunks = chunk_blocks(play(), words, max_tokens=64, overlap=12)
    assert chunks[0].section == "Play > ACT I > SCENE I. A hall."
    assert chunks[-1].section == "Play > ACT I > SCENE II. A field." and chunks[-1].text == "one short closing line"
    assert chunks[-1].embed_text.startswith("Play > ACT I > SCENE II. A field.\n")
    assert all("one short closing line" not in c.text for c in chunks[:-1])
    # a higher-level heading pops the deeper ones
    blocks = [Block("A", 1, 1), Block("B", 2, 2), Block("C", 3, 3), Block("x", 0, 4), Block("D", 2, 5), Block("y", 0, 6)]
    assert [c.section for c in chunk_blocks(blocks, words, 32, 0)] == ["A > B > C", "A > D"]


def test_overlap_repeats_whole_lines_within_budget():
    chunks = chunk_blocks(play(), words, max_tokens=64, overlap=12)
    scene1 = [c for c in chunks if c.section.endswith("hall.")]
    assert len(scene1) > 3
    for a, b in zip(scene1, scene1[1:]):
        a_lines, b_lines = a.text.split("\n"), b.text.split("\n")
        shared = [ln for ln in b_lines if ln and ln in a_lines]
        assert shared, "consecutive chunks share their boundary lines"
        assert sum(words(ln) for ln in shared) <= 12
        assert b.start_line <= a.end_line  # positions overlap too
    no_overlap = chunk_blocks(play(), words, max_tokens=64, overlap=0)
    assert all(b.start_line > a.end_line for a, b in zip(no_overlap, no_overlap[1:]))


def test_positions_are_source_lines():
    chunks = chunk_blocks(play(), words, max_tokens=64, overlap=0)
    first = chunks[0]
    assert first.start_line == 7 and first.text.startswith("**SPEAKER0**")
    n_lines = first.text.count("\n") - first.text.count("\n\n")  # blank lines between paragraphs are not source lines
    assert first.end_line >= first.start_line + n_lines
    assert first.position == f"lines {first.start_line}-{first.end_line}"


def test_a_line_longer_than_the_budget_is_cut_between_words():
    long = " ".join(f"w{i}" for i in range(100))
    chunks = chunk_blocks([Block(long, 0, 1)], words, max_tokens=30, overlap=0)
    assert all(c.n_tokens <= 30 for c in chunks)
    assert " ".join(c.text for c in chunks) == long
    assert all(c.start_line == 1 for c in chunks)


def test_pdf_pages_in_position():
    blocks = [Block("one two three", 0, 1, page=1), Block("four five six", 0, 1, page=2)]
    (c,) = chunk_blocks(blocks, words, max_tokens=32, overlap=0)
    assert (c.page, c.end_page, c.position) == (1, 2, "pp. 1-2")


def test_windows_partition_the_lines_and_fit_their_budget():
    blocks = play()
    chunks = chunk_blocks(blocks, words, max_tokens=64, overlap=12, window_tokens=20)
    for c in chunks:
        assert c.windows
        chunk_lines = c.text.split("\n")
        for w in c.windows:
            assert c.start_line <= w.start_line <= w.end_line <= c.end_line
            assert all(ln in chunk_lines for ln in w.text.split("\n"))
            assert w.n_tokens == words(w.text) and (w.n_tokens <= 20 or "\n" not in w.text)
        assert [w.start_line for w in c.windows] == sorted(w.start_line for w in c.windows)
    # every source line is in exactly one window, in order: the overlap repeated by a chunk is not windowed again
    windowed = [ln for c in chunks for w in c.windows for ln in w.text.split("\n")]
    assert windowed == [ln for b in blocks if not b.level for ln in b.text.split("\n")]
    assert sum(len(c.windows) for c in chunks) > len(chunks)  # several windows a chunk at this size
    one = chunk_blocks(blocks, words, max_tokens=64, overlap=12, window_tokens=1)
    assert all(w.start_line == w.end_line and "\n" not in w.text for c in one for w in c.windows)


def test_bad_settings():
    with pytest.raises(ValueError, match="overlap"):
        chunk_blocks([], words, max_tokens=64, overlap=40)
    with pytest.raises(ValueError, match="window_tokens"):
        chunk_blocks([], words, max_tokens=64, overlap=0, window_tokens=0)
