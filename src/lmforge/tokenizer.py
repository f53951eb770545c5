"""Tokenizers: one `Tokenizer` class over a Hugging Face `tokenizers.Tokenizer`.

Every source is converted into that one backend, so encoding, decoding and saving have a single
code path:

    load_tokenizer("path/to/hf_dir")        # tokenizer.json (+ tokenizer_config.json)
    load_tokenizer("model.gguf")            # vocabulary, merges and special tokens from GGUF metadata
    load_tokenizer("gpt2.tiktoken")         # tiktoken ranks with GPT-2's split pattern
    CharTokenizer.from_text(text)           # one id per character (nanoGPT's shakespeare_char)
    train_bpe(["corpus.txt"], 8192)         # byte-level BPE trained with `tokenizers`

`Tokenizer.save(dir)` writes tokenizer.json + tokenizer_config.json, which `transformers`'
AutoTokenizer loads with the same ids, and which `load_tokenizer(dir)` reads back.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import gguf
import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from lmforge.errors import UserError

SPECIAL_ROLES = ("bos", "eos", "pad", "mask", "unk", "cls", "sep")

# Control tokens that end a turn; generation stops on them as on eos (llama.cpp's end-of-generation list).
END_OF_TURN_TOKENS = frozenset(
    {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>", "<EOT>"}
)

# Pre-tokenizers of byte-level BPE GGUF files, by `tokenizer.ggml.pre`, as llama.cpp splits text for them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_PRE_TOKENIZERS = {  # None: GPT-2's own regex; "digits": each digit alone first, then GPT-2's regex
    **dict.fromkeys(("default", "gpt2", "mpt", "olmo"), None),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell"), "digits"),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _QWEN2_SPLIT),
}
_GGUF_TOKEN_TYPE_CONTROL, _GGUF_TOKEN_TYPE_USER_DEFINED = 3, 4
_GGUF_SPECIAL_KEYS = {
    "bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id",
    "mask": "mask_token_id",
}  # fmt: skip


class TokenizerError(UserError, ValueError):
    """A tokenizer file or an input that cannot be used; the message names it and says why."""


class Tokenizer:
    """Text <-> token ids, plus the special tokens and chat template of one model.

    Build one with `load_tokenizer`, `CharTokenizer.from_text` or `train_bpe`. The constructor takes a
    ready backend (whose post-processor decides what `add_special_tokens` adds, e.g. BOS or
    [CLS]...[SEP]) and the special tokens by role, e.g. {"bos": "<s>", "eos": "</s>"}.
    """

    def __init__(self, backend: Backend, special_tokens: dict[str, str | None] | None = None,
                 chat_template: str | None = None):  # fmt: skip
        self._backend = backend
        backend.no_padding()  # tokenizer.json may ask for both (e.g. BERT's); ids must never change silently
        backend.no_truncation()
        self._special = {role: token for role, token in (special_tokens or {}).items() if token is not None}
        for role, token in self._special.items():
            if role not in SPECIAL_ROLES:
                raise TokenizerError(f"Unknown special token role {role!r}; use one of {', '.join(SPECIAL_ROLES)}.")
            if backend.token_to_id(token) is None:
                raise TokenizerError(f"The {role} token {token!r} is not in the vocabulary.")
        # Named special tokens always match whole in text and are dropped by skip_special_tokens,
        # as in transformers, even where tokenizer.json lists them only in the vocabulary.
        added = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in self._special.values() if t not in added]
        )
        self.chat_template = chat_template
        ends = {t.content for t in backend.get_added_tokens_decoder().values() if t.special} & END_OF_TURN_TOKENS
        self._eos_ids = {backend.token_to_id(t) for t in ends} | ({self.eos_id} if "eos" in self._special else set())

    def __repr__(self) -> str:
        special = ", ".join(f"{role}={token!r}" for role, token in self._special.items())
        return f"{type(self).__name__}(vocab_size={self.vocab_size}{', ' + special if special else ''})"

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template (from the model's files), or None; settable."""
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self._chat_template, self._compiled_template = template, None

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding size a model needs)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def _special_id(self, role: str) -> int | None:
        token = self._special.get(role)
        return None if token is None else self._backend.token_to_id(token)

    bos_id = property(lambda self: self._special_id("bos"), doc="Id of the beginning-of-sequence token, or None.")
    eos_id = property(lambda self: self._special_id("eos"), doc="Id of the end-of-sequence token, or None.")
    pad_id = property(lambda self: self._special_id("pad"), doc="Id of the padding token, or None.")
    mask_id = property(lambda self: self._special_id("mask"), doc="Id of the mask token (BERT-style), or None.")
    unk_id = property(lambda self: self._special_id("unk"), doc="Id of the unknown token, or None.")
    cls_id = property(lambda self: self._special_id("cls"), doc="Id of BERT's [CLS] token, or None.")
    sep_id = property(lambda self: self._special_id("sep"), doc="Id of BERT's [SEP] token, or None.")

    @property
    def eos_ids(self) -> set[int]:
        """Every id that ends generation: eos and end-of-turn control tokens such as <|im_end|>."""
        return set(self._eos_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. <|im_start|>) stay whole.

        `add_special_tokens` adds what the model wraps every text in (BOS, [CLS]...[SEP]), if anything.
        """
        # A batch of one: unlike `encode`, the batch methods let go of the GIL while they work, so a
        # long text tokenized in a thread (the server's) does not stall the others; `encode_batch_fast`
        # (tokenizers >= 0.20) also skips the character offsets, which cost more to free than to compute.
        batch = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        return batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, or anything with `.tolist()` such as a tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise TokenizerError(f"Token id {bad} is outside the vocabulary (0..{self.vocab_size - 1}).")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` (byte-level tokens are spelled in GPT-2's byte alphabet)."""
        token = self._backend.id_to_token(token_id)
        if token is None:
            raise TokenizerError(f"Token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1}).")
        return token

    def token_to_id(self, token: str) -> int | None:
        """The id of vocabulary entry `token`, or None if there is no such entry."""
        return self._backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's Jinja chat template.

        Same text as transformers' `apply_chat_template(..., tokenize=False)`; `variables` (e.g. tools)
        are passed to the template, next to the special tokens as `bos_token`, `eos_token`, ...
        """
        if self.chat_template is None:
            raise TokenizerError("This tokenizer has no chat template; load a chat model's or set .chat_template.")
        if self._compiled_template is None:
            try:
                self._compiled_template = _chat_environment().from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as exc:
                raise TokenizerError(f"The chat template is not valid Jinja: {exc} (line {exc.lineno}).") from None
        context = {"tools": None, "documents": None, **{f"{r}_token": t for r, t in self._special.items()}}
        try:
            return self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **context | variables
            )
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"The chat template rejected these messages: {exc}") from None

    def to_json(self) -> str:
        """The backend as tokenizer.json text (what grammar engines and other runtimes read)."""
        return self._backend.to_str()

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (special tokens, chat template) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        config |= {f"{role}_token": token for role, token in self._special.items()}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        _write_atomically(directory / "tokenizer.json", self._backend.to_str(pretty=True))
        _write_atomically(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))


class CharTokenizer(Tokenizer):
    """Character level: one id per distinct character, in sorted order (nanoGPT's shakespeare_char).

    Stored as a BPE with no merges and no pre-tokenizer, so tokenizer.json stays the one file format;
    `load_tokenizer` recognises such a file and returns a CharTokenizer again.
    """

    def __init__(self, backend: Backend, special_tokens: dict[str, str | None] | None = None,
                 chat_template: str | None = None):  # fmt: skip
        super().__init__(backend, special_tokens, chat_template)
        self._alphabet = frozenset(backend.get_vocab(with_added_tokens=False))

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The tokenizer whose vocabulary is the sorted distinct characters of `text`."""
        chars = sorted(set(text))
        if not chars:
            raise TokenizerError("Cannot build a character vocabulary from empty text.")
        backend = Backend(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
        backend.decoder = decoders.Fuse()
        return cls(backend)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of the characters of `text`; a character outside the vocabulary is an error, not dropped."""
        unknown = set(text) - self._alphabet
        if unknown:
            names = ", ".join(repr(c) for c in sorted(unknown)[:5])
            raise TokenizerError(
                f"Character(s) {names} are not in this {len(self._alphabet)}-character vocabulary; "
                "build the tokenizer from text that contains them."
            )
        return super().encode(text, add_special_tokens)


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Load a tokenizer from a Hugging Face directory, a .gguf file or a .tiktoken ranks file
    (default: the bundled SmolLM2-135M-Instruct's, as `load_model()`)."""
    if path is None:
        from lmforge.checkpoints import default_model_path

        path = default_model_path()
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"{path} does not exist.")
    if path.is_dir():
        return _from_hf_directory(path)
    if path.suffix == ".gguf":
        return _from_gguf(path)
    if path.suffix == ".tiktoken":
        return _from_tiktoken(path)
    raise TokenizerError(f"{path} is not a tokenizer: expected a folder with tokenizer.json, a .gguf or .tiktoken.")


def train_bpe(files: list[str], vocab_size: int, special_tokens: Iterable[str] = ("<|endoftext|>",),
              min_frequency: int = 2) -> Tokenizer:  # fmt: skip
    """Train a byte-level BPE (GPT-2 style) on text `files`, with a progress bar.

    The first special token serves as bos and eos. The result has exactly `vocab_size` ids, or this
    raises: a corpus too small for that many merges at `min_frequency` says so.
    """
    special_tokens = list(special_tokens)
    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        raise TokenizerError(f"train_bpe needs text files; missing: {', '.join(missing) or '(none given)'}.")
    smallest = len(pre_tokenizers.ByteLevel.alphabet()) + len(special_tokens)
    if vocab_size < smallest:
        raise TokenizerError(f"vocab_size={vocab_size} is below the {smallest} byte and special tokens; raise it.")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens, show_progress=True,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    backend.train([str(f) for f in files], trainer)
    if backend.get_vocab_size() != vocab_size:
        raise TokenizerError(
            f"The corpus only supports {backend.get_vocab_size()} tokens at min_frequency={min_frequency}, "
            f"not {vocab_size}; add text, lower vocab_size or lower min_frequency."
        )
    eos = special_tokens[0] if special_tokens else None
    return Tokenizer(backend, {"bos": eos, "eos": eos})


def _from_hf_directory(directory: Path) -> Tokenizer:
    """tokenizer.json as is, with special tokens and the chat template from the files next to it.

    As in transformers 5, tokenizer.json's post-processor alone decides what `add_special_tokens`
    adds; add_bos_token/add_eos_token in tokenizer_config.json are ignored when tokenizer.json exists.
    """
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise TokenizerError(
            f"{directory} has no tokenizer.json; save the tokenizer with transformers' save_pretrained to make one."
        )
    try:
        text = file.read_text(encoding="utf-8")
        spec, backend = json.loads(text), Backend.from_str(text)
    except Exception as exc:  # json and tokenizers raise several types for a broken file
        raise TokenizerError(f"{file} is not a valid tokenizer.json ({exc}).") from None
    config = _read_json(directory / "special_tokens_map.json") | _read_json(directory / "tokenizer_config.json")
    special = {role: _token_text(config.get(f"{role}_token")) for role in SPECIAL_ROLES}
    template_file = directory / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
    model = spec.get("model", {})
    char_level = (
        model.get("type") == "BPE" and not model.get("merges") and spec.get("pre_tokenizer") is None
        and spec.get("normalizer") is None and all(len(token) == 1 for token in model.get("vocab", {}))
    )  # fmt: skip
    return (CharTokenizer if char_level else Tokenizer)(backend, special, template)


def _from_gguf(path: Path) -> Tokenizer:
    """Byte-level BPE ('gpt2' in llama.cpp's terms) from GGUF metadata, split as llama.cpp splits it.

    That is transformers' conversion too, except for pre-tokenizers it has no entry for: for "smollm"
    it uses GPT-2's regex alone, while llama.cpp and SmolLM2's own tokenizer.json isolate digits first.
    """
    try:
        fields = gguf.GGUFReader(path).fields
        meta = {key: field.contents() for key, field in fields.items() if key.startswith("tokenizer.")}
    except Exception as exc:  # gguf-py fails deep inside numpy with assorted types on a damaged file
        raise TokenizerError(f"{path} is not a readable GGUF file; it is truncated or corrupt ({exc}).") from None
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind is None:
        raise TokenizerError(f"{path} has no tokenizer in its metadata (no tokenizer.ggml.model key).")
    if kind != "gpt2":
        raise TokenizerError(f"{path} has a {kind!r} tokenizer; lmforge reads byte-level BPE ('gpt2') ones only.")
    if pre not in _GGUF_PRE_TOKENIZERS:
        known = ", ".join(sorted(_GGUF_PRE_TOKENIZERS))
        raise TokenizerError(f"{path} asks for pre-tokenizer {pre!r}, which lmforge does not know ({known}).")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ")) for merge in meta.get("tokenizer.ggml.merges", [])]
    split = _GGUF_PRE_TOKENIZERS[pre]
    # Llama 3 looks a whole word up in the vocabulary before merging (llama.cpp and its tokenizer.json agree).
    backend = Backend(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=split == _LLAMA3_SPLIT))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(split)
    backend.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    # Control tokens (<|im_start|>) are special; user-defined ones (<think>) match whole but are plain text.
    for token_type, special in ((_GGUF_TOKEN_TYPE_CONTROL, True), (_GGUF_TOKEN_TYPE_USER_DEFINED, False)):
        backend.add_tokens(
            [AddedToken(t, special=special, normalized=False) for t, k in zip(tokens, types) if k == token_type]
        )
    special = {}
    for role, key in _GGUF_SPECIAL_KEYS.items():
        index = meta.get(f"tokenizer.ggml.{key}")
        if index is not None and not 0 <= index < len(tokens):
            raise TokenizerError(f"{path} names token {index} as {role}, but the vocabulary has {len(tokens)} tokens.")
        special[role] = None if index is None else tokens[index]
    bos = special["bos"] if meta.get("tokenizer.ggml.add_bos_token", False) else None
    eos = special["eos"] if meta.get("tokenizer.ggml.add_eos_token", False) else None
    backend.post_processor = _wrap_processor(backend, bos, eos)
    return Tokenizer(backend, special, meta.get("tokenizer.chat_template"))


