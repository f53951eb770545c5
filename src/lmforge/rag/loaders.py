"""Documents from files: .txt, .md, .html and .pdf, as lines of text with their headings marked.

    doc = load_document("notes/intro.md")      # Document(path, kind, blocks)
    for block in doc.blocks: ...                # Block(text, heading_level, line, page)

Every loader produces the same thing, a list of ``Block``s: a heading (``level`` 1-6) or a
paragraph (``level`` 0), with the 1-based line it starts on (its position in the source) and, for
PDFs, its page. The chunker (``rag/chunking.py``) works on blocks only, so headings are kept the
same way whatever the format.

A file that cannot be read as text (a binary file, a corrupt PDF, invalid UTF-8) raises
``LoadError`` naming it; the indexer skips it with a warning and goes on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from lmforge.errors import UserError

SUFFIXES = {".txt": "txt", ".md": "md", ".markdown": "md", ".html": "html", ".htm": "html", ".pdf": "pdf"}


class LoadError(UserError, ValueError):
    """A file that cannot be read as a document; the message names the file and why."""


@dataclass
class Block:
    """A heading (``level`` 1-6) or a paragraph (``level`` 0) of a document."""

    text: str
    level: int = 0
    line: int = 1  # 1-based line of the source where the block starts (for PDFs: line within the page)
    page: int | None = None  # 1-based page (PDF only)


@dataclass
class Document:
    path: Path
    kind: str  # "txt", "md", "html" or "pdf"
    blocks: list[Block] = field(default_factory=list)


def kind_of(path: str | Path) -> str | None:
    """The loader kind of a path by its suffix, or None when lmforge does not read it."""
    return SUFFIXES.get(Path(path).suffix.lower())


def load_document(path: str | Path, data: bytes | None = None) -> Document:
    """Read one file into blocks (``data``: its bytes, when the caller has already read them)."""
    path = Path(path)
    kind = kind_of(path)
    if kind is None:
        raise LoadError(f"{path}: lmforge reads {', '.join(sorted(set(SUFFIXES)))} files, not {path.suffix or 'files without a suffix'}.")
    raw = path.read_bytes() if data is None else data
    if kind == "pdf":
        return Document(path, kind, _pdf_blocks(raw, path))
    text = _decode_text(raw, path)
    if kind == "html":
        return Document(path, kind, _html_blocks(text))
    return Document(path, kind, _markdown_blocks(text) if kind == "md" else _text_blocks(text))


# --- text and markdown ---------------------------------------------------------------------------
def _decode_text(raw: bytes, path: Path) -> str:
    if b"\x00" in raw[:8192]:
        raise LoadError(f"{path} looks binary (it holds NUL bytes), not text.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LoadError(f"{path} is not valid UTF-8 at byte {e.start}; convert it (e.g. iconv -f latin1 -t utf-8).") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _paragraphs(lines: list[str], first_line: int = 1, page: int | None = None) -> list[Block]:
    """Runs of non-blank lines as paragraph blocks (trailing spaces dropped, line numbers kept)."""
    blocks, start, buf = [], None, []
    for i, line in enumerate(lines + [""]):
        if line.strip():
            if start is None:
                start = i
            buf.append(line.rstrip())
        elif buf:
            blocks.append(Block("\n".join(buf), 0, first_line + start, page))
            start, buf = None, []
    return blocks


def _text_blocks(text: str) -> list[Block]:
    return _paragraphs(text.split("\n"))


_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


_INLINE = [  # Markdown inline markup -> its text (what a reader sees, and what the embedder should)
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),  # images: alt text
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # links: link text
    (re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1"), r"\2"),  # strong
    (re.compile(r"(?<![\w*])([*_])(?=\S)(.+?)(?<=\S)\1(?![\w*])"), r"\2"),  # emphasis (not snake_case)
    (re.compile(r"`([^`]+)`"), r"\1"),  # inline code
]


def plain_inline(text: str) -> str:
    """Markdown inline markup removed: ``**HAMLET**`` -> ``HAMLET``, ``[docs](url)`` -> ``docs``."""
    for pattern, repl in _INLINE:
        text = pattern.sub(repl, text)
    return text


def _markdown_blocks(text: str) -> list[Block]:
    """ATX headings (``# Title``) and setext headings (``Title`` over ``===``/``---``) become heading
    blocks; everything else paragraphs, with inline markup (emphasis, links, code spans) reduced to
    its text. Lines inside fenced code are never headings and are kept as they are."""
    lines = text.split("\n")
    blocks: list[Block] = []
    para_start, in_fence = 0, False

    def flush(end: int) -> None:
        for b in _paragraphs(lines[para_start:end], para_start + 1):
            if not _FENCE.match(b.text):
                b.text = plain_inline(b.text)
            blocks.append(b)

    i = 0
    while i < len(lines):
        line = lines[i]
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            m = _ATX.match(line)
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            setext = line.strip() and (i == 0 or not lines[i - 1].strip()) and re.fullmatch(r" {0,3}(=+|-+)[ \t]*", nxt)
            if m or setext:
                flush(i)
                if m:
                    blocks.append(Block(plain_inline(m.group(2).strip()), len(m.group(1)), i + 1))
                else:
                    blocks.append(Block(plain_inline(line.strip()), 1 if nxt.strip()[0] == "=" else 2, i + 1))
                    i += 1
                para_start = i + 1
        i += 1
    flush(len(lines))
    return blocks


# --- html ----------------------------------------------------------------------------------------
class _HTMLText(HTMLParser):
    """Visible text of an HTML page as blocks: <h1>-<h6> headings, block elements as paragraphs;
    <script>, <style>, <head> contents dropped. Each block keeps the source line it starts on."""

    BLOCK = {"p", "div", "li", "tr", "br", "pre", "blockquote", "section", "article", "table", "ul", "ol", "dd", "dt",
             "header", "footer", "main", "nav", "aside", "figure", "figcaption", "hr", "td", "th"}  # fmt: skip
    SKIP = {"script", "style", "head", "noscript", "template", "svg"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self.buf: list[str] = []
        self.start_line = 1
        self.level = 0
        self.skipping = 0

    def flush(self) -> None:
        text = re.sub(r"[ \t\r\f\v]+", " ", "".join(self.buf))
        text = "\n".join(line.strip() for line in text.split("\n") if line.strip())
        if text:
            self.blocks.append(Block(text, self.level, self.start_line))
        self.buf, self.level = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.flush()
            self.level = int(tag[1])
        elif tag in self.BLOCK:
            self.flush()
            if tag == "li":
                self.buf.append("- ")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif re.fullmatch(r"h[1-6]", tag) or tag in self.BLOCK:
            self.flush()

    def handle_data(self, data):
        if self.skipping:
            return
        if not "".join(self.buf).strip():
            leading = data[: len(data) - len(data.lstrip())]
            self.start_line = self.getpos()[0] + leading.count("\n")
        self.buf.append(data)


def _html_blocks(text: str) -> list[Block]:
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    parser.flush()
    return parser.blocks


# --- pdf -----------------------------------------------------------------------------------------
def _pdf_blocks(raw: bytes, path: Path) -> list[Block]:
    """Text of every page (pypdf), as paragraphs carrying their page number."""
    import io
    import logging

    import pypdf

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # pypdf logs every repairable oddity; we report failures
    try:
        reader = pypdf.PdfReader(io.BytesIO(raw))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as e:  # pypdf raises many types for damaged files
        raise LoadError(f"{path} is not a readable PDF ({type(e).__name__}: {e}).") from None
    blocks = []
    for number, text in enumerate(pages, start=1):
        blocks += _paragraphs(text.replace("\r\n", "\n").split("\n"), 1, number)
    if not blocks and pages:
        raise LoadError(f"{path} has no extractable text (a scanned PDF needs OCR first).")
    return blocks
