"""Sampling: parameter checks, penalties, filters (statistically), seeds, the incremental detokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.errors import UserError
from lmforge.engine.output import IncrementalDetokenizer
from lmforge.engine.sampler import (
    SamplingBatch,
    SamplingError,
    SamplingParams,
    add_tokens,
    apply_penalties,
    argmax,
    count_tokens,
    filter_logits,
    make_generator,
    sample,
)


def draw(logits: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    """n draws for one row of logits (V,), as a batch of n identical rows sharing one generator."""
    batch = SamplingBatch.from_params([params] * n)
    torch.manual_seed(0)
    return sample(logits.expand(n, -1).clone(), batch).token_ids


# --- parameters ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, word",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(min_p=2.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(n=0), "n"),
        (dict(logprobs=-1), "logprobs"),
        (dict(stop=[""]), "stop"),
        (dict(seed=1.5), "seed"),
        (dict(seed=2**64), "seed"),  # past what torch takes: it used to fail add_request (a server's 500)
        (dict(seed=-(2**70)), "seed"),
        (dict(temperature=float("nan")), "temperature"),
    ],
)
def test_bad_params_raise_one_clear_sentence(bad, word):
    with pytest.raises(SamplingError, match=word) as e:
        SamplingParams(**bad)
    assert isinstance(e.value, UserError) and str(e.value).count(".") >= 1 and "\n" not in str(e.value)


def test_stop_may_be_one_string():
    assert SamplingParams(stop="\n").stop == ("\n",)


# --- filters -------------------------------------------------------------------------------------
def test_top_k_never_leaves_the_k_most_likely():
    torch.manual_seed(1)
    logits = torch.randn(1000)
    k = 7
    ids = draw(logits, SamplingParams(top_k=k, temperature=1.5), 4000)
    allowed = set(logits.topk(k).indices.tolist())
    assert set(ids.tolist()) <= allowed
    assert len(set(ids.tolist())) == k  # and it does use all of them


def test_top_p_keeps_the_smallest_set_with_enough_mass():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]))
    for p, expect in [(0.4, {0}), (0.5, {0, 1}), (0.7, {0, 1}), (0.71, {0, 1, 2}), (0.9, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3, 4})]:
        kept = filter_logits(logits[None], SamplingBatch.from_params([SamplingParams(top_p=p)]))[0]
        assert set(torch.isfinite(kept).nonzero().flatten().tolist()) == expect, p
    ids = draw(logits, SamplingParams(top_p=0.7), 4000)
    freq = torch.bincount(ids, minlength=5).float() / len(ids)
    assert set(ids.tolist()) == {0, 1}
    assert abs(freq[0] - 0.4 / 0.7) < 0.04  # renormalised over the kept set


def test_top_k_then_top_p_and_min_p():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    batch = SamplingBatch.from_params([SamplingParams(top_k=3, top_p=0.75)])  # top-p on the renormalised top 3
    kept = filter_logits(logits[None], batch)[0]
    assert torch.isfinite(kept).nonzero().flatten().tolist() == [0, 1]  # 0.5/0.85 < 0.75 <= 0.7/0.85
    batch = SamplingBatch.from_params([SamplingParams(min_p=0.3)])  # keep p >= 0.3 * 0.5
    kept = filter_logits(logits[None], batch)[0]
    assert torch.isfinite(kept).nonzero().flatten().tolist() == [0, 1, 2]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    ids = draw(probs.log(), SamplingParams(temperature=1.0), 20000)
    freq = torch.bincount(ids, minlength=3).float() / len(ids)
    assert torch.allclose(freq, probs, atol=0.02)


def test_argmax_takes_the_first_of_tied_maxima_like_torch():
    x = torch.randn(64, 49152).round()  # many ties at the top
    x[0, [7, 40000]] = 100.0
    assert torch.equal(argmax(x), x.argmax(-1)) and argmax(x)[0] == 7


def test_temperature_to_zero_equals_greedy():
    torch.manual_seed(2)
    logits = torch.randn(16, 500)
    greedy = sample(logits, SamplingBatch.from_params([SamplingParams(temperature=0)] * 16)).token_ids
    assert torch.equal(greedy, logits.argmax(-1))
    cold = sample(logits, SamplingBatch.from_params([SamplingParams(temperature=1e-4)] * 16)).token_ids
    assert torch.equal(cold, greedy)


def test_same_seed_repeats_and_does_not_depend_on_the_batch():
    torch.manual_seed(3)
    logits = torch.randn(3, 300)
    p_seeded, p_free = SamplingParams(seed=42), SamplingParams()

    def run(rows, params):
        gens = [make_generator(p) for p in params]
        out = []
        for _ in range(20):
            out.append(sample(logits[rows], SamplingBatch.from_params(params), gens).token_ids)
        return torch.stack(out, 1)

    alone = run([0], [p_seeded])
    again = run([0], [p_seeded])
    mixed = run([1, 0, 2], [p_free, p_seeded, SamplingParams(temperature=0)])
    assert torch.equal(alone, again)
    assert torch.equal(mixed[1], alone[0])
    assert len(set(alone[0].tolist())) > 1  # it does sample
    other = run([0], [SamplingParams(seed=43)])
    assert not torch.equal(other, alone)


def test_seeds_at_the_ends_of_the_64_bit_range_and_top_k_past_it():
    # both used to raise "Overflow when unpacking long long": the seed on add_request, top_k in the
    # engine step (failing every request of the batch)
    logits = torch.randn(2, 300)
    for seed in (2**64 - 1, -(2**63), -1):
        params = [SamplingParams(seed=seed, n=2)] * 2
        gens = [make_generator(p, sample_index=i) for i, p in enumerate(params)]
        assert sample(logits, SamplingBatch.from_params(params), gens).token_ids.shape == (2,)
    assert make_generator(SamplingParams(seed=-1)).initial_seed() == 2**64 - 1  # torch's own reading of -1
    assert make_generator(SamplingParams(seed=2**64 - 1), sample_index=1).initial_seed() == 0  # wraps, no overflow
    huge = SamplingBatch.from_params([SamplingParams(top_k=2**70, temperature=1.0)])
    allk = SamplingBatch.from_params([SamplingParams(top_k=300, temperature=1.0)])
    assert torch.equal(filter_logits(logits[:1], huge), filter_logits(logits[:1], allk))  # k past V keeps every token


@pytest.mark.parametrize("extreme", [dict(temperature=1e-40), dict(temperature=5e-324), dict(repetition_penalty=1e-300),
                                     dict(temperature=1e-40, top_p=0.5, top_k=3, min_p=0.5)])  # fmt: skip
def test_extreme_parameters_never_draw_a_masked_token(extreme):
    # a tiny temperature (or one float32 rounds to 0), or a repetition penalty near 0, made logits +-inf:
    # softmax NaN, and the draw token 0 even where a grammar had masked it out, which failed the
    # engine step of every request batched with it (found by fuzzing the server)
    torch.manual_seed(6)
    logits = torch.randn(2, 50)
    logits[:, :40] = -math.inf  # what a constraint's mask leaves
    params = [SamplingParams(**extreme, seed=i) for i in range(2)]
    batch = SamplingBatch.from_params(params)
    penalised = apply_penalties(logits, batch, count_tokens([[45, 46], [47]], 50), count_tokens([[45], [41]], 50) > 0)
    assert torch.isfinite(penalised[:, 40:]).all()
    ids = sample(penalised, batch, [make_generator(p) for p in params]).token_ids
    assert torch.equal(ids, penalised.argmax(-1))  # the limit of such sampling: the most likely allowed token


def test_per_row_parameters():
    torch.manual_seed(4)
    logits = torch.randn(1, 200).expand(3, -1).clone()
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1, seed=0), SamplingParams(top_k=5, seed=1)]
    batch = SamplingBatch.from_params(params)
    gens = [make_generator(p) for p in params]
    top5 = set(logits[0].topk(5).indices.tolist())
    for _ in range(50):
        ids = sample(logits, batch, gens).token_ids
        assert ids[0] == logits[0].argmax() and ids[1] == logits[0].argmax() and int(ids[2]) in top5


def test_logprobs_are_the_models_own():
    torch.manual_seed(5)
    logits = torch.randn(2, 50)
    out = sample(logits, SamplingBatch.from_params([SamplingParams(temperature=0, logprobs=3)] * 2))
    ref = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.token_ids[:, None])[:, 0])
    assert torch.equal(out.top_ids, ref.topk(3).indices) and torch.allclose(out.top_logprobs, ref.topk(3).values)


# --- penalties -----------------------------------------------------------------------------------
def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = count_tokens([[0, 1, 0]], 4)
    assert counts.tolist() == [[2, 1, 0, 0]]
    prompt = count_tokens([[2]], 4) > 0
    batch = SamplingBatch.from_params([SamplingParams(repetition_penalty=2.0)])
    assert apply_penalties(logits, batch, counts, prompt).tolist() == [[1.0, -4.0, 0.5, 0.5]]
    batch = SamplingBatch.from_params([SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)])
    assert apply_penalties(logits, batch, counts, prompt).tolist() == [[2.0 - 0.5 - 0.5, -2.0 - 0.5 - 0.25, 1.0, 0.5]]
    add_tokens(counts, torch.tensor([3]))
    assert counts.tolist() == [[2, 1, 0, 1]]
    assert apply_penalties(logits, SamplingBatch.from_params([SamplingParams()]), counts) is logits  # nothing to do


# --- detokenizer ---------------------------------------------------------------------------------
@pytest.fixture
def tok(smol_tokenizer):
    return smol_tokenizer  # the bundled SmolLM2 byte-level BPE (conftest.py)


TEXT = "Héllo wörld, 日本語のテキスト 🎉🎉 naïve café. STOP now. END"


def run_detok(tok, ids, **kw):
    det = IncrementalDetokenizer(tok, **kw)
    pieces = []
    for t in ids:
        pieces.append(det.push(t))
        if det.stopped:
            break
    pieces.append(det.flush())
    return det, pieces


def test_pieces_are_whole_characters_and_join_to_the_decoded_text(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some characters do span several tokens
    det, pieces = run_detok(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == TEXT == det.text
    for p in pieces:
        assert "\ufffd" not in p
        p.encode("utf-8")  # whole characters only


@pytest.mark.parametrize("stop", ["STOP", "語の", "🎉", "é.", " now"])
def test_stop_strings_cut_exactly(tok, stop):
    ids = tok.encode(TEXT, add_special_tokens=False)
    det, pieces = run_detok(tok, ids, stop=(stop, "never-there"))
    assert det.stopped and det.stop_string == stop
    assert "".join(pieces) == TEXT[: TEXT.index(stop)]


def test_text_that_might_start_a_stop_string_is_held_back_then_released(tok):
    ids = tok.encode("a b c STO", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, stop=("STOP",))
    out = "".join(det.push(t) for t in ids)
    assert out == "a b c " and not det.stopped  # " STO" might become "STOP"
    assert det.flush() == "STO"  # the end came: it was text after all


def test_random_ids_stream_the_same_text(tok):
    torch.manual_seed(6)
    ids = torch.randint(0, tok.vocab_size, (400,)).tolist()
    det, pieces = run_detok(tok, ids, skip_special_tokens=True)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
