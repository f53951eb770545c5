"""Pretraining objectives: pure functions from a batch of token windows to model inputs and labels.

    causal_lm        predict token t+1 from tokens <= t                      (GPT)
    masked_lm        predict 15% of tokens: 80% [MASK], 10% random, 10% kept (BERT)
    prefix_lm        a random prefix seen bidirectionally, loss on the rest   (UniLM, T5's prefix LM)
    span_corruption  spans replaced by sentinels; the decoder writes them out (T5)

Labels use ``IGNORE_INDEX`` (-100) where no loss is taken. Randomness comes only from the
``generator`` argument, so a batch is reproducible from its seed.

The causal and prefix objectives can weight the loss of some tokens more than others
(``answer_spans`` / ``Objective.answers``): the tokens after each occurrence of an answer prefix
(e.g. "The pass key is ") up to and including the next answer end (e.g. ".") weigh
``answer_weight``, every other label ``context_weight``; the batch then carries ``loss_weights``
(B, T) beside its labels and the loss is the weighted mean sum(w * nll) / sum(w).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmforge.data.prepare import DataError, SpecialIds

IGNORE_INDEX = -100
OBJECTIVES = ("causal", "mlm", "prefix", "span")
ARCH_OF = {"causal": "decoder", "prefix": "decoder", "mlm": "encoder", "span": "encoder-decoder"}


# --- causal LM -------------------------------------------------------------------------------------
def causal_lm(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """tokens (B, T+1) -> input_ids (B, T) = tokens[:, :-1], labels (B, T) = tokens[:, 1:]."""
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


# --- masked LM -------------------------------------------------------------------------------------
def masked_lm(
    tokens: torch.Tensor,  # (B, T)
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int] = (),
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """BERT masking: each non-special token is chosen with probability ``mask_prob``; a chosen token
    becomes [MASK] (80%), a random non-special token (10%) or stays (10%), and is the only kind of
    position with a label."""
    B, T = tokens.shape
    special = torch.tensor(sorted({*special_ids, mask_id}), dtype=tokens.dtype)
    is_special = torch.isin(tokens, special)
    chosen = (torch.rand(B, T, generator=generator) < mask_prob) & ~is_special
    labels = torch.where(chosen, tokens, IGNORE_INDEX)
    r = torch.rand(B, T, generator=generator)
    to_mask = chosen & (r < 0.8)
    to_random = chosen & (r >= 0.8) & (r < 0.9)
    normal = torch.ones(vocab_size, dtype=torch.bool)
    normal[special[special < vocab_size]] = False
    normal_ids = normal.nonzero().squeeze(1)
    random_ids = normal_ids[torch.randint(len(normal_ids), (B, T), generator=generator)]
    inputs = torch.where(to_mask, mask_id, tokens)
    inputs = torch.where(to_random, random_ids, inputs)
    return {"input_ids": inputs, "labels": labels}


# --- prefix LM -------------------------------------------------------------------------------------
def prefix_lm(tokens: torch.Tensor, *, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """tokens (B, T+1): a prefix length p ~ U{1..T-1} per sequence; the first p inputs attend to each
    other both ways, the rest causally, and the loss covers the tokens after the prefix (predicted
    from positions p-1 .. T-1, none of which sees its own target)."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    B, T = x.shape
    if T < 2:
        raise DataError("prefix LM needs a block_size of at least 2.")
    prefix_len = torch.randint(1, T, (B,), generator=generator)
    predicts = torch.arange(T)[None, :] >= (prefix_len[:, None] - 1)
    return {"input_ids": x, "labels": torch.where(predicts, y, IGNORE_INDEX), "prefix_len": prefix_len}


# --- span corruption (T5) ----------------------------------------------------------------------------
def _span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a sequence of ``length`` tokens, as T5 rounds them."""
    n_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    n_spans = max(int(round(n_noise / mean_span_length)), 1)
    return n_noise, min(n_spans, n_noise, length - n_noise)


def span_corruption_lengths(input_length: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[int, int]:
    """(raw window length, target length) such that corrupting the window gives exactly
    ``input_length`` encoder tokens (T5's ``compute_input_and_target_lengths``)."""

    def lengths(raw: int) -> tuple[int, int]:
        n_noise, n_spans = _span_counts(raw, noise_density, mean_span_length)
        return raw - n_noise + n_spans + 1, n_noise + n_spans + 1  # + EOS each

    if input_length < 3:
        raise DataError("span corruption needs a block_size of at least 3.")
    raw = input_length
    while lengths(raw + 1)[0] <= input_length:
        raw += 1
    while lengths(raw)[0] > input_length:
        raw -= 1
    return raw, lengths(raw)[1]


def _segments(total: int, n: int, gen: torch.Generator | None) -> torch.Tensor:
    """A uniformly random split of ``total`` items into ``n`` non-empty runs; their lengths (n,)."""
    cuts = (torch.randperm(total - 1, generator=gen)[: n - 1] + 1).sort().values
    edges = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([total])])
    return edges.diff()


