"""Constrained decoding: JSON Schema, regular expressions and context-free grammars as token masks.

The sampler asks, before each token, which tokens may come next for every constrained row, and
sets the others' logits to -inf; after sampling it tells each row's constraint the token it took.

    grammar = compile_grammar(json_schema={"type": "object", ...})   # checked once, cached
    state = Constraint(grammar, tokenizer)                           # one per generated sequence
    mask_logits(logits, [state, None, ...])                         # (B, V) in place, rows at once
    state.advance(token)                                             # after sampling

The grammar engine is llguidance (Rust, no torch dependency; its Earley parser with a lexer computes
a whole-vocabulary mask in about 0.2 ms for a 49k vocabulary here). Grammars are compiled to
llguidance's internal form once per distinct spec (an LRU cache), the tokenizer is converted once
per tokenizer, and every row of a batch is masked in one parallel call.
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmforge.errors import UserError


class ConstraintError(UserError, ValueError):
    """A schema, regex or grammar that cannot constrain decoding; ``param`` names the request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _llguidance():
    try:
        import llguidance
        import llguidance.torch  # noqa: F401  (the batched mask filler)
    except ImportError as e:  # a runtime dependency; only a broken install gets here
        raise ConstraintError("structured output needs the llguidance package: pip install llguidance") from e
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """A checked grammar in llguidance's serialized form; ``kind`` and ``source`` say where it came from."""

    kind: str  # "json_schema" | "json_object" | "regex" | "lark"
    source: str
    serialized: str


_JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: a model can't stall in endless whitespace
_ANY_JSON_OBJECT = {"type": "object"}


def compile_grammar(*, json_schema: dict | str | None = None, regex: str | None = None, grammar: str | None = None,
                    json_object: bool = False, param: str | None = None) -> Grammar:  # fmt: skip
    """One grammar from exactly one of: a JSON Schema, any JSON object, a regex, or a Lark grammar.

    Raises ``ConstraintError`` naming the problem (an invalid or unsupported schema, a bad regex).
    ``param`` is the request field to name in that error (the server passes e.g. ``response_format``).
    """
    given = [k for k, v in dict(json_schema=json_schema, regex=regex, grammar=grammar).items() if v is not None]
    given += ["json_object"] if json_object else []
    if len(given) != 1:
        raise ConstraintError(f"give exactly one of json_schema, regex, grammar or json_object (got {', '.join(given) or 'none'})", param)  # fmt: skip
    if json_object:
        kind, source = "json_object", json.dumps(_ANY_JSON_OBJECT)
    elif json_schema is not None:
        kind = "json_schema"
        if isinstance(json_schema, str):
            try:
                json_schema = json.loads(json_schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"the JSON schema is not valid JSON: {e}", param) from None
            except RecursionError:
                raise ConstraintError("the JSON schema nests arrays and objects too deeply", param) from None
        if not isinstance(json_schema, dict):
            raise ConstraintError("a JSON schema must be a JSON object", param)
        try:  # key order kept: properties are generated in the schema's order
            source = json.dumps(json_schema, allow_nan=False)
        except ValueError:
            raise ConstraintError("the JSON schema holds NaN or Infinity, which JSON does not allow", param) from None
        except RecursionError:
            raise ConstraintError("the JSON schema is nested too deeply", param) from None
    elif regex is not None:
        kind, source = "regex", regex
    else:
        kind, source = "lark", grammar
    try:
        return _compile(kind, source)
    except ConstraintError as e:
        raise ConstraintError(str(e), param) from None


@functools.lru_cache(maxsize=256)
def _compile(kind: str, source: str) -> Grammar:
    LLMatcher = _llguidance().LLMatcher
    what = {"json_schema": "JSON schema", "json_object": "JSON schema", "regex": "regex", "lark": "grammar"}[kind]
    try:  # llguidance raises ValueError for some specs it can't take (nesting past its limit, lone surrogates)
        if kind in ("json_schema", "json_object"):
            serialized = LLMatcher.grammar_from_json_schema(source, overrides=_JSON_OPTIONS)
        elif kind == "regex":
            serialized = LLMatcher.grammar_from_regex(source)
        else:
            serialized = LLMatcher.grammar_from_lark(source)
    except UnicodeEncodeError:
        raise ConstraintError(f"invalid {what}: it holds a lone UTF-16 surrogate, which is not a character") from None
    except ValueError as e:
        raise ConstraintError(f"invalid {what}: {_first_line(str(e))}") from None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(serialized)
    if is_error:
        raise ConstraintError(f"invalid {what}: {_first_line(messages[0])}")
    return Grammar(kind, source, serialized)


