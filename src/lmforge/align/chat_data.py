"""Chat data for supervised fine-tuning: JSONL conversations -> token ids with an assistant mask.

Each line of a ``.jsonl`` file is one example, either a conversation

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

or a prompt/response pair (``completion`` is accepted for ``response``, ``system`` is optional)

    {"prompt": "...", "response": "..."}

Conversations are rendered with the checkpoint's chat template, and the loss falls on the
assistant turns only: for assistant message i the template's text for messages[:i] plus the
generation prompt is a prefix of its text for messages[:i+1], and what follows that prefix (the
reply and its end-of-turn marker) is the part the model learns to write.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


class ChatDataError(UserError, ValueError):
    """A chat dataset that cannot be used; the message names the file and line."""


@dataclass
class Conversation:
    messages: list[dict]
    where: str  # "file.jsonl:12", for error messages


@dataclass
class Example:
    ids: list[int]  # the rendered conversation's tokens
    mask: list[bool]  # True where the token belongs to an assistant turn (the loss is taken there)
    where: str


def _conversation(record, where: str) -> list[dict]:
    """The messages of one JSONL record, checked: known roles, string contents, an assistant turn."""
    if not isinstance(record, dict):
        raise ChatDataError(f"{where}: a line must be a JSON object with 'messages' (or 'prompt' and 'response').")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ChatDataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
    elif "prompt" in record and ("response" in record or "completion" in record):
        messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        messages += [{"role": "user", "content": record["prompt"]},
                     {"role": "assistant", "content": record.get("response", record.get("completion"))}]  # fmt: skip
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise ChatDataError(f"{where}: the line has no 'messages' (keys: {keys}); write {{\"messages\": [...]}} or {{\"prompt\": ..., \"response\": ...}}.")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatDataError(f"{where}: message {j} must be an object with 'role' and 'content'.")
        if m["role"] not in ROLES:
            raise ChatDataError(f"{where}: message {j} has the unknown role {m['role']!r}; use one of {', '.join(ROLES)}.")
        if not isinstance(m["content"], str):
            raise ChatDataError(f"{where}: message {j} ({m['role']}) must have a string 'content'.")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatDataError(f"{where}: the conversation has no assistant turn, so there is nothing to learn; add one or drop the line.")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path: str | os.PathLike) -> list[Conversation]:
    """Every conversation of a ``.jsonl`` file (or of every ``.jsonl`` file in a folder), checked."""
    path = Path(path)
    if not path.exists():
        raise ChatDataError(f"{path} does not exist; pass a .jsonl file of conversations (or a folder of them).")
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise ChatDataError(f"{path} holds no .jsonl files.")
    out = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{file}:{n}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ChatDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}).") from None
                out.append(Conversation(_conversation(record, where), where))
    if not out:
        raise ChatDataError(f"{path} holds no conversations.")
    return out


def require_chat_template(tokenizer, data: str | os.PathLike, model: str | os.PathLike | None) -> None:
    if tokenizer.chat_template is None:
        raise ChatDataError(
            f"{data} is chat data but the tokenizer of {model or 'the default model'} has no chat template; "
            "set chat_template: FILE.jinja in the recipe (or --chat_template=FILE)."
        )


def tokenize_conversation(tokenizer, messages: list[dict], where: str = "conversation") -> Example:
    """Token ids of the rendered conversation and the mask of its assistant tokens.

    The text is cut into pieces at the boundaries of the assistant replies; each piece is encoded
    on its own (no special tokens added: the template writes them), so the mask is exact."""
    render = tokenizer.apply_chat_template
    full = render(messages, add_generation_prompt=False)
    pieces: list[tuple[str, bool]] = []  # (text, is assistant)
    done = 0  # characters of `full` already in pieces
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True) if i else ""
        through = render(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before) and len(before) >= done):
            raise ChatDataError(
                f"{where}: the chat template does not render this conversation's assistant turn {i} as an extension of "
                "the turns before it, so its tokens cannot be located; start the conversation with a user or system turn."
            )
        pieces += [(full[done : len(before)], False), (through[len(before) :], True)]
        done = len(through)
    pieces.append((full[done:], False))
    ids, mask = [], []
    for text, learn in pieces:
        if text:
            t = tokenizer.encode(text, add_special_tokens=False)
            ids += t
            mask += [learn] * len(t)
    return Example(ids, mask, where)


def encode_conversations(tokenizer, conversations: list[Conversation]) -> list[Example]:
    return [tokenize_conversation(tokenizer, c.messages, c.where) for c in conversations]


def write_jsonl(path: str | os.PathLike, records) -> Path:
    """Write records as JSON lines to a temporary file and rename it: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
