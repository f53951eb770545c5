"""Objectives are pure functions on token batches: masking rates, loss masks, span round trips."""

import pytest
import torch

from lmforge.data import (
    IGNORE_INDEX,
    DataError,
    SpecialIds,
    causal_lm,
    make_objective,
    masked_lm,
    noise_mask,
    prefix_lm,
    reconstruct_spans,
    span_corruption,
    span_corruption_lengths,
)

V = 1000
SPECIAL = (0, 1, 2)  # eos, pad, mask in these tests
MASK = 2


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_causal_lm_shifts_by_one():
    t = torch.arange(20).view(2, 10)
    b = causal_lm(t)
    assert b["input_ids"].tolist() == t[:, :-1].tolist() and b["labels"].tolist() == t[:, 1:].tolist()


def test_masked_lm_rates_and_specials():
    tokens = torch.randint(3, V, (256, 512), generator=g(1))
    tokens[:, ::7] = 0  # specials sprinkled in: never chosen
    tokens[:, 3::11] = 1
    b = masked_lm(tokens, mask_id=MASK, vocab_size=V, special_ids=SPECIAL, mask_prob=0.15, generator=g(2))
    inputs, labels = b["input_ids"], b["labels"]
    special = torch.isin(tokens, torch.tensor(SPECIAL))
    chosen = labels != IGNORE_INDEX
    assert not (chosen & special).any()
    assert (inputs[special] == tokens[special]).all()  # specials are never replaced either
    rate = chosen.sum() / (~special).sum()
    assert abs(rate.item() - 0.15) < 0.005
    assert (labels[chosen] == tokens[chosen]).all()
    masked = (inputs == MASK) & chosen
    changed = (inputs != tokens) & (inputs != MASK)
    kept = (inputs == tokens) & chosen
    n = chosen.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.015
    assert abs(changed.sum().item() / n - 0.1) < 0.012
    assert abs(kept.sum().item() / n - 0.1) < 0.012
    assert not torch.isin(inputs[changed], torch.tensor(SPECIAL)).any()  # random tokens are never special
    assert ((inputs != tokens) <= chosen).all()  # nothing outside the chosen positions changes
    again = masked_lm(tokens, mask_id=MASK, vocab_size=V, special_ids=SPECIAL, generator=g(2))
    assert torch.equal(again["input_ids"], inputs) and torch.equal(again["labels"], labels)


def test_prefix_lm_loss_mask():
    tokens = torch.randint(0, V, (256, 33), generator=g(3))
    b = prefix_lm(tokens, generator=g(4))
    p, labels = b["prefix_len"], b["labels"]
    T = 32
    assert p.min() >= 1 and p.max() <= T - 1 and len(p.unique()) > 20
    for row in range(256):
        k = p[row].item()
        assert (labels[row, : k - 1] == IGNORE_INDEX).all()  # no loss inside the prefix ...
        assert labels[row, k - 1 :].tolist() == tokens[row, k:].tolist()  # ... all of it on the rest


def test_prefix_lm_attention_sees_the_prefix_both_ways_and_never_its_target():
    from lmforge.config import ModelConfig
    from lmforge.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, n_layer=2, n_embd=32, n_head=4, max_seq_len=16)).eval()
    tokens = torch.randint(0, 50, (1, 17), generator=g(5))
    b = prefix_lm(tokens, generator=g(6))
    b["prefix_len"] = torch.tensor([6])
    with torch.no_grad():
        base = model(b["input_ids"], prefix_len=b["prefix_len"])
        for i in range(5, 16):  # each labelled position predicts input i+1: changing it must not move logits[i]
            x = b["input_ids"].clone()
            if i + 1 < 16:
                x[0, i + 1] = (x[0, i + 1] + 1) % 50
                out = model(x, prefix_len=b["prefix_len"])
                assert torch.allclose(out[0, : i + 1], base[0, : i + 1], atol=1e-6)
        x = b["input_ids"].clone()
        x[0, 5] = (x[0, 5] + 1) % 50  # last prefix token: seen by the first position (bidirectional)
        assert not torch.allclose(model(x, prefix_len=b["prefix_len"])[0, 0], base[0, 0])


def test_noise_mask_matches_t5():
    for seed in range(20):
        m = noise_mask(100, 0.15, 3.0, g(seed))
        assert m.sum() == 15 and not m[0] and m[-1]  # clean first, noise last
        starts = (m & ~torch.cat([torch.tensor([False]), m[:-1]])).sum()
        assert starts == 5  # round(15 / 3) spans


def test_span_corruption_round_trip_and_lengths():
    sentinels = list(range(V - 1, V - 101, -1))
    raw, target_len = span_corruption_lengths(128, 0.15, 3.0)
    tokens = torch.randint(3, 800, (32, raw), generator=g(7))
    tokens[:, 10] = 0  # an EOS (document boundary) inside the window is an ordinary token here
    b = span_corruption(tokens, sentinel_ids=sentinels, eos_id=0, decoder_start_id=1, generator=g(8))
    assert b["input_ids"].shape == (32, 128) and b["labels"].shape == (32, target_len)
    assert (b["input_ids"][:, -1] == 0).all() and (b["labels"][:, -1] == 0).all()
    assert (b["decoder_input_ids"][:, 0] == 1).all()
    assert torch.equal(b["decoder_input_ids"][:, 1:], b["labels"][:, :-1])
    noise = 0
    for row in range(32):
        inp, lab = b["input_ids"][row].tolist(), b["labels"][row].tolist()
        assert reconstruct_spans(inp, lab, sentinels, 0) == tokens[row].tolist()
        used = [t for t in inp if t in sentinels]
        assert used == sentinels[: len(used)]  # <extra_id_0>, <extra_id_1>, ... in order
        noise += len(lab) - 1 - len(used)
    assert abs(noise / (32 * raw) - 0.15) < 0.01


def test_make_objective_names_what_the_tokenizer_lacks():
    none = SpecialIds(eos=None, pad=None, mask=None, bos=None, sentinels=(), all=())
    with pytest.raises(DataError, match="mask token"):
        make_objective("mlm", 32, none, V)
    with pytest.raises(DataError, match="sentinel"):
        make_objective("span", 32, none, V)
    with pytest.raises(DataError, match="not supported"):
        make_objective("denoise", 32, none, V)
    obj = make_objective("span", 64, SpecialIds(eos=0, pad=1, mask=2, bos=None, sentinels=(9, 8, 7, 6, 5, 4), all=(0, 1, 2)), V)
    assert obj.window > 64 and obj(torch.randint(10, V, (2, obj.window)), g())["input_ids"].shape == (2, 64)