def _first_line(message: str) -> str:
    """llguidance's messages quote the grammar over several lines; the error is the last non-quote line."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors[0][len("error:"):].strip() if errors else lines[0]) if lines else message


# --- tokenizer bridge -------------------------------------------------------------------------------
_vocabs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_vocab_lock = threading.Lock()


def _ll_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of a tokenizer (built once per tokenizer and logits width: ~0.5 s for 49k tokens)."""
    with _vocab_lock:
        per = _vocabs.setdefault(tokenizer, {})
        if vocab_size not in per:
            eos = sorted(tokenizer.eos_ids)
            if not eos:
                raise ConstraintError("constrained decoding needs a tokenizer with an end-of-sequence token")
            per[vocab_size] = _llguidance().LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=eos[0])
        return per[vocab_size]


class Constraint:
    """The grammar state of one generated sequence: which tokens may come next, and what it has taken."""

    def __init__(self, grammar: Grammar, tokenizer, vocab_size: int | None = None):
        self.grammar = grammar
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self.eos_ids = frozenset(tokenizer.eos_ids)
        self._matcher = _llguidance().LLMatcher(_ll_tokenizer(tokenizer, self.vocab_size), grammar.serialized)
        if self._matcher.is_error():
            raise ConstraintError(f"invalid {grammar.kind.replace('_', ' ')}: {_first_line(self._matcher.get_error())}")
        allowed = self.allowed()
        if not self._matcher.is_accepting() and not (allowed[: self.vocab_size].any() and not _only(allowed, self.eos_ids)):
            raise ConstraintError(f"the {grammar.kind.replace('_', ' ')} can't match any text")

    def allowed(self) -> torch.Tensor:
        """Bool mask (V,) of the tokens that may come next."""
        bits = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)
        return unpack_bitmask(bits[None], self.vocab_size)[0]

    def advance(self, token: int) -> None:
        """Take the sampled token; a token the mask forbade is a bug in the caller, not the model."""
        if token in self.eos_ids and self.is_done:
            return
        if not self._matcher.consume_token(int(token)):
            error, kind = self._matcher.get_error(), self.grammar.kind.replace("_", " ")
            if "doesn't satisfy the grammar" in error:  # a token the mask forbade: the caller's bug
                raise RuntimeError(f"token {token} violates the {kind}: {error}")
            # an allowed token the grammar could not take (llguidance's lexer limits on a pathological
            # regex, say): the request's fault, which ends that request only (a 400)
            raise ConstraintError(f"the {kind} could not be followed past token {token}: {_first_line(error)}")

    def rollback(self, n: int) -> None:
        """Forget the last n tokens (speculative decoding)."""
        if n and not self._matcher.rollback(n):
            raise RuntimeError(f"could not roll the constraint back by {n} tokens")

    @property
    def is_done(self) -> bool:
        """The text is complete: nothing but end-of-sequence may follow."""
        return self._matcher.is_stopped() or (self._matcher.is_accepting() and _only(self.allowed(), self.eos_ids))

    @property
    def is_accepting(self) -> bool:
        return self._matcher.is_accepting()


def _only(allowed: torch.Tensor, ids) -> bool:
    rest = allowed.clone()
    rest[[i for i in ids if i < rest.numel()]] = False
    return not bool(rest.any())


_SHIFTS = torch.arange(32, dtype=torch.int32)


def unpack_bitmask(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, ceil(V/32)) int32 words, bit j of word w = token 32w + j -> bool (B, V)."""
    return ((bits[:, :, None] >> _SHIFTS) & 1).bool().flatten(1)[:, :vocab_size]


_executor = None


def mask_logits(logits: torch.Tensor, constraints: Sequence[Constraint | None]) -> torch.Tensor:
    """Set logits (B, V) to -inf, in place, where row i's constraint forbids the token (None: free row).

    All constrained rows' masks are computed in one parallel llguidance call.
    """
    global _executor
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits
    llg = _llguidance()
    if _executor is None:
        _executor = llg.LLExecutor()
    V, Vc = logits.shape[-1], constraints[rows[0]].vocab_size
    if any(constraints[i].vocab_size != Vc for i in rows):
        raise ValueError("every constraint of one batch must be built for the same vocabulary size")
    bits = torch.full((len(rows), (Vc + 31) // 32), -1, dtype=torch.int32)
    llg.torch.fill_next_token_bitmask_par(_executor, [(constraints[i]._matcher, k) for k, i in enumerate(rows)], bits)
    allowed = unpack_bitmask(bits, Vc)  # (R, Vc): ids past the tokenizer's vocabulary (padding rows) never match
    if V != Vc:
        allowed = torch.nn.functional.pad(allowed, (0, V - Vc)) if V > Vc else allowed[:, :V]
    allowed = allowed.to(logits.device)
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return logits
