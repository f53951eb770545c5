"""Reference attention == SDPA; masks keep their promises; the KV cache changes nothing."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.models import build_model
from lmforge.nn.attention import attend, build_mask, causal_mask, reference_attention

torch.manual_seed(0)


def _qkv(B=2, H=4, Hkv=2, T=7, S=None, D=8):
    S = S or T
    return torch.randn(B, H, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)


@pytest.mark.parametrize("hkv", [4, 2, 1])  # MHA, GQA, MQA
def test_reference_equals_sdpa(hkv):
    q, k, v = _qkv(Hkv=hkv)
    for kwargs in (dict(), dict(is_causal=True), dict(mask=causal_mask(7, 7)), dict(scale=1.0),
                   dict(bias=torch.randn(1, 4, 7, 7)), dict(bias=torch.randn(1, 4, 7, 7), mask=causal_mask(7, 7))):
        ref = reference_attention(q, k, v, **kwargs)
        fast = attend(q, k, v, impl="sdpa", **kwargs)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_reference_is_the_textbook_formula():
    q, k, v = _qkv(Hkv=4)
    d = q.shape[-1]
    expected = torch.softmax(q @ k.transpose(-2, -1) / d**0.5, dim=-1) @ v
    torch.testing.assert_close(reference_attention(q, k, v), expected)


def test_causal_mask_has_no_future():
    m = build_mask(torch.arange(5), torch.arange(5), causal=True)[0, 0]
    assert torch.equal(m, torch.ones(5, 5, dtype=torch.bool).tril())


def test_prefix_lm_mask_sees_prefix_both_ways():
    m = build_mask(torch.arange(6), torch.arange(6), causal=True, prefix_len=torch.tensor([3]))[0, 0]
    assert m[:3, :3].all()  # the prefix attends to itself bidirectionally
    assert m[0, 2] and not m[3, 4] and not m[2, 3]  # ... but nothing sees the future beyond it
    assert torch.equal(m[3:, 3:], torch.ones(3, 3, dtype=torch.bool).tril())


def test_sliding_window_mask():
    m = build_mask(torch.arange(6), torch.arange(6), causal=True, window=2)[0, 0]
    for i in range(6):
        assert m[i].nonzero().flatten().tolist() == [j for j in range(6) if i - 2 < j <= i]


def _tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=50, n_layer=2, n_embd=32, n_head=4, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


DECODERS = {
    "gpt2": dict(),
    "llama-gqa": dict(position="rope", norm="rmsnorm", ffn="glu", activation="silu", n_kv_head=2, qkv_bias=False),
    "mistral-window": dict(position="rope", norm="rmsnorm", ffn="glu", activation="silu", n_kv_head=1, sliding_window=3),
    "alibi": dict(position="alibi"),
    "sinusoidal-postnorm": dict(position="sinusoidal", norm_placement="post", final_norm=False),
    "rope-yarn": dict(position="rope", rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}),
    "rope-partial": dict(position="rope", rotary_dim=4),
}


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_future_tokens_do_not_leak(name, impl):
    model = build_model(_tiny(attn_impl=impl, **DECODERS[name])).eval()
    ids = torch.randint(0, 50, (1, 10))
    other = ids.clone()
    other[0, 6:] = torch.randint(0, 50, (4,))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :6], model(other)[:, :6])


@pytest.mark.parametrize("name", DECODERS)
def test_reference_and_sdpa_models_agree(name):
    model = build_model(_tiny(**DECODERS[name])).eval()
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        fast = model(ids)
        for m in model.modules():
            if hasattr(m, "impl"):
                m.impl = "reference"
        torch.testing.assert_close(model(ids), fast, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", DECODERS)
def test_cache_on_equals_cache_off(name):
    model = build_model(_tiny(**DECODERS[name])).eval()
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(2, 20)
        step = [model(ids[:, :5], input_pos=torch.arange(5))]  # prefill
        for t in range(5, 12):  # then one token at a time
            step.append(model(ids[:, t : t + 1], input_pos=torch.tensor([t])))
        model.clear_cache()
    torch.testing.assert_close(torch.cat(step, dim=1), full, atol=1e-5, rtol=1e-5)


def test_padding_changes_nothing_for_real_tokens():
    # Left padding for a decoder (positions from the mask), right padding for an encoder.
    dec = build_model(_tiny(**DECODERS["llama-gqa"])).eval()
    ids = torch.randint(1, 50, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], dim=1).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        torch.testing.assert_close(dec(padded, attention_mask=mask, position_ids=pos)[:, 3:], dec(ids), atol=1e-5, rtol=1e-5)

    enc = build_model(_tiny(arch="encoder", norm_placement="post", final_norm=False, embedding_norm=True)).eval()
    right = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    rmask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], dim=1).long()
    with torch.no_grad():
        torch.testing.assert_close(enc(right, attention_mask=rmask)[:, :6], enc(ids), atol=1e-5, rtol=1e-5)


def test_padding_in_a_batch_leaves_no_nans():
    model = build_model(_tiny()).eval()
    ids = torch.randint(0, 50, (2, 5))
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        assert torch.isfinite(model(ids, attention_mask=mask)).all()


def test_prefix_lm_model_is_bidirectional_over_the_prefix():
    model = build_model(_tiny()).eval()
    ids = torch.randint(0, 50, (1, 8))
    changed = ids.clone()
    changed[0, 3] = (ids[0, 3] + 1) % 50
    plen = torch.tensor([4])
    with torch.no_grad():
        a, b = model(ids, prefix_len=plen), model(changed, prefix_len=plen)
    assert not torch.allclose(a[:, 0], b[:, 0])  # position 0 sees position 3 inside the prefix
    c, d = model(ids), model(changed)
    torch.testing.assert_close(c[:, :3], d[:, :3])  # plain causal: it does not


def test_encoder_decoder_cache_on_equals_cache_off():
    for kw in (dict(position="t5", norm="rmsnorm", attn_scale=1.0, qkv_bias=False, logit_scale=32**-0.5),
               dict(position="sinusoidal", norm_placement="post", final_norm=False, embed_scale=32**0.5)):
        model = build_model(_tiny(arch="encoder-decoder", n_decoder_layer=3, **kw)).eval()
        src, tgt = torch.randint(0, 50, (2, 9)), torch.randint(0, 50, (2, 7))
        smask = torch.ones_like(src)
        smask[1, 6:] = 0
        with torch.no_grad():
            full = model(src, attention_mask=smask, decoder_input_ids=tgt)
            memory = model.encode(src, smask)
            model.setup_cache(2, memory_len=9, max_len=16)
            steps = [model.decode(tgt[:, :1], memory, smask, input_pos=torch.tensor([0]))]
            for t in range(1, 7):
                steps.append(model.decode(tgt[:, t : t + 1], None, smask, input_pos=torch.tensor([t])))
            model.clear_cache()
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