def _from_tiktoken(path: Path) -> Tokenizer:
    """A tiktoken ranks file ("<base64 bytes> <rank>" per line) with GPT-2's split pattern, as a byte-level BPE.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; the equivalent BPE merge
    list has every split of every token into two vocabulary tokens, ordered by the rank of the whole.
    `<|endoftext|>` follows the last rank (50256 for GPT-2), as in tiktoken's gpt2/r50k encodings.
    """
    byte_chars, ranks = _bytes_to_unicode(), {}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            token, rank = line.split()
            ranks["".join(byte_chars[b] for b in base64.b64decode(token, validate=True))] = int(rank)
        except ValueError:
            raise TokenizerError(f"{path} line {number} is not '<base64 token> <rank>'.") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path} does not number its {len(ranks)} tokens 0..{len(ranks) - 1} exactly once.")
    if len(ranks) > 60_000:  # cl100k/o200k-sized files split text with other patterns
        raise TokenizerError(f"{path} has {len(ranks)} ranks; only GPT-2-pattern files (gpt2, r50k) are supported.")
    merges = sorted(
        (rank, ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
        for token, rank in ranks.items()
        for i in range(1, len(token))
        if token[:i] in ranks and token[i:] in ranks
    )
    backend = Backend(models.BPE(ranks, [(left, right) for *_, left, right in merges]))
    backend.pre_tokenizer = _byte_level_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return Tokenizer(backend, {"bos": "<|endoftext|>", "eos": "<|endoftext|>"})


def _byte_level_pre_tokenizer(split: str | None = None) -> pre_tokenizers.PreTokenizer:
    """GPT-2 style byte-level pre-tokenizer; `split` as in `_GGUF_PRE_TOKENIZERS` (None: GPT-2's regex)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in (None, "digits"))
    if split is None:
        return byte_level
    if split == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])


def _wrap_processor(backend: Backend, bos: str | None, eos: str | None) -> processors.TemplateProcessing | None:
    """Post-processor putting `bos` before and `eos` after each text (None if neither), as transformers does."""
    if bos is None and eos is None:
        return None
    single = " ".join([f"{bos}:0"] * (bos is not None) + ["$A:0"] + [f"{eos}:0"] * (eos is not None))
    pair = f"{single} " + " ".join([f"{bos}:1"] * (bos is not None) + ["$B:1"] + [f"{eos}:1"] * (eos is not None))
    return processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, backend.token_to_id(t)) for t in {bos, eos} - {None}]
    )


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendered as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_template_error(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' tojson filter: Jinja's own escapes HTML characters, this one does not."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _chat_environment() -> ImmutableSandboxedEnvironment:
    """A sandboxed Jinja environment configured like transformers' one for chat templates."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: each byte as a printable character (printable bytes as themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(shifted)}


def _token_text(value) -> str | None:
    """A special token from a config file: a string, or an AddedToken dict {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{file} is not valid JSON ({exc}).") from None


def _write_atomically(file: Path, text: str) -> None:
    """Write `text` to a temporary file next to `file`, then rename it, so no half-written file remains."""
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=file.parent, suffix=".tmp", delete=False) as tmp:
        tmp.write(text)
    os.replace(tmp.name, file)
