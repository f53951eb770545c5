"""Corpora -> token shards.

``prepare(inputs, out_dir, tokenizer)`` reads .txt, .md and .jsonl files (or folders of them),
tokenizes every document, puts EOS between documents, splits the token stream into train and
validation parts by position (nanoGPT: the first 90% train, the last 10% val) and writes:

    out_dir/train-00000.bin ...   flat arrays of token ids (uint16 when the vocabulary fits, else
    out_dir/val-00000.bin   ...   uint32), read back with ``np.memmap``
    out_dir/tokenizer.json        the tokenizer (plus tokenizer_config.json)
    out_dir/meta.json             tokenizer, dtype, document and token counts, shards; written last

Everything is written to a temporary folder first and moved in place, ``meta.json`` last, so a
directory with a ``meta.json`` is always complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import UserError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
FORMAT = "lmforge-tokens"
DEFAULT_SHARD_TOKENS = 100_000_000
_CHUNK_CHARS = 1 << 20  # long texts are encoded in pieces of about this size (progress, memory)

# Special tokens lmforge gives a BPE tokenizer it trains, so every objective finds what it needs:
# the first is BOS and EOS, then padding, the BERT mask and the T5 sentinels.
EOS_TOKEN, PAD_TOKEN, MASK_TOKEN = "<|endoftext|>", "<pad>", "<mask>"
N_SENTINELS = 100
SENTINEL_TOKENS = tuple(f"<extra_id_{i}>" for i in range(N_SENTINELS))
PRETRAIN_SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, MASK_TOKEN, *SENTINEL_TOKENS)


class DataError(UserError, ValueError):
    """A corpus or prepared dataset that cannot be used; the message names the file and the fix."""


# --- reading corpora -------------------------------------------------------------------------------
def collect_files(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The .txt/.md/.jsonl files named by ``inputs``: files as given, folders searched recursively (sorted)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not found:
                raise DataError(f"{path} holds no {', '.join(SUFFIXES)} files; point --data at text files or a folder of them.")
            files += found
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise DataError(f"{path} is not a corpus file: lmforge reads {', '.join(SUFFIXES)} files.")
            files.append(path)
        else:
            raise DataError(f"{path} does not exist.")
    if not files:
        raise DataError("no input files were given; pass .txt, .md or .jsonl files or folders.")
    return files


def _decode(raw: bytes, path: Path, base_offset: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not valid UTF-8 at byte offset {base_offset + e.start}; "
            "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from None


def iter_documents(files: Sequence[Path], field: str = "text") -> Iterator[tuple[Path, str, int]]:
    """(file, document text, bytes read) for every non-empty document: a whole .txt/.md file, or one
    ``field`` of each line of a .jsonl file."""
    for path in files:
        if path.suffix.lower() in JSONL_SUFFIXES:
            offset = 0
            with open(path, "rb") as f:
                for number, raw in enumerate(f, start=1):
                    line = _decode(raw, path, offset).strip()
                    offset += len(raw)
                    if not line:
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path} line {number} is not valid JSON ({e.msg}).") from None
                    if not isinstance(record, dict) or field not in record:
                        keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
                        raise DataError(
                            f"{path} line {number} has no field {field!r} (it has: {keys}); choose the text field with --field."
                        )
                    text = record[field]
                    if not isinstance(text, str):
                        raise DataError(f"{path} line {number}: field {field!r} is {type(text).__name__}, not text.")
                    if text:
                        yield path, text, len(raw)
        else:
            raw = path.read_bytes()
            text = _decode(raw, path)
            if text:
                yield path, text, len(raw)


def _pieces(text: str) -> Iterator[str]:
    """Cut a long text after a newline that is followed by a non-space character: such a cut leaves
    character-level and byte-level BPE (GPT-2 regex) tokenization unchanged."""
    start = 0
    while len(text) - start > _CHUNK_CHARS:
        cut = text.find("\n", start + _CHUNK_CHARS)
        while cut != -1 and cut + 1 < len(text) and text[cut + 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut == -1 or cut + 1 >= len(text):
            break
        yield text[start : cut + 1]
        start = cut + 1
    yield text[start:]


# --- tokenizers ------------------------------------------------------------------------------------
def _tokenizer_error():
    from lmforge.tokenizer import TokenizerError

    return TokenizerError


def resolve_tokenizer(spec, files: Sequence[Path] = (), field: str = "text"):
    """A tokenizer from a spec: a Tokenizer object as is; ``"char"`` (one id per character of the
    corpus); ``"bpe:N"`` (byte-level BPE of N ids trained on the corpus, with lmforge's special
    tokens); or a path that ``load_tokenizer`` reads (a folder with tokenizer.json, .gguf, .tiktoken)."""
    from lmforge.tokenizer import CharTokenizer, Tokenizer, load_tokenizer, train_bpe

    if isinstance(spec, Tokenizer):
        return spec
    if not isinstance(spec, str) or not spec:
        raise DataError("a raw corpus needs a tokenizer: set tokenizer to char, bpe:N (e.g. bpe:4096) or a tokenizer path.")
    try:
        if spec == "char":
            chars: set[str] = set()
            for _, text, _ in iter_documents(files, field):
                chars.update(text)
            if not chars:
                raise DataError(f"the corpus ({', '.join(map(str, files))}) is empty: it holds no text to train on.")
            return CharTokenizer.from_text("".join(sorted(chars)))
        if spec.startswith("bpe:"):
            try:
                vocab_size = int(spec[4:])
            except ValueError:
                raise DataError(f"tokenizer {spec!r} is not bpe:N with a whole number N, e.g. bpe:4096.") from None
            with tempfile.TemporaryDirectory() as tmp:
                texts = []  # train on the document texts, not on JSON syntax
                for _, text, _ in iter_documents(files, field):
                    texts.append(text)
                if not texts:
                    raise DataError(f"the corpus ({', '.join(map(str, files))}) is empty: it holds no text to train on.")
                corpus = Path(tmp) / "corpus.txt"
                corpus.write_text("\n\n".join(texts), encoding="utf-8")
                return train_bpe([str(corpus)], vocab_size, special_tokens=PRETRAIN_SPECIAL_TOKENS)
        return load_tokenizer(spec)
    except _tokenizer_error() as e:
        raise DataError(str(e)) from None


@dataclass(frozen=True)
class SpecialIds:
    """The special token ids of a tokenizer that the objectives use (None where it has none)."""

    eos: int | None
    pad: int | None
    mask: int | None
    bos: int | None
    sentinels: tuple[int, ...]
    all: tuple[int, ...]  # every special id above: never masked, never a random replacement


def special_ids(tokenizer) -> SpecialIds:
    """Special ids by role, falling back to lmforge's conventional token strings (<pad>, <mask>,
    <extra_id_N>) for tokenizers that hold them without naming their role."""
    def find(role_id, *names):
        if role_id is not None:
            return role_id
        for name in names:
            i = tokenizer.token_to_id(name)
            if i is not None:
                return i
        return None

    eos = find(tokenizer.eos_id, EOS_TOKEN, "</s>", "[SEP]")
    bos = find(tokenizer.bos_id)
    pad = find(tokenizer.pad_id, PAD_TOKEN, "[PAD]")
    mask = find(tokenizer.mask_id, MASK_TOKEN, "[MASK]")
    sentinels = []
    for name in SENTINEL_TOKENS:
        i = tokenizer.token_to_id(name)
        if i is None:
            break
        sentinels.append(i)
    extra = [tokenizer.token_to_id(t) for t in ("[CLS]", "[UNK]", "<unk>", "<s>")]
    every = {i for i in (eos, bos, pad, mask, *sentinels, *extra) if i is not None}
    return SpecialIds(eos=eos, pad=pad, mask=mask, bos=bos, sentinels=tuple(sentinels), all=tuple(sorted(every)))


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# --- prepare -----------------------------------------------------------------------------------------
def prepare(
    inputs,
    out_dir: str | os.PathLike,
    tokenizer="char",
    *,
    val_fraction: float = 0.1,
    field: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
    source_info: dict | None = None,
):
    """Tokenize ``inputs`` into ``out_dir`` (see the module docstring); returns the ``TokenData``.

    ``tokenizer`` is anything ``resolve_tokenizer`` accepts. ``source_info`` is stored in meta.json
    (the trainer records there which corpus and tokenizer spec a cached preparation came from).
    """
    from tqdm.auto import tqdm

    from lmforge.data.tokens import TokenData

    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must lie strictly between 0 and 1.")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens} must be at least 1.")
    files = collect_files(inputs)
    tok = resolve_tokenizer(tokenizer, files, field)
    specials = special_ids(tok)
    dtype = token_dtype(tok.vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total_bytes = sum(p.stat().st_size for p in files)
    sep_ids: list[int] = [specials.eos] if specials.eos is not None else []
    sep_text = "" if sep_ids else "\n\n"  # no EOS in the vocabulary (e.g. characters): a blank line
    TokError = _tokenizer_error()

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".prepare-") as tmp:
        tmp = Path(tmp)
        stream_path = tmp / "all.bin"
        n_tokens, n_docs, per_file = 0, 0, {}
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
        with open(stream_path, "wb") as stream:
            for path, text, n_bytes in iter_documents(files, field):
                if n_docs:
                    ids = sep_ids if sep_ids else None
                    if ids is None:
                        ids = tok.encode(sep_text, add_special_tokens=False)
                    np.asarray(ids, dtype=dtype).tofile(stream)
                    n_tokens += len(ids)
                for piece in _pieces(text):
                    try:
                        ids = tok.encode(piece, add_special_tokens=False)
                    except TokError as e:
                        raise DataError(f"{path}: {e}") from None
                    np.asarray(ids, dtype=dtype).tofile(stream)
                    n_tokens += len(ids)
                n_docs += 1
                per_file[str(path)] = per_file.get(str(path), 0) + 1
                bar.update(n_bytes)
        bar.close()
        if n_tokens == 0:
            raise DataError(f"the corpus ({', '.join(map(str, files))}) is empty: it holds no text to train on.")
        if n_tokens < 2:
            raise DataError(f"the corpus has only {n_tokens} token; it needs at least two for a train/val split.")

        all_tokens = np.memmap(stream_path, dtype=dtype, mode="r", shape=(n_tokens,))
        n_train = min(max(1, int(n_tokens * (1 - val_fraction))), n_tokens - 1)  # nanoGPT: data[:int(n*0.9)]
        splits = {}
        for split, lo, hi in (("train", 0, n_train), ("val", n_train, n_tokens)):
            shards = []
            for k, start in enumerate(range(lo, hi, shard_tokens)):
                name = f"{split}-{k:05d}.bin"
                stop = min(start + shard_tokens, hi)
                np.asarray(all_tokens[start:stop]).tofile(tmp / name)
                shards.append({"file": name, "tokens": stop - start})
            splits[split] = {"tokens": hi - lo, "shards": shards}
        del all_tokens
        tok.save(tmp)

        meta = {
            "format": FORMAT,
            "version": 1,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "tokenizer": {
                "class": type(tok).__name__,
                "spec": tokenizer if isinstance(tokenizer, str) else None,
                "vocab_size": tok.vocab_size,
                "eos_id": specials.eos, "bos_id": specials.bos, "pad_id": specials.pad, "mask_id": specials.mask,
                "sentinels": len(specials.sentinels),
            },
            "document_separator": "eos" if sep_ids else repr(sep_text),
            "documents": n_docs,
            "tokens": n_tokens,
            "val_fraction": val_fraction,
            "field": field,
            "sources": [{"path": p, "documents": n} for p, n in per_file.items()],
            "splits": splits,
            "source_info": source_info or {},
        }
        # Move in: stale shards of an earlier preparation go first, meta.json comes last.
        old = out_dir / "meta.json"
        if old.exists():
            old.unlink()
        for stale in [*out_dir.glob("train-*.bin"), *out_dir.glob("val-*.bin")]:
            stale.unlink()
        for item in tmp.iterdir():
            if item.name != stream_path.name:
                os.replace(item, out_dir / item.name)
        meta_tmp = out_dir / ".meta.json.tmp"
        meta_tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        os.replace(meta_tmp, out_dir / "meta.json")
    if progress:
        print(
            f"prepared {n_docs} document(s), {n_tokens:,} tokens ({splits['train']['tokens']:,} train, "
            f"{splits['val']['tokens']:,} val), vocabulary {tok.vocab_size}, {dtype.name} -> {out_dir}"
        )
    return TokenData(out_dir)

