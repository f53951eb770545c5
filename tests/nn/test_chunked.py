"""Chunked (online-softmax) attention equals the reference formula and SDPA, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ConfigError, ModelConfig
from lmforge.models import build_model
from lmforge.nn.attention import attend, build_mask, reference_attention
from lmforge.nn.chunked import AttentionInputError, chunked_attention, merge_partials

TOL = dict(atol=1e-5, rtol=1e-5)


def _qkv(B=2, H=4, Hkv=2, Tq=37, Tk=None, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tk = Tk or Tq
    make = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    return make(B, H, Tq, D), make(B, Hkv, Tk, D), make(B, Hkv, Tk, D)


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, inputs, g)


def _padding(B, T):
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :5] = False  # left padding
    valid[1, T - 7 :] = False  # right padding
    return valid


CASES = {
    "causal": dict(is_causal=True),
    "full": dict(),
    "padded-causal": dict(is_causal=True, key_valid="pad"),
    "padded-bidirectional": dict(key_valid="pad"),
    "sliding-window": dict(is_causal=True, window=6),
    "window-and-padding": dict(is_causal=True, window=9, key_valid="pad"),
}


@pytest.mark.parametrize("hkv", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("case", list(CASES))
def test_equals_reference_and_sdpa_forward_and_gradients(case, hkv):
    kw = dict(CASES[case])
    q, k, v = _qkv(Hkv=hkv)
    B, T = q.shape[0], q.shape[2]
    if kw.get("key_valid") == "pad":
        kw["key_valid"] = _padding(B, T)
    mask = build_mask(torch.arange(T), torch.arange(T), causal=kw.get("is_causal", False),
                      key_valid=kw.get("key_valid"), window=kw.get("window"))  # fmt: skip
    ref = reference_attention(q, k, v, mask=mask)
    sdpa = attend(q, k, v, mask=mask, impl="sdpa")
    out = chunked_attention(q, k, v, block_q=8, block_k=5, **kw)  # tiles that divide nothing
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(out, sdpa, **TOL)
    for a, b, c in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v)), _grads(sdpa, (q, k, v))):
        torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(a, c, **TOL)


def test_dense_mask_and_prefill_against_a_longer_cache():
    """Tq < Tk (queries are the last positions, as when a prompt extends a cache), a dense mask."""
    q, k, v = _qkv(Tq=9, Tk=30)
    mask = torch.rand(2, 1, 9, 30, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[..., -1] = True
    for kw in (dict(mask=mask), dict(is_causal=True), dict(is_causal=True, window=12)):
        qp, kp = torch.arange(21, 30), torch.arange(30)
        m = kw.get("mask")
        if m is None:
            m = build_mask(qp, kp, causal=True, window=kw.get("window"))
        ref = reference_attention(q, k, v, mask=m)
        out = chunked_attention(q, k, v, block_q=4, block_k=7, **kw)
        torch.testing.assert_close(out, ref, **TOL)
        for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
            torch.testing.assert_close(a, b, **TOL)


def test_sdpa_cpu_flash_kernel_at_a_longer_length():
    """Several full tiles with the default tile sizes, against SDPA's causal kernel (no mask tensor)."""
    with torch.no_grad():
        q, k, v = (t.detach() for t in _qkv(B=1, H=2, Hkv=2, Tq=1500, D=32))
        torch.testing.assert_close(chunked_attention(q, k, v, is_causal=True, block_q=512, block_k=256),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=True), **TOL)  # fmt: skip


def test_lse_merges_disjoint_key_sets():
    q, k, v = (t.detach() for t in _qkv(Hkv=4))
    o1, l1 = chunked_attention(q, k[:, :, :20], v[:, :, :20], return_lse=True)
    o2, l2 = chunked_attention(q, k[:, :, 20:], v[:, :, 20:], return_lse=True)
    merged, _ = merge_partials(o1, l1, o2, l2)
    torch.testing.assert_close(merged, reference_attention(q, k, v), **TOL)


def test_gradients_flow_through_the_lse_of_merged_parts():
    q, k, v = _qkv(Hkv=2)
    o1, l1 = chunked_attention(q, k[:, :, :20], v[:, :, :20], return_lse=True, block_k=6)
    o2, l2 = chunked_attention(q, k[:, :, 20:], v[:, :, 20:], return_lse=True, block_q=5)
    merged, lse = merge_partials(o1, l1, o2, l2)
    ref = reference_attention(q, k, v)
    ref_lse = torch.logsumexp((q @ k.repeat_interleave(2, 1).transpose(-2, -1)) * 16**-0.5, dim=-1)
    torch.testing.assert_close(lse, ref_lse, **TOL)
    loss, ref_loss = (merged * 1.5).sum() + lse.sum(), (ref * 1.5).sum() + ref_lse.sum()
    for a, b in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(ref_loss, (q, k, v))):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("hkv", [4, 2])  # q, k, v are strided views of the fused projection
def test_model_with_chunked_attention_equals_sdpa_model(hkv):
    base = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=hkv, d_ff=64, vocab_size=100, max_seq_len=64)
    torch.manual_seed(0)
    sdpa = build_model(ModelConfig.from_name("smollm2-135m", **base))
    chunked = build_model(ModelConfig.from_name("smollm2-135m", **base, attn_impl="chunked"))
    chunked.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 100, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :6] = 0
    for kwargs in (dict(), dict(attention_mask=mask)):
        a, b = sdpa(ids, **kwargs), chunked(ids, **kwargs)
        torch.testing.assert_close(b, a, **TOL)
        ga = torch.autograd.grad(a.square().mean(), list(sdpa.parameters()))
        gb = torch.autograd.grad(b.square().mean(), list(chunked.parameters()))
        for x, y in zip(gb, ga):
            torch.testing.assert_close(x, y, **TOL)


def test_bad_input_is_one_sentence():
    q, k, v = (t.detach() for t in _qkv())
    with pytest.raises(AttentionInputError, match="window=37 is not smaller than the sequence"):
        chunked_attention(q, k, v, is_causal=True, window=37)
    with pytest.raises(AttentionInputError, match="must be positive tile sizes"):
        chunked_attention(q, k, v, block_q=0)
    with pytest.raises(AttentionInputError, match="multiple of Hkv"):
        chunked_attention(q, k[:, :1].expand(2, 3, 37, 16), v[:, :1].expand(2, 3, 37, 16))
    with pytest.raises(ConfigError, match="cannot add the alibi position bias"):
        ModelConfig(position="alibi", attn_impl="chunked", n_layer=1, n_embd=16, n_head=2)
