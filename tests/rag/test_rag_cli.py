"""`lmforge rag index | ask`: thin verbs, user errors as one sentence and exit status 2."""

import subprocess
import sys

from rag_helpers import write_corpus

from lmforge.cli import main


def test_ask_on_a_missing_db_says_how_to_build_it(tmp_path):
    db = tmp_path / "none.db"
    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "rag", "ask", "who?", "--db", str(db)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"lmforge rag index DIR --db {db}" in r.stderr
    assert r.stderr.count("\n") == 1  # one sentence
    assert not db.exists()  # asking never creates a database


def test_index_then_ask_retrieve_only(tmp_path, capsys, monkeypatch, embedder):
    import lmforge.rag.embed as embed

    monkeypatch.setattr(embed.Embedder, "load", classmethod(lambda cls, *a, **k: embedder))  # the session's model
    root, db = write_corpus(tmp_path / "docs"), tmp_path / "a.db"
    assert main(["rag", "index", str(root), "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "4 added" in out and "chunks in the index" in out
    assert main(["rag", "ask", "prune roses", "--db", str(db), "--retrieve-only", "-k", "1", "--type", "md"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1] notes/garden.md, line") and "Prune roses" in out


def test_index_of_a_missing_folder(tmp_path, capsys):
    assert main(["rag", "index", str(tmp_path / "nope"), "--db", str(tmp_path / "a.db")]) == 2
    assert "is not a folder" in capsys.readouterr().err