def noise_mask(length: int, noise_density: float, mean_span_length: float, generator=None) -> torch.Tensor:
    """T5's random_spans_noise_mask: (length,) bool, ~density of it in ~mean_span_length runs,
    alternating clean/noise runs starting with a clean one."""
    n_noise, n_spans = _span_counts(length, noise_density, mean_span_length)
    noise_lens = _segments(n_noise, n_spans, generator)
    clean_lens = _segments(length - n_noise, n_spans, generator)
    runs = torch.stack([clean_lens, noise_lens], dim=1).flatten()  # clean0, noise0, clean1, noise1, ...
    flags = torch.tensor([False, True]).repeat(n_spans)
    return flags.repeat_interleave(runs)


def span_corruption(
    tokens: torch.Tensor,  # (B, L)
    *,
    sentinel_ids: Sequence[int],
    eos_id: int,
    decoder_start_id: int,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """T5 span corruption. Each noise span becomes one sentinel in the encoder input; the target is
    every sentinel followed by the span it hid, then EOS:

        tokens        a b c d e f g h
        input_ids     a <X0> d e <X1> h </s>
        labels        <X0> b c <X1> f g </s>
        decoder_input_ids = [decoder_start] + labels[:-1]
    """
    B, L = tokens.shape
    n_noise, n_spans = _span_counts(L, noise_density, mean_span_length)
    if n_spans > len(sentinel_ids):
        raise DataError(
            f"span corruption of {L} tokens makes {n_spans} spans but the tokenizer has {len(sentinel_ids)} sentinel "
            "tokens; use a tokenizer with more <extra_id_N> tokens or a smaller block_size."
        )
    sentinels = torch.tensor(list(sentinel_ids), dtype=tokens.dtype)
    eos = torch.tensor([eos_id], dtype=tokens.dtype)
    inputs, targets = [], []
    for row in tokens:
        noise = noise_mask(L, noise_density, mean_span_length, generator)
        starts = noise & ~torch.cat([torch.tensor([False]), noise[:-1]])
        sent = sentinels[(starts.cumsum(0) - 1).clamp(min=0)]
        inputs.append(torch.cat([torch.where(starts, sent, row)[~noise | starts], eos]))
        pairs = torch.stack([torch.where(starts, sent, -1), torch.where(noise, row, -1)], dim=1).flatten()
        targets.append(torch.cat([pairs[pairs >= 0], eos]))
    labels = torch.stack(targets)
    start = torch.full((B, 1), decoder_start_id, dtype=tokens.dtype)
    return {"input_ids": torch.stack(inputs), "decoder_input_ids": torch.cat([start, labels[:, :-1]], 1), "labels": labels}


def reconstruct_spans(input_ids: Sequence[int], labels: Sequence[int], sentinel_ids: Sequence[int], eos_id: int) -> list[int]:
    """The original tokens from one span-corrupted (input, target) pair: each sentinel in the input
    is replaced by what follows the same sentinel in the target."""
    sentinel_set = set(sentinel_ids)
    spans: dict[int, list[int]] = {}
    current = None
    for t in labels[:-1]:  # drop the final EOS (an EOS inside a span is a document boundary: kept)
        if t in sentinel_set:
            current = t
            spans[current] = []
        elif current is not None:
            spans[current].append(t)
    out: list[int] = []
    for t in input_ids[:-1]:  # drop the final EOS
        out.extend(spans[t] if t in sentinel_set else [t])
    return out


# --- weighted answers ------------------------------------------------------------------------------
def _occurrences(tokens: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: True at each position where ``pattern`` (P,) starts in ``tokens`` (B, L)."""
    B, L = tokens.shape
    P = pattern.numel()
    found = torch.zeros(B, L, dtype=torch.bool)
    if L >= P:
        found[:, : L - P + 1] = (tokens.unfold(1, P, 1) == pattern.to(tokens.dtype)).all(-1)
    return found


def answer_spans(tokens: torch.Tensor, prefix: Sequence[int], end: Sequence[int]) -> torch.Tensor:
    """(B, L) bool over ``tokens`` (B, L): the tokens after each occurrence of ``prefix``, up to and
    including the next occurrence of ``end`` (to the row's end when none follows in the window).

        tokens   T h e   k e y   i s   4 8 2 1 3 .   B y e        prefix "key is ", end "."
        spans                          1 1 1 1 1 1
    """
    if not prefix or not end:
        raise DataError("an answer span needs a non-empty prefix and end.")
    B, L = tokens.shape
    starts = _occurrences(tokens, torch.tensor(list(prefix)))
    ends = _occurrences(tokens, torch.tensor(list(end)))
    spans = torch.zeros(B, L, dtype=torch.bool)
    for b, s in starts.nonzero().tolist():
        first = s + len(prefix)
        after = ends[b, first:].nonzero()
        stop = first + int(after[0]) + len(end) if after.numel() else L
        spans[b, first : min(stop, L)] = True
    return spans


@dataclass
class AnswerWeights:
    """Loss weights from the corpus format: answer tokens (``answer_spans``) weigh ``answer``, the rest ``context``."""

    prefix: tuple[int, ...]
    end: tuple[int, ...]
    answer: float = 1.0
    context: float = 1.0

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T+1) -> weights (B, T) of the labels tokens[:, 1:]."""
        spans = answer_spans(tokens, self.prefix, self.end)[:, 1:]
        return torch.where(spans, self.answer, self.context).float()


# --- choosing one ----------------------------------------------------------------------------------
@dataclass
class Objective:
    """An objective bound to its settings: raw windows of ``window`` tokens -> a model batch."""

    name: str
    window: int  # tokens per raw window
    fn: Callable[[torch.Tensor, torch.Generator | None], dict[str, torch.Tensor]]
    decoder_length: int | None = None  # span corruption: target length
    answers: AnswerWeights | None = None  # causal / prefix: per-label loss weights ("loss_weights")

    def __call__(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        batch = self.fn(tokens, generator)
        if self.answers is not None:
            batch["loss_weights"] = self.answers(tokens)
        return batch


def make_objective(
    name: str,
    block_size: int,
    specials: SpecialIds,
    vocab_size: int,
    *,
    mlm_probability: float = 0.15,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    decoder_start_id: int | None = None,
    answers: AnswerWeights | None = None,
) -> Objective:
    """The objective ``name`` (one of OBJECTIVES) for model inputs of ``block_size`` tokens;
    ``answers`` (causal and prefix only) adds per-label loss weights to every batch."""
    if answers is not None and name not in ("causal", "prefix"):
        raise DataError(f"answer loss weights work with the causal and prefix objectives, not objective={name}; remove answer_prefix.")
    if name == "causal":
        return Objective(name, block_size + 1, lambda t, g: causal_lm(t), answers=answers)
    if name == "prefix":
        return Objective(name, block_size + 1, lambda t, g: prefix_lm(t, generator=g), answers=answers)
    if name == "mlm":
        if specials.mask is None:
            raise DataError(
                "masked LM needs a mask token but this tokenizer has none; use one with <mask> or [MASK] (e.g. tokenizer: bpe:4096)."
            )
        return Objective(
            name, block_size,
            lambda t, g: masked_lm(t, mask_id=specials.mask, vocab_size=vocab_size, special_ids=specials.all,
                                   mask_prob=mlm_probability, generator=g),
        )  # fmt: skip
    if name == "span":
        if not specials.sentinels or specials.eos is None:
            raise DataError(
                "span corruption needs T5 sentinel tokens (<extra_id_0>, ...) and an EOS token; "
                "use a tokenizer that has them (e.g. tokenizer: bpe:4096)."
            )
        start = decoder_start_id if decoder_start_id is not None else (specials.pad if specials.pad is not None else specials.eos)
        raw, target = span_corruption_lengths(block_size, noise_density, mean_noise_span_length)
        return Objective(
            name, raw,
            lambda t, g: span_corruption(t, sentinel_ids=specials.sentinels, eos_id=specials.eos, decoder_start_id=start,
                                         noise_density=noise_density, mean_span_length=mean_noise_span_length, generator=g),
            decoder_length=target,
        )  # fmt: skip
    raise DataError(f"objective={name!r} is not supported; choose one of {', '.join(OBJECTIVES)}.")
