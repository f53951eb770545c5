"""Linear attention: parallel form == recurrent form; a constant-size decoding state; model wiring."""

from __future__ import annotations

import warnings

import pytest
import torch

from lmforge.config import ConfigError, ModelConfig
from lmforge.engine.runner import DecoderRunner
from lmforge.models import build_model
from lmforge.nn.attention import reference_attention
from lmforge.nn.chunked import AttentionInputError
from lmforge.nn.linear_attention import FeatureMap, LinearAttentionCache, linear_attention, linear_attention_step

TOL = dict(atol=1e-5, rtol=1e-5)


def _qkv(B=2, H=4, Hkv=2, T=37, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)


@pytest.mark.parametrize("chunk", [1, 8, 64])
@pytest.mark.parametrize("kind", ["elu", "favor"])
def test_parallel_equals_recurrent(kind, chunk):
    fm = FeatureMap(kind, 16, n_features=32, seed=0)
    q, k, v = _qkv()
    valid = torch.ones(2, 37, dtype=torch.bool)
    valid[0, :4] = False
    y, (S, z) = linear_attention(q, k, v, fm, key_valid=valid, chunk=chunk)
    state = (torch.zeros_like(S), torch.zeros_like(z))
    steps = []
    for t in range(37):
        yt, state = linear_attention_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], fm, state,
                                          key_valid=valid[:, t : t + 1])  # fmt: skip
        steps.append(yt)
    torch.testing.assert_close(torch.cat(steps, dim=2), y, **TOL)
    torch.testing.assert_close(state[0], S, **TOL)
    # and both are the quadratic formula with the kernel φ(q)·φ(k) in place of exp(q·k)
    fq, fk = fm(q, is_query=True), (fm(k) * valid[:, None, :, None]).repeat_interleave(2, dim=1)
    A = (fq @ fk.transpose(-2, -1)).tril()
    torch.testing.assert_close(y, (A @ v.repeat_interleave(2, dim=1)) / (A.sum(-1, keepdim=True) + 1e-6), **TOL)


def test_prefill_then_steps_continue_the_state():
    fm = FeatureMap("elu", 16)
    q, k, v = _qkv()
    full, _ = linear_attention(q, k, v, fm)
    head, state = linear_attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], fm, chunk=8)
    tail, _ = linear_attention(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], fm, state=state, chunk=8)
    torch.testing.assert_close(torch.cat([head, tail], dim=2), full, **TOL)


def test_favor_features_approximate_softmax_attention():
    """Positive random features estimate exp(q·k/√d): with many features the outputs approach softmax's."""
    q, k, v = (t * 0.5 for t in _qkv(Hkv=4, T=24, D=8))
    exact = reference_attention(q, k, v, is_causal=True)
    err = lambda m: (linear_attention(q, k, v, FeatureMap("favor", 8, n_features=m, seed=1))[0] - exact).abs().mean()  # noqa: E731
    assert err(4096) < 0.03 and err(4096) < err(16) / 3


def _tiny(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, d_ff=64, vocab_size=100, max_seq_len=128)
    return ModelConfig.from_name("smollm2-135m", **{**base, **kw})


@pytest.mark.parametrize("fmap", ["elu", "favor"])
def test_generation_through_the_state_equals_recomputing(fmap):
    torch.manual_seed(0)
    model = build_model(_tiny(attention="linear", attention_options={"feature_map": fmap})).eval()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]  # left padding on the second row
    with torch.no_grad():
        cached, plain = DecoderRunner(model, prompts, 8), DecoderRunner(model, prompts, 8, use_cache=False)
        a, b = cached.prefill(), plain.prefill()
        torch.testing.assert_close(a, b, **TOL)
        for _ in range(8):
            tok = a.argmax(-1, keepdim=True)
            a, b = cached.extend(tok), plain.extend(tok)
            torch.testing.assert_close(a, b, **TOL)
        # a second prompt through the same caches starts from an empty state
        again = DecoderRunner(model, prompts, 8)
        torch.testing.assert_close(again.prefill(), plain.__class__(model, prompts, 8, use_cache=False).prefill(), **TOL)


def test_decode_state_is_constant_in_size():
    model = build_model(_tiny(attention="linear")).eval()
    sizes = {}
    for max_len in (16, 128):
        model.setup_cache(2, max_len)
        caches = model.stack.caches
        assert all(isinstance(c, LinearAttentionCache) for c in caches)
        sizes[max_len] = sum(b.numel() for c in caches for b in c.buffers())
        with torch.no_grad():  # decoding many tokens changes the values, never the size
            for t in range(12):
                model.hidden(torch.tensor([[t], [t + 1]]), attention_mask=torch.ones(2, t + 1, dtype=torch.bool),
                             input_pos=torch.tensor([t]))  # fmt: skip
        assert sum(b.numel() for c in caches for b in c.buffers()) == sizes[max_len]
    assert sizes[16] == sizes[128] == 2 * (2 * 2 * (8 * 8 + 8) + 1)  # layers x (batch x KV heads x (F·D + F) + position)
    softmax = build_model(_tiny())
    softmax.setup_cache(2, 128)
    assert sum(b.numel() for c in softmax.stack.caches for b in c.buffers()) > 10 * sizes[128]


def test_the_state_cannot_rewind():
    fm = FeatureMap("elu", 16)
    cache = LinearAttentionCache(2, 2, 16, 16)
    q, k, v = _qkv(T=6)
    cache.attend(q[:, :, :5], k[:, :, :5], v[:, :, :5], fm, torch.arange(5))
    cache.attend(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], fm, torch.tensor([5]))
    with pytest.raises(AttentionInputError, match="cannot go back to 3 .speculative decoding rewinds."):
        cache.attend(q[:, :, 3:4], k[:, :, 3:4], v[:, :, 3:4], fm, torch.tensor([3]))
    cache.attend(q, k, v, fm, torch.arange(6))  # a new prompt from position 0 is always fine


def test_linear_model_trains_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = build_model(_tiny(attention="linear", attention_options={"feature_map": "favor", "n_features": 16}))
    ids = torch.randint(0, 100, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 100), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    from lmforge.checkpoints import load_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path)
    assert any("attention='linear' has no Hugging Face equivalent" in str(w.message) for w in caught)
    back = load_model(tmp_path).eval()
    model.eval()
    torch.testing.assert_close(back(ids), model(ids), **TOL)


def test_bad_options_are_one_sentence():
    with pytest.raises(ConfigError, match="unknown linear-attention feature map 'relu'; choose one of elu, favor"):
        _tiny(attention="linear", attention_options={"feature_map": "relu"})
    with pytest.raises(ConfigError, match="unknown linear attention option"):
        _tiny(attention="linear", attention_options={"features": 8})
    with pytest.raises(ConfigError, match="linear attention's chunk=0 must be a positive whole number"):
        _tiny(attention="linear", attention_options={"chunk": 0})
    with pytest.raises(ConfigError, match="is built for causal decoder models"):
        ModelConfig.from_name("bert-base", n_layer=1, attention="linear")
    with pytest.raises(ConfigError, match="attention_options apply to attention='sparse' or 'linear'"):
        _tiny(attention_options={"feature_map": "elu"})
