"""The fixed-batch loop: a batch admitted together, decoded in lockstep over a contiguous cache.

``generate`` runs here where the ``Engine`` cannot serve it: sparse or linear attention, and
``use_cache=False`` (the recomputing reference). The prompts are prefilled at once and decoded step
by step on a ``DecoderRunner`` / ``Seq2SeqRunner`` (static shapes: the compiled batch-1 step
applies). It takes the engine's own parts: the ``Sampler`` for every step and an
``OutputProcessor`` per row for text and the finish rule, exactly as the serving engine does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lmforge.engine.output import OutputProcessor
from lmforge.engine.runner import CompiledStep
from lmforge.engine.sampler import Sampler, SamplingParams


@dataclass
class Row:
    """One sequence of a fixed batch: its parameters, random stream and output."""

    params: SamplingParams
    prompt: list[int]
    generator: torch.Generator | None
    out: OutputProcessor
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] = field(default_factory=list)

    @property
    def finish_reason(self) -> str | None:
        return self.out.finish_reason


def decode_batch(runner, rows: list[Row], timing: dict | None = None) -> Iterator[tuple[int, str]]:
    """Generate until every row is finished; yields (row index, text piece) as text becomes certain.
    ``timing`` (if given) receives prefill_s (prompt to first token), decode_s and decode_steps
    (the tokens after the first), first_step_s (the first of those steps, compilation included) and
    step: "compiled" (every step compiled), "eager", or "switched" (a background compile took over)."""
    sampler = Sampler()
    params, generators = [r.params for r in rows], [r.generator for r in rows]
    compiled_from_start = isinstance(getattr(runner, "step", None), CompiledStep)
    switched = False
    start = time.perf_counter()
    logits = runner.prefill()
    steps = 0
    while True:
        constraints = [r.out.constraint if r.finish_reason is None else None for r in rows]  # finished rows: free
        out = sampler(logits, params, generators, [r.out.token_ids for r in rows], [r.prompt for r in rows], constraints)
        for i, row in enumerate(rows):
            if row.finish_reason is not None:
                continue
            row.logprobs.append(out.logprobs[i])
            if row.params.logprobs:
                row.top.append(dict(out.top[i]))
            piece = row.out.accept(out.token_ids[i])
            if piece:
                yield i, piece
        if steps == 0:
            first = time.perf_counter()
        if all(r.finish_reason is not None for r in rows):
            break
        if getattr(runner, "pending", None) is not None:
            switched = runner.take_compiled_step()  # a step compiled in the background takes over once ready
        logits = runner.extend(torch.tensor(out.token_ids, device=logits.device)[:, None])
        steps += 1
        if steps == 1:
            first_step = time.perf_counter() - first
    if timing is not None:
        timing.update(prefill_s=first - start, decode_s=time.perf_counter() - first, decode_steps=steps,
                      step="compiled" if compiled_from_start else "switched" if switched else "eager")  # fmt: skip
        if steps:
            timing["first_step_s"] = first_step  # where a compiled step compiles
