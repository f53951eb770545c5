"""Acceptance: lmforge's strided perplexity of SmolLM2-135M on WikiText-2 equals transformers' figure
computed by the loop of transformers' perplexity guide, on a slice of the test file."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.eval.perplexity import text_perplexity

pytestmark = pytest.mark.slow


def transformers_guide_perplexity(hf, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, float]:
    """The perplexity guide's loop (labels -100 before the window's new tokens, the model's own loss).

    Returns (the guide's figure, which weighs each window's mean loss by its label count minus one,
    the figure with each window's loss weighed by the tokens it actually scored)."""
    seq_len = ids.size(1)
    guide_sum, guide_n, exact_sum, exact_n, prev_end = 0.0, 0, 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss.item()
        n_valid = (target_ids != -100).sum().item()
        guide_sum, guide_n = guide_sum + loss * (n_valid - 1), guide_n + n_valid - 1
        scored = (target_ids[:, 1:] != -100).sum().item()  # the labels the shifted loss really averages
        exact_sum, exact_n = exact_sum + loss * scored, exact_n + scored
        prev_end = end
        if end == seq_len:
            break
    return math.exp(guide_sum / guide_n), math.exp(exact_sum / exact_n)


def test_smollm2_wikitext2_perplexity_matches_transformers_guide(smollm, hf_smollm, shared_text):
    model, tok = smollm
    text = shared_text("wikitext2-test.txt")[:6000]
    ours = text_perplexity(model, tok, text, context=256, stride=128, max_tokens=1200)
    ids = torch.tensor([tok.encode(text)[:1200]])
    guide, exact = transformers_guide_perplexity(hf_smollm, ids, max_length=256, stride=128)
    assert ours.tokens == 1199 and ours.windows == 9
    assert ours.ppl == pytest.approx(exact, rel=1e-4)  # same tokens scored, same weights: float noise only
    assert ours.ppl == pytest.approx(guide, rel=1e-3)  # the acceptance bound against the guide's own figure
    assert 5 < ours.ppl < 60  # a real language model on English text, not a uniform guess (ppl ~ 49k)
    assert ours.bits_per_byte == pytest.approx(ours.mean_nll * ours.tokens / (ours.bytes * math.log(2)))
