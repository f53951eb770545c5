"""lmforge.data.prepare: corpora -> token shards, split, EOS, dtype, meta.json, and its errors."""

import json

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.data import DataError, TokenData, prepare, token_dtype
from lmforge.tokenizer import CharTokenizer, load_tokenizer


def test_single_file_is_split_by_position_like_nanogpt(tmp_path, play_text):
    src = tmp_path / "play.txt"
    src.write_text(play_text, encoding="utf-8")
    data = prepare(src, tmp_path / "out", "char", progress=False)
    n = len(play_text)
    tok = data.tokenizer()
    assert isinstance(tok, CharTokenizer) and tok.vocab_size == len(set(play_text))
    train, val = np.asarray(data.split("train").arrays[0]), np.asarray(data.split("val").arrays[0])
    cut = int(n * 0.9)  # nanoGPT: train_data = data[:int(n*0.9)]
    assert tok.decode(train.tolist()) == play_text[:cut]
    assert tok.decode(val.tolist()) == play_text[cut:]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and train.dtype == np.uint16
    assert meta["documents"] == 1 and meta["tokens"] == n
    assert meta["splits"]["train"]["tokens"] == cut and meta["splits"]["val"]["tokens"] == n - cut
    assert meta["tokenizer"]["vocab_size"] == tok.vocab_size
    assert load_tokenizer(tmp_path / "out").encode("Macbeth") == tok.encode("Macbeth")


def test_folders_jsonl_field_and_eos_between_documents(tmp_path, bpe_dir):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("First document, plain text.", encoding="utf-8")
    (corpus / "b.md").write_text("# Second\n\nA *markdown* document.", encoding="utf-8")
    (corpus / "sub" / "c.jsonl").write_text(
        json.dumps({"content": "Third, from JSON lines.", "id": 1}) + "\n\n"
        + json.dumps({"content": "", "id": 2}) + "\n"  # empty: not a document
        + json.dumps({"content": "Fourth and last.", "id": 3}) + "\n",
        encoding="utf-8",
    )
    (corpus / "notes.csv").write_text("ignored,file\n", encoding="utf-8")
    data = prepare(corpus, tmp_path / "out", str(bpe_dir), field="content", val_fraction=0.2, progress=False)
    tok = data.tokenizer()
    eos = tok.token_to_id("<|endoftext|>")
    stream = np.concatenate([np.asarray(data.split(s).arrays[0]) for s in ("train", "val")]).tolist()
    docs = ["First document, plain text.", "# Second\n\nA *markdown* document.", "Third, from JSON lines.", "Fourth and last."]
    expected = []
    for i, doc in enumerate(docs):
        expected += ([eos] if i else []) + tok.encode(doc, add_special_tokens=False)
    assert stream == expected
    assert data.meta["documents"] == 4 and data.meta["document_separator"] == "eos"


def test_dtype_follows_the_vocabulary(tmp_path):
    assert token_dtype(65) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    alphabet = "".join(chr(0x4E00 + i) for i in range(20000)) + "".join(chr(0x20000 + i) for i in range(50000))
    text = alphabet[::-1] + alphabet  # 70,000 distinct characters: ids need 32 bits
    src = tmp_path / "wide.txt"
    src.write_text(text, encoding="utf-8")
    data = prepare(src, tmp_path / "out", "char", progress=False)
    assert data.vocab_size == 70000 and data.dtype == np.uint32
    ids = np.concatenate([np.asarray(data.split(s).arrays[0]) for s in ("train", "val")])
    assert data.tokenizer().decode(ids.tolist()) == text


def test_shards_read_back_as_one_stream(tmp_path, play_text):
    src = tmp_path / "play.txt"
    src.write_text(play_text[:20000], encoding="utf-8")
    one = prepare(src, tmp_path / "one", "char", progress=False)
    many = prepare(src, tmp_path / "many", "char", shard_tokens=1000, progress=False)
    assert len(many.meta["splits"]["train"]["shards"]) == 18
    a, b = one.split("train"), many.split("train")
    starts = np.array([0, 995, 1990, 5000, len(a) - 50])  # several windows cross shard boundaries
    assert (a.windows(starts, 50) == b.windows(starts, 50)).all()
    assert b.windows(np.array([995]), 10)[0].tolist() == np.asarray(a.arrays[0][995:1005]).tolist()


def test_preparing_again_replaces_the_old_shards(tmp_path, play_text):
    src = tmp_path / "play.txt"
    src.write_text(play_text[:20000], encoding="utf-8")
    prepare(src, tmp_path / "out", "char", shard_tokens=1000, progress=False)
    prepare(src, tmp_path / "out", "char", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.bin")) == ["train-00000.bin", "val-00000.bin"]
    assert not list((tmp_path / "out").glob(".prepare-*"))


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        prepare(tmp_path / "empty.txt", tmp_path / "out", "char", progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_invalid_utf8_names_the_file_and_byte_offset(tmp_path, bpe_dir):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf".encode() + b"\xe9 au lait")
    with pytest.raises(DataError, match=r"latin1\.txt is not valid UTF-8 at byte offset 3"):
        prepare(bad, tmp_path / "out", "char", progress=False)
    lines = tmp_path / "bad.jsonl"
    first = json.dumps({"text": "ok"}).encode() + b"\n"
    lines.write_bytes(first + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"bad\.jsonl is not valid UTF-8 at byte offset {len(first) + 13}"):
        prepare(lines, tmp_path / "out", str(bpe_dir), progress=False)


def test_jsonl_without_the_field_and_missing_paths(tmp_path, bpe_dir):
    f = tmp_path / "records.jsonl"
    f.write_text(json.dumps({"body": "text"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1 has no field 'text' \(it has: body\).*--field"):
        prepare(f, tmp_path / "out", str(bpe_dir), progress=False)
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path / "nope.txt", tmp_path / "out", "char", progress=False)
    with pytest.raises(DataError, match="not a corpus file"):
        (tmp_path / "x.csv").write_text("a,b")
        prepare(tmp_path / "x.csv", tmp_path / "out", "char", progress=False)


def test_cli_data_prepare(tmp_path, play_text, capsys):
    src = tmp_path / "play.txt"
    src.write_text(play_text[:5000], encoding="utf-8")
    assert main(["data", "prepare", str(src), "-o", str(tmp_path / "out"), "--tokenizer", "char", "--val-fraction", "0.2"]) == 0
    data = TokenData(tmp_path / "out")
    assert data.meta["splits"]["val"]["tokens"] == 5000 - int(5000 * 0.8)
    capsys.readouterr()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\xff")
    assert main(["data", "prepare", str(bad), "-o", str(tmp_path / "o2"), "--tokenizer", "char"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.txt is not valid UTF-8 at byte offset 2" in err and "Traceback" not in err
