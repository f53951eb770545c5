"""Loaders: every format becomes heading and paragraph blocks with their source line (and page)."""

import pytest
from rag_helpers import ASTRONOMY_PDF, BAKING_HTML, make_pdf

from lmforge.rag.loaders import Block, LoadError, kind_of, load_document


def test_markdown_headings_atx_setext_and_fences(tmp_path):
    p = tmp_path / "a.md"
    p.write_text("Title\n=====\n\nIntro line one\nline two\n\n```\n# not a heading\n```\n\n## Part *B* ##\n\nBody\n\nSub\n---\ntext\n")
    blocks = load_document(p).blocks
    assert blocks[0] == Block("Title", 1, 1)
    assert blocks[1] == Block("Intro line one\nline two", 0, 4)
    assert blocks[2] == Block("```\n# not a heading\n```", 0, 7)  # inside a fence: a paragraph
    assert blocks[3] == Block("Part B", 2, 11)  # inline markup reduced to its text
    assert blocks[4] == Block("Body", 0, 13)
    assert blocks[5] == Block("Sub", 2, 15) and blocks[6] == Block("text", 0, 17)


def test_markdown_inline_markup_becomes_text(tmp_path):
    p = tmp_path / "a.md"
    p.write_text("**HAMLET**  \nTo be, or _not_ to be: see [the play](http://x) and `code`, snake_case_name, 2 * 3.\n")
    (b,) = load_document(p).blocks
    assert b.text == "HAMLET\nTo be, or not to be: see the play and code, snake_case_name, 2 * 3."


def test_text_paragraphs_keep_line_numbers(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"\xef\xbb\xbffirst\r\nsecond  \r\n\r\n\r\nthird\n")
    assert load_document(p).blocks == [Block("first\nsecond", 0, 1), Block("third", 0, 5)]


def test_html_headings_paragraphs_and_skipped_script(tmp_path):
    p = tmp_path / "a.html"
    p.write_text(BAKING_HTML)
    blocks = load_document(p).blocks
    assert [(b.text, b.level, b.line) for b in blocks] == [
        ("Bread", 1, 3),
        ("Knead the dough for ten minutes until it is smooth and elastic.", 0, 4),
        ("Proofing", 2, 5),
        ("Let the dough rise in a warm place until it doubles in size.", 0, 6),
    ]
    assert not any("ignored" in b.text for b in blocks)


def test_pdf_pages(tmp_path):
    p = tmp_path / "a.pdf"
    p.write_bytes(make_pdf(ASTRONOMY_PDF))
    doc = load_document(p)
    assert doc.kind == "pdf"
    assert [(b.page, b.text) for b in doc.blocks] == [(1, "Astronomy notes\nThe Moon orbits the Earth every 27 days."),
                                                      (2, "Jupiter is the largest planet of the solar system.")]  # fmt: skip


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("bad.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog", "not a readable PDF"),
        ("blob.txt", bytes(range(256)) * 4, "binary"),
        ("latin.md", "caf\xe9".encode("latin-1"), "not valid UTF-8"),
    ],
)
def test_unreadable_files_raise_naming_the_file(tmp_path, name, data, reason):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(LoadError, match=reason) as e:
        load_document(p)
    assert str(p) in str(e.value)


def test_kinds():
    assert [kind_of(x) for x in ("a.TXT", "b.markdown", "c.htm", "d.pdf", "e.py", "f")] == ["txt", "md", "html", "pdf", None, None]
