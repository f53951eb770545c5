"""Preference data: JSONL pairs ``{"prompt": ..., "chosen": ..., "rejected": ...}`` and their tokens.

    {"prompt": "Say something kind.", "chosen": "You did well.", "rejected": "Go away."}
    {"prompt": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}], "chosen": ..., ...}

A prompt is text or chat messages. With a chat template (the tokenizer's), the prompt is rendered
with the generation prompt and each response is the text the template adds for an assistant turn
(its end-of-turn token included), so the model is trained on exactly what it generates. Without
one, the prompt is plain text and the response ends with the tokenizer's end-of-sequence token.

Every bad line is one ``UserError`` naming the file and line; nothing is read past it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


class DataError(UserError, ValueError):
    """A preference or prompt file that cannot be used; the message names the file and line."""


@dataclass
class PreferencePair:
    prompt: str | list[dict]
    chosen: str
    rejected: str
    where: str = ""  # "file:line", for messages about this pair


def _check_prompt(prompt, where: str) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: the prompt is empty; give it some text.")
        return
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: \"prompt\" must be text or a non-empty list of chat messages.")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise DataError(f"{where}: message {i} of the prompt needs a \"role\" and a text \"content\".")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role {m['role']!r}; use one of {', '.join(ROLES)}.")


def _read_jsonl(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass a .jsonl file with one JSON object per line.")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}); write one JSON object per line.") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}.")
            yield where, record


def read_pairs(path: str | os.PathLike) -> list[PreferencePair]:
    """All pairs of a JSONL file, checked: keys present, responses non-empty text, chosen != rejected."""
    pairs = []
    for where, r in _read_jsonl(path):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in r]
        if missing:
            raise DataError(f"{where}: missing key {', '.join(repr(k) for k in missing)}; each line needs prompt, chosen and rejected.")
        _check_prompt(r["prompt"], where)
        for key in ("chosen", "rejected"):
            if not isinstance(r[key], str) or not r[key].strip():
                raise DataError(f"{where}: {key!r} must be non-empty text.")
        if r["chosen"].strip() == r["rejected"].strip():
            raise DataError(f"{where}: chosen and rejected are the same text, which teaches nothing; drop the line or fix it.")
        pairs.append(PreferencePair(r["prompt"], r["chosen"], r["rejected"], where))
    if not pairs:
        raise DataError(f"{path} has no preference pairs.")
    return pairs


def read_prompts(path: str | os.PathLike) -> list[str | list[dict]]:
    """Prompts for RL: JSONL lines with a ``prompt`` (text or messages); other keys are kept aside
    by the caller (see ``read_prompt_records``)."""
    return [r["prompt"] for r in read_prompt_records(path)]


def read_prompt_records(path: str | os.PathLike) -> list[dict]:
    """JSONL lines with a ``prompt`` key; every other key (an answer to check, ...) passes through
    to the reward function."""
    out = []
    for where, r in _read_jsonl(path):
        if "prompt" not in r:
            raise DataError(f"{where}: missing key 'prompt'; each line needs a prompt (text or chat messages).")
        _check_prompt(r["prompt"], where)
        out.append({**r, "_where": where})
    if not out:
        raise DataError(f"{path} has no prompts.")
    return out


# --- tokens ----------------------------------------------------------------------------------------
def use_chat(tokenizer, prompt, chat: bool | None = None) -> bool:
    """Whether a prompt goes through the chat template: messages always, text when the tokenizer has
    a template (unless chat=False)."""
    if isinstance(prompt, list):
        if tokenizer.chat_template is None:
            raise DataError("chat messages need a tokenizer with a chat template; use a chat model or give text prompts.")
        return True
    return tokenizer.chat_template is not None if chat is None else chat


def _messages(prompt) -> list[dict]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def encode_prompt(tokenizer, prompt, chat: bool | None = None) -> list[int]:
    """Token ids of a prompt, ready for the model to continue with a response."""
    if use_chat(tokenizer, prompt, chat):
        text = tokenizer.apply_chat_template(_messages(prompt), add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt)


def encode_response(tokenizer, prompt, response: str, chat: bool | None = None) -> list[int]:
    """Token ids of a response to ``prompt`` as the model would generate them (end-of-turn included)."""
    if use_chat(tokenizer, prompt, chat):
        messages = _messages(prompt)
        head = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], add_generation_prompt=False)
        if not full.startswith(head):
            raise DataError("the chat template renders an assistant turn that does not extend the generation prompt; "
                            "use text prompts (chat=False) with this tokenizer.")  # fmt: skip
        return tokenizer.encode(full[len(head):].rstrip(), add_special_tokens=False)
    ids = tokenizer.encode(response, add_special_tokens=False)
    return ids + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])


def fit(prompt_ids: list[int], response_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut a (prompt, response) to ``max_length`` tokens: the prompt loses its start (keeping at most
    half the budget when the response needs room), the response its end."""
    if len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids, response_ids
    keep_prompt = min(len(prompt_ids), max(max_length // 2, max_length - len(response_ids)))
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
    return prompt_ids, response_ids[: max_length - keep_prompt]


@dataclass
class EncodedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_length: int, chat: bool | None = None) -> list[EncodedPair]:
    out = []
    for p in pairs:
        prompt = encode_prompt(tokenizer, p.prompt, chat)
        c_prompt, chosen = fit(prompt, encode_response(tokenizer, p.prompt, p.chosen, chat), max_length)
        r_prompt, rejected = fit(prompt, encode_response(tokenizer, p.prompt, p.rejected, chat), max_length)
        if c_prompt != r_prompt:  # keep one prompt for both: cut both responses to the shorter prompt budget
            keep = min(len(c_prompt), len(r_prompt))
            c_prompt = prompt[len(prompt) - keep:]
            chosen, rejected = chosen[: max_length - keep], rejected[: max_length - keep]
        if chosen == rejected:
            raise DataError(f"{p.where}: chosen and rejected are the same after cutting to max_length={max_length}; "
                            "raise max_length or shorten the prompt.")  # fmt: skip
        out.append(EncodedPair(c_prompt, chosen, rejected))
    return out
