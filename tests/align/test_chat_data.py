"""Chat JSONL -> tokens with an exact assistant mask; bad lines are refused naming file and line."""

import json

import pytest

from lmforge.align.chat_data import ChatDataError, read_conversations, tokenize_conversation
from lmforge.align.sft import SFTBatches, pack
from sft_helpers import tiny_chat_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_chat_tokenizer(tmp_path_factory.mktemp("tok"))


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+3"}, {"role": "assistant", "content": "5"},
        {"role": "user", "content": "what is 1 plus 1?"}, {"role": "assistant", "content": "it is 2."}]  # fmt: skip


def test_mask_covers_exactly_the_assistant_replies(tok):
    e = tokenize_conversation(tok, CHAT)
    full = tok.apply_chat_template(CHAT, add_generation_prompt=False)
    assert e.ids == tok.encode(full, add_special_tokens=False)  # same tokens as the whole text
    assert tok.decode([i for i, m in zip(e.ids, e.mask) if m]) == "5<|im_end|>\nit is 2.<|im_end|>\n"
    assert "2+3" in tok.decode([i for i, m in zip(e.ids, e.mask) if not m])


def test_labels_are_shifted_assistant_tokens(tok):
    e = tokenize_conversation(tok, CHAT)
    batch = SFTBatches([e], 1, seed=0, pad_id=0).batch(0)
    x, y = batch["input_ids"][0], batch["labels"][0]
    assert x.tolist() == e.ids[:-1]
    assert tok.decode(y[y != -100].tolist()) == "5<|im_end|>\nit is 2.<|im_end|>\n"


def test_prompt_response_pairs_and_folders(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "2+3", "response": "5"}, {"prompt": "1+1", "completion": "2", "system": "sum"}])
    write_jsonl(tmp_path / "b.jsonl", [{"messages": CHAT}])
    convs = read_conversations(tmp_path)
    assert [c.messages[-1]["content"] for c in convs] == ["5", "2", "it is 2."]
    assert convs[1].messages[0] == {"role": "system", "content": "sum"} and convs[0].where.endswith("a.jsonl:1")


def test_packing_fills_rows(tok):
    examples = [tokenize_conversation(tok, CHAT) for _ in range(5)]
    rows = pack(examples, 17)
    total = sum(len(e.ids) for e in examples)
    assert all(len(r.ids) == 17 for r in rows[:-1]) and sum(len(r.ids) for r in rows) == total
    assert sum(sum(r.mask) for r in rows) == sum(sum(e.mask) for e in examples)


@pytest.mark.parametrize(
    "line, message",
    [
        ({"text": "hi"}, r"bad\.jsonl:2: the line has no 'messages' \(keys: text\)"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},
         r"bad\.jsonl:2: message 1 has the unknown role 'bot'; use one of system, user, assistant, tool\."),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"bad\.jsonl:2: the conversation has no assistant turn"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, r"bad\.jsonl:2: message 0 \(user\) must have a string"),
    ],
)  # fmt: skip
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps(line) + "\n", encoding="utf-8")
    with pytest.raises(ChatDataError, match=message):
        read_conversations(path)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n\n{oops\n", encoding="utf-8")
    with pytest.raises(ChatDataError, match=r"bad\.jsonl:3: not valid JSON"):
        read_conversations(path)


@pytest.mark.slow
def test_smollm2_template_mask_is_exact():
    """The bundled SmolLM2 tokenizer (its template adds a default system turn)."""
    from lmforge import load_tokenizer

    tok = load_tokenizer()
    chat = CHAT[1:]
    e = tokenize_conversation(tok, chat)
    assert e.ids == tok.encode(tok.apply_chat_template(chat, add_generation_prompt=False), add_special_tokens=False)
    assert tok.decode([i for i, m in zip(e.ids, e.mask) if m]) == "5<|im_end|>\nit is 2.<|im_end|>\n"
