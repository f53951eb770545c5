"""`lmforge tokenizer train`: a byte-level BPE with the special tokens every objective needs."""

from lmforge.cli import main
from lmforge.data import special_ids
from lmforge.tokenizer import load_tokenizer


def test_tokenizer_train_writes_tokenizer_json(tmp_path, play_text, capsys):
    corpus = tmp_path / "macbeth.txt"
    corpus.write_text(play_text, encoding="utf-8")
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "600", "-o", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    tok = load_tokenizer(tmp_path / "tok")
    sp = special_ids(tok)
    assert tok.vocab_size == 600 and tok.eos_id == tok.bos_id == 0
    assert sp.pad is not None and sp.mask is not None and len(sp.sentinels) == 100
    text = "Fair is foul, and foul is fair."
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<mask>", add_special_tokens=False) == [sp.mask]  # special tokens stay whole
    capsys.readouterr()
    assert main(["tokenizer", "train", str(tmp_path / "missing.txt"), "--vocab-size", "600", "-o", str(tmp_path / "t2")]) == 2
    err = capsys.readouterr().err
    assert "missing.txt" in err and "Traceback" not in err
