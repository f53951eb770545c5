"""Acceptance against transformers on the bundled SmolLM2-135M (fp32; transformers reads the same GGUF):
strided perplexity on a WikiText-2 slice by the loop of transformers' perplexity guide, and
multiple-choice log-likelihoods."""

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
    text = shared_text("wikitext2-test.txt")[:4000]
    ours = text_perplexity(model, tok, text, context=256, stride=128, max_tokens=520)
    ids = torch.tensor([tok.encode(text)[:520]])
    guide, exact = transformers_guide_perplexity(hf_smollm, ids, max_length=256, stride=128)
    print(f"lmforge {ours.ppl:.5f}, transformers (guide) {guide:.5f}, transformers (exact counts) {exact:.5f}")
    assert ours.tokens == 519 and ours.windows == 4
    assert ours.ppl == pytest.approx(exact, rel=1e-5)  # same tokens scored, same weights: float noise only
    # the acceptance bound against the guide's own figure, whose per-window weight (labels - 1) is off by
    # one token for every window after the first: a bias of order 1/stride (0.11% measured at stride 64)
    assert ours.ppl == pytest.approx(guide, rel=1e-3)
    assert 5 < ours.ppl < 60  # a real language model on English text, not a uniform guess (ppl ~ 49k)
    assert ours.bits_per_byte == pytest.approx(ours.mean_nll * ours.tokens / (ours.bytes * math.log(2)))


def test_smollm2_multiple_choice_loglikelihoods_match_transformers(smollm, hf_smollm):
    """Each (context, choice) log-likelihood equals the sum of transformers' log-softmax over the same tokens."""
    from lmforge.eval.tasks import encode_pair, loglikelihood

    model, tok = smollm
    requests = [
        ("The capital of France is", c) for c in (" Paris", " Berlin", " a city in Europe")
    ] + [
        ("Question: 12 + 30 =", " 42"), ("ROMEO:\nBut soft, what light through yonder window", " breaks"),
        ("The cat sat on the ", "mat."),  # a trailing space: moved to the continuation, as the harness does
    ]  # fmt: skip
    ours = loglikelihood(model, tok, requests, batch_size=4)
    for (ctx, cont), (ll, greedy) in zip(requests, ours):
        c, x = encode_pair(tok, ctx, cont)
        with torch.no_grad():
            logp = torch.log_softmax(hf_smollm(torch.tensor([c + x])).logits[0].float(), -1)
        theirs = sum(logp[len(c) + j - 1, t].item() for j, t in enumerate(x))
        assert ll == pytest.approx(theirs, abs=1e-4)
        assert greedy == all(logp[len(c) + j - 1].argmax().item() == t for j, t in enumerate(x))
    paris, berlin, _ = (ll for ll, _ in ours[:3])
    assert paris > berlin  # the real model knows
