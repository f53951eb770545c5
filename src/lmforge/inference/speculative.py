"""Speculative decoding (Leviathan et al. 2023, greedy form): a small draft model guesses the next
``k`` tokens one at a time; the target model checks all of them in one forward pass and keeps the
longest prefix it agrees with, plus its own next token. Every kept token is the target's argmax,
so the output is the target's greedy output; each target pass yields 1 to k + 1 tokens.

Both models keep their caches in paged block pools (``engine.lanes``: the target's on its
engine's pool, the draft's on one of its own); rejected guesses are undone by moving the length
back (``rewind``), and their slots are simply overwritten later. Attention the pool cannot page, and
``use_cache=False``, run on the contiguous ``DecoderRunner`` with the same interface.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lmforge.engine.lanes import Lanes
from lmforge.engine.runner import DecoderRunner
from lmforge.engine.sampler import argmax


def speculative_tokens(gen, row, stats: dict, use_cache: bool = True) -> Iterator[tuple[int, str]]:
    """Generate ``row`` (an ``engine.batch.Row``: one prompt, greedy) with ``gen.model`` checking
    ``gen.draft_model``'s guesses. Yields (0, text piece) like ``decode_batch``; fills ``stats``
    with the target passes, drafted and accepted tokens."""
    k = gen.num_draft_tokens
    out = row.out  # the output processor: text and the finish rule
    target = gen._lanes([row.prompt], out.max_new, use_cache, extra_slots=k + 1)
    if use_cache and getattr(gen.draft_model.config, "attention", "softmax") == "softmax":
        draft = Lanes.own(gen.draft_model, [row.prompt], out.max_new, extra_slots=k + 1)
    else:
        draft = DecoderRunner(gen.draft_model, [row.prompt], out.max_new, use_cache=use_cache, extra_slots=k + 1)
    stats.update(target_passes=0, drafted=0, accepted=0)
    try:
        token = int(argmax(target.prefill()))
        draft.prefill()
        pending = [token]  # tokens the draft has not consumed yet
        piece = out.accept(token)
        if piece:
            yield 0, piece
        while row.finish_reason is None:
            # 1. the draft guesses k tokens greedily (fewer near the end)
            n_guess = min(k, out.max_new - len(out.token_ids))
            guesses = []
            logits = draft.extend(torch.tensor([pending], device=draft.model.device))
            for i in range(n_guess):
                guesses.append(int(argmax(logits)))
                if i + 1 < n_guess:
                    logits = draft.extend(torch.tensor([[guesses[-1]]], device=draft.model.device))
            # 2. the target scores [token, guesses...] in one pass: its argmax after each of them
            fed = torch.tensor([[token, *guesses]], device=target.model.device)
            preds = argmax(target.extend(fed, all_logits=True)[0]).tolist()  # (n_guess + 1,)
            n_ok = 0
            while n_ok < n_guess and guesses[n_ok] == preds[n_ok]:
                n_ok += 1
            stats["target_passes"] += 1
            stats["drafted"] += n_guess
            stats["accepted"] += n_ok
            # 3. keep the agreed guesses and the target's own next token; undo the rest
            target.rewind(n_guess - n_ok)  # it consumed token + n_guess guesses; keeps token + n_ok
            if n_ok == n_guess:  # the draft consumed all guesses but the last
                pending = guesses[-1:]
            else:  # the draft consumed n_guess - 1 guesses, of which n_ok stand
                draft.rewind(n_guess - 1 - n_ok)
                pending = []
            new_tokens = guesses[:n_ok] + [preds[n_ok]]
            for t in new_tokens:
                piece = out.accept(t)
                if piece:
                    yield 0, piece
                if row.finish_reason is not None:
                    break
            token = new_tokens[-1]
            pending = pending + [token]
    finally:
        target.close()
        draft.close()
