"""The one prompt check (library and server alike), chat messages to ids, and the token budget a
prompt leaves."""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.engine.sampler import SamplingError
from lmforge.errors import UserError


class PromptError(SamplingError):
    """A prompt that cannot be generated from (empty, too long, wrong type); the message says why."""

    def __init__(self, message: str, param: str | None = "prompt"):
        super().__init__(message, param)


class ContextLengthError(PromptError):
    """A prompt (plus the tokens asked for) longer than the model's context (HTTP 400)."""


def check_prompt(ids: Sequence[int], config, context: int, max_new_tokens: int | None = None) -> None:
    """Raise PromptError / ContextLengthError, naming the lengths, unless ``ids`` can be generated
    from with ``config``'s model and ``context`` positions. With ``max_new_tokens`` (a client that
    asked for that many explicitly), the prompt must leave room for all of them."""
    if not ids:
        raise PromptError("the prompt is empty: give at least one token.")
    V = config.vocab_size
    bad = next((t for t in ids if not 0 <= t < V), None)
    if bad is not None:
        raise PromptError(f"token id {bad} in the prompt is outside the vocabulary (0..{V - 1}).")
    n = len(ids)
    if config.arch == "encoder-decoder":
        if n > context and config.position == "learned":
            raise ContextLengthError(f"the prompt has {n} tokens but the encoder's context is {context} tokens: shorten it.")
        return
    if n >= context:
        raise ContextLengthError(
            f"the prompt has {n} tokens but the model's context is {context} tokens: shorten it to at most "
            f"{context - 1} tokens so there is room to generate."
        )
    if max_new_tokens is not None and n + max_new_tokens > context:
        raise ContextLengthError(
            f"the prompt has {n} tokens and max_tokens asks for {max_new_tokens} more, {n + max_new_tokens} in all, "
            f"but the model's context is {context} tokens: lower max_tokens to at most {context - n} or shorten the prompt."
        )


def token_budget(prompt_len: int, max_new_tokens: int, config, context: int) -> int:
    """How many tokens a sequence may generate: ``max_new_tokens``, cut to what the context leaves
    (an encoder-decoder's decoder starts from one start token)."""
    room = context - 1 if config.arch == "encoder-decoder" else context - prompt_len
    return max(1, min(max_new_tokens, room))


def chat_ids(tokenizer, messages: Sequence[dict], **variables) -> list[int]:
    """Token ids of chat messages through the tokenizer's chat template, ready for the assistant's
    turn. A tokenizer without a template, or a template that rejects the messages, is a PromptError
    (param "messages")."""
    if tokenizer is None or tokenizer.chat_template is None:
        raise PromptError("chat messages need a tokenizer with a chat template; pass plain text instead.", "messages")
    try:
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, **variables)  # e.g. tools=
    except UserError as e:  # the template is invalid, or rejected the messages (its raise_exception)
        raise PromptError(str(e), "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)
