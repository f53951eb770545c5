"""Token-aware chunking that keeps headings.

    chunks = chunk_document(doc, count_tokens, max_tokens=256, overlap=32)

A chunk is a run of whole lines of one section, at most ``max_tokens`` tokens of the embedding
model once its section path is put in front (``Chunk.embed_text``): the path of headings above it,
``"Hamlet > ACT I > SCENE II. A room of state in the castle."``, so a chunk cut from the middle of a
long section still says where it is. Chunks never cross a heading. Inside a section, paragraphs are
packed greedily; a paragraph that does not fit starts the next chunk when the current one is at
least half full, else it is cut between lines (a single over-long line between words). Each chunk
after the first in a section repeats up to ``overlap`` tokens of whole lines from the end of the one
before, so a sentence on the boundary is found in both.

Small-to-big: each chunk is also cut into ``Window``s, runs of whole lines of at most
``window_tokens`` tokens (a line longer than that is a window alone). The windows of a chunk cover
its own lines, not the ones it repeats from the chunk before (those belong to that chunk's windows),
so the windows of a section partition its lines and each window belongs to one chunk. Windows are
what the vector search embeds: a quoted line is then a large part of what it is compared with, not
a tenth of a 128-token chunk diluted by mean pooling; the chunk holding the best window is what
retrieval returns (BM25 and answers work on whole chunks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lmforge.rag.loaders import Block, Document

SECTION_SEPARATOR = " > "


@dataclass
class Window:
    """A few whole lines of a chunk: the unit the vector search embeds (small-to-big)."""

    text: str
    start_line: int
    end_line: int
    n_tokens: int = 0  # special tokens excluded


@dataclass
class Chunk:
    text: str
    section: str  # heading path, "" before the first heading
    start_line: int  # 1-based, inclusive (for PDFs: lines within start_page)
    end_line: int
    page: int | None = None  # first page (PDF)
    end_page: int | None = None
    n_tokens: int = 0  # tokens of embed_text, special tokens excluded
    windows: list[Window] = field(default_factory=list)  # its own lines (not the overlap), in order

    @property
    def embed_text(self) -> str:
        """What is embedded and searched: the section path, then the text."""
        return f"{self.section}\n{self.text}" if self.section else self.text

    @property
    def position(self) -> str:
        """Where the chunk is in its file: ``lines 12-40``, or ``p. 3`` / ``pp. 3-4`` for PDFs."""
        if self.page is not None:
            return f"p. {self.page}" if self.end_page in (None, self.page) else f"pp. {self.page}-{self.end_page}"
        return f"line {self.start_line}" if self.start_line == self.end_line else f"lines {self.start_line}-{self.end_line}"


@dataclass
class _Line:
    text: str
    line: int
    page: int | None
    tokens: int
    para_start: bool  # first line of a paragraph: joined with a blank line before it


def _split_long_line(text: str, line: int, page, budget: int, count: Callable[[str], int]) -> list[_Line]:
    """A line over the budget, cut between words into pieces that fit (a word alone may not)."""
    pieces, words, used = [], [], 0
    for word in text.split(" "):
        n = count(word)
        if words and used + n > budget:
            pieces.append(" ".join(words))
            words, used = [], 0
        words.append(word)
        used += n
    if words:
        pieces.append(" ".join(words))
    return [_Line(p, line, page, count(p), False) for p in pieces]


def _windows(lines: list[_Line], window_tokens: int) -> list[Window]:
    """Greedy runs of whole lines of at most ``window_tokens`` tokens (an over-long line alone)."""
    out, run = [], []

    def flush():
        if run:
            last = run[-1]
            out.append(Window("\n".join(ln.text for ln in run), run[0].line, last.line + last.text.count("\n"),
                              sum(ln.tokens for ln in run)))  # fmt: skip

    for ln in lines:
        if run and sum(x.tokens for x in run) + ln.tokens > window_tokens:
            flush()
            run = []
        run.append(ln)
    flush()
    return out


def chunk_blocks(blocks: list[Block], count_tokens: Callable[[str], int], max_tokens: int = 256,
                 overlap: int = 32, window_tokens: int = 16) -> list[Chunk]:  # fmt: skip
    """Chunks of a document's blocks, with their windows (see the module docstring).
    ``count_tokens(text)``: the embedding tokenizer's count, special tokens excluded."""
    if max_tokens < 16:
        raise ValueError(f"max_tokens={max_tokens} is too small for a chunk (at least 16).")
    if not 0 <= overlap < max_tokens // 2:
        raise ValueError(f"overlap={overlap} must lie in [0, max_tokens/2).")
    if window_tokens < 1:
        raise ValueError(f"window_tokens={window_tokens} must be at least 1 (a window of one line).")
    chunks: list[Chunk] = []
    headings: list[tuple[int, str]] = []
    section, header, budget = "", 0, max_tokens
    current: list[_Line] = []
    carried_n = 0  # how many of current's first lines were repeated from the chunk before

    def close(keep_overlap: bool) -> None:
        nonlocal current, carried_n
        if not current:
            return
        own = current[carried_n:] or current  # a chunk of repeated lines only keeps them as its windows
        parts = []
        for i, ln in enumerate(current):
            parts.append(("\n\n" if ln.para_start and i else "\n" if i else "") + ln.text)
        text = "".join(parts)
        last = current[-1]
        end_line = last.line + last.text.count("\n")
        pages = [ln.page for ln in current]
        chunks.append(Chunk(text, section, current[0].line, end_line, pages[0], pages[-1],
                            sum(ln.tokens for ln in current) + header, _windows(own, window_tokens)))  # fmt: skip
        carried: list[_Line] = []
        if keep_overlap and overlap:
            used = 0
            for ln in reversed(current[1:]):  # never carry the whole chunk
                if used + ln.tokens > overlap:
                    break
                carried.insert(0, ln)
                used += ln.tokens
        current, carried_n = carried, len(carried)

    def used() -> int:
        return sum(ln.tokens for ln in current)

    for block in blocks:
        if block.level:  # a heading closes the chunk and changes the section path
            close(keep_overlap=False)
            headings = [h for h in headings if h[0] < block.level] + [(block.level, " ".join(block.text.split()))]
            section = SECTION_SEPARATOR.join(h[1] for h in headings)
            header = count_tokens(section + "\n")
            budget = max(max_tokens - header, max_tokens // 2)
            continue
        lines: list[_Line] = []
        for i, text in enumerate(block.text.split("\n")):
            n = count_tokens(text)
            line = block.line + i
            if n > budget:
                pieces = _split_long_line(text, line, block.page, budget, count_tokens)
                pieces[0].para_start = i == 0
                lines += pieces
            else:
                lines.append(_Line(text, line, block.page, n, i == 0))
        size = sum(ln.tokens for ln in lines)
        if current and used() + size > budget and used() >= budget // 2:
            close(keep_overlap=True)
        for ln in lines:
            if current and used() + ln.tokens > budget:
                close(keep_overlap=True)
                while current and used() + ln.tokens > budget:  # overlap too large for this line
                    current.pop(0)
                    carried_n = max(carried_n - 1, 0)
            current.append(ln)
    close(keep_overlap=False)
    return chunks


def chunk_document(doc: Document, count_tokens: Callable[[str], int], max_tokens: int = 256, overlap: int = 32,
                   window_tokens: int = 16) -> list[Chunk]:  # fmt: skip
    """Chunks of a loaded document, with their windows (see ``chunk_blocks``)."""
    return chunk_blocks(doc.blocks, count_tokens, max_tokens, overlap, window_tokens)
