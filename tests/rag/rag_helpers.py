"""Helpers of the RAG tests: a minimal text PDF written by hand, and small document folders."""

from __future__ import annotations

from pathlib import Path


def make_pdf(pages: list[list[str]]) -> bytes:
    """A valid PDF with one Helvetica text line per string, one page per list (pypdf reads it back)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for lines in pages:
        ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
        for line in lines:
            text = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops += [f"({text}) Tj", "T*"]
        ops.append("ET")
        stream = "\n".join(ops)
        objects.append(f"<< /Length {len(stream.encode())} >>\nstream\n{stream}\nendstream")
        content = len(objects)
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content} 0 R "
                       "/Resources << /Font << /F1 3 0 R >> >> >>")  # fmt: skip
        kids.append(len(objects))
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>"
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


GARDEN_MD = """# Garden guide

Intro paragraph about gardens in general.

## Tomatoes

Tomatoes need full sun and deep watering twice a week.
Stake the plants when they reach knee height.

## Roses

Prune roses in late winter, just above an outward-facing bud.
"""

ENGINES_TXT = """Steam engines convert the heat of burning coal into mechanical work.

The piston is pushed by expanding steam inside the cylinder.
"""

BAKING_HTML = """<html><head><title>Baking</title><script>var ignored = "do not index me";</script></head>
<body>
<h1>Bread</h1>
<p>Knead the dough for ten minutes until it is smooth and elastic.</p>
<h2>Proofing</h2>
<p>Let the dough rise in a warm place until it doubles in size.</p>
</body></html>
"""

ASTRONOMY_PDF = [["Astronomy notes", "The Moon orbits the Earth every 27 days."],
                 ["Jupiter is the largest planet of the solar system."]]  # fmt: skip


def write_corpus(root: Path) -> Path:
    """A folder with one file of each type, in sub-folders too."""
    (root / "notes").mkdir(parents=True, exist_ok=True)
    (root / "notes" / "garden.md").write_text(GARDEN_MD)
    (root / "engines.txt").write_text(ENGINES_TXT)
    (root / "baking.html").write_text(BAKING_HTML)
    (root / "astronomy.pdf").write_bytes(make_pdf(ASTRONOMY_PDF))
    return root
