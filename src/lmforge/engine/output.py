"""The output processor: token ids in, text out, and the one rule that ends a sequence.

``IncrementalDetokenizer`` turns the chosen ids into text pieces that are always whole UTF-8
characters and that end exactly before the first stop string. ``OutputProcessor`` is one
sequence's output: its tokens, its text, and the finish rule every decoding loop uses
(``generate``, beam search, speculative decoding, the serving engine):

* a stop token (eos of the model and tokenizer, unless ``ignore_eos``; any of ``stop_token_ids``)
  ends it with ``"stop"``; the token is kept in ``token_ids`` but adds no text;
* a stop string ends it with ``"stop"``; the text ends right before it;
* otherwise, the token budget (``max_new_tokens``, cut to what the context leaves) ends it with
  ``"length"``.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.engine.sampler import SamplingError, SamplingParams


class IncrementalDetokenizer:
    """Ids in, text pieces out: each piece is whole UTF-8 characters, and the text stops exactly
    before the first stop string.

        det = IncrementalDetokenizer(tokenizer, stop=("\\n\\n",))
        for tok in ids:
            piece = det.push(tok)      # "" while a character or a possible stop string is incomplete
            if det.stopped: break      # a stop string was found; pieces so far end right before it
        piece = det.flush()            # the rest, at the end of generation

    Decoding looks back a few tokens (the "prefix window") and emits only the new suffix, so
    tokenizers whose decoding depends on neighbours (leading spaces, byte fallback) stream the
    same text that decoding all ids at once gives. Text ending in U+FFFD (an incomplete
    multi-byte character) is held back until the next token completes it.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True, prefix_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.skip_special_tokens = skip_special_tokens
        # prefix_ids: the last few prompt tokens, so the first generated token decodes in context
        self.ids: list[int] = list(prefix_ids)[-6:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self._start = len(self.ids)
        self.held = ""  # decoded text not yet released (could start a stop string)
        self.text = ""  # everything released so far
        self.stopped = False  # a stop string was reached
        self.stop_string: str | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.ids[self._start :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that is now certain (possibly "")."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new, or an incomplete character: wait for more bytes
        new = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(new, final=False)

    def flush(self) -> str:
        """At the end of generation: the text still held back (an unfinished character included)."""
        if self.stopped:
            return ""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        new = full[len(prefix) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        return self._release(new, final=True)

    def _release(self, new: str, final: bool) -> str:
        buf = self.held + new
        if self.stop:
            hits = [(i, s) for s in self.stop if (i := buf.find(s)) >= 0]
            if hits:
                cut, self.stop_string = min(hits)
                self.stopped, self.held = True, ""
                self.text += buf[:cut]
                return buf[:cut]
        keep = 0 if final else self._partial_stop_len(buf)
        out, self.held = buf[: len(buf) - keep], buf[len(buf) - keep :]
        self.text += out
        return out

    def _partial_stop_len(self, buf: str) -> int:
        """Length of the longest end of buf that is the beginning of some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:n]):
                    longest = n
                    break
        return longest


def stop_token_ids(params: SamplingParams, config, tokenizer=None) -> frozenset[int]:
    """The ids that end a sequence: ``stop_token_ids``, plus the model's and tokenizer's eos
    unless ``ignore_eos``."""
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        eos = config.eos_token_id
        ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
        if tokenizer is not None:
            ids |= set(tokenizer.eos_ids)
    return frozenset(ids)


class OutputProcessor:
    """One sequence's generated tokens and text, and the finish rule (see the module's docstring).

    ``accept(token)`` records a token and returns the text it makes certain; once
    ``finish_reason`` is set, the sequence is done and its text complete (held-back text flushed).
    Without a tokenizer only token ids are kept.
    """

    def __init__(self, params: SamplingParams, stop_ids: frozenset[int], max_new: int, tokenizer=None,
                 prompt: Sequence[int] = ()):  # fmt: skip
        self.params, self.stop_ids, self.max_new = params, stop_ids, max_new
        self.detok = None
        if tokenizer is not None:
            self.detok = IncrementalDetokenizer(tokenizer, params.stop, params.skip_special_tokens, prefix_ids=prompt)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.constraint = None  # the grammar state of params.constraint, which the sampler masks by
        if params.constraint is not None:
            from lmforge.engine.constraints import Constraint, ConstraintError

            if tokenizer is None:
                raise SamplingError("constrained decoding needs the model's tokenizer.", param="constraint")
            try:
                self.constraint = Constraint(params.constraint, tokenizer)
            except ConstraintError as e:  # e.g. a grammar that can't match any text: the request's fault
                raise SamplingError(str(e), param=e.param or "constraint") from None

    @property
    def text(self) -> str:
        return self.detok.text if self.detok is not None else ""

    def accept(self, token: int) -> str:
        self.token_ids.append(token)
        piece = ""
        if self.constraint is not None:
            self.constraint.advance(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif self.detok is not None:
            piece = self.detok.push(token)
            if self.detok.stopped:
                self.finish_reason = "stop"
        if self.finish_reason is None and self.constraint is not None and self.constraint.is_accepting and self.constraint.is_done:
            self.finish_reason = "stop"  # the grammar is complete: nothing but end-of-sequence could follow
        if self.finish_reason is None and len(self.token_ids) >= self.max_new:
            self.finish_reason = "length"
        if self.finish_reason is not None and self.detok is not None:
            piece += self.detok.flush()
        return piece
