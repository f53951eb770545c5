"""Block-sparse attention equals dense attention under the same mask; bad patterns are refused."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ConfigError, ModelConfig
from lmforge.models import build_model
from lmforge.nn.attention import reference_attention
from lmforge.nn.chunked import AttentionInputError
from lmforge.nn.sparse import SparsePattern, sparse_attention, sparse_mask

TOL = dict(atol=1e-5, rtol=1e-5)

PATTERNS = {
    "local": dict(pattern="local", window=9, block=4),
    "local-bidirectional": dict(pattern="local", window=9, block=4, causal=False),
    "strided": dict(pattern="strided", stride=7, block=4),
    "fixed": dict(pattern="fixed", stride=8, summary=2, block=4),
    "longformer": dict(pattern="local", window=5, block=8, global_tokens=(0, 17)),
    "longformer-bidirectional": dict(pattern="local", window=5, block=3, causal=False, global_tokens=(0, 30)),
    "strided+global": dict(pattern="strided", stride=6, block=5, global_tokens=(3,)),
    "fixed+global": dict(pattern="fixed", stride=8, block=8, global_tokens=(0, 40)),
}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_equals_dense_attention_under_the_same_mask(name, padded):
    pat = SparsePattern(**PATTERNS[name])
    g = torch.Generator().manual_seed(0)
    T = 53
    q = torch.randn(2, 4, T, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, T, 8, generator=g, requires_grad=True)  # GQA: 2 query heads per K/V head
    v = torch.randn(2, 2, T, 8, generator=g, requires_grad=True)
    valid = None
    if padded:
        valid = torch.ones(2, T, dtype=torch.bool)
        valid[0, :5], valid[1, 40:] = False, False
    mask = sparse_mask(pat, T, valid)
    assert 0.05 < mask.float().mean() < 0.5  # the pattern really is sparse (and not empty)
    ref = reference_attention(q, k, v, mask=mask)
    out = sparse_attention(q, k, v, pat, key_valid=valid)
    torch.testing.assert_close(out, ref, **TOL)
    with torch.no_grad():  # inference runs in place, in reused buffers
        torch.testing.assert_close(sparse_attention(q, k, v, pat, key_valid=valid), ref, **TOL)
    grad = torch.randn(ref.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, **TOL)


def test_patterns_are_the_published_ones():
    T = 16
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    local = sparse_mask(SparsePattern("local", window=4, block=2), T)[0, 0]
    assert torch.equal(local, (i - j >= 0) & (i - j < 4))
    strided = sparse_mask(SparsePattern("strided", stride=4, block=2), T)[0, 0]
    assert torch.equal(strided, (j <= i) & ((i - j < 4) | ((i - j) % 4 == 0)))
    fixed = sparse_mask(SparsePattern("fixed", stride=4, summary=1, block=2), T)[0, 0]
    assert torch.equal(fixed, (j <= i) & ((i // 4 == j // 4) | (j % 4 == 3)))
    glob = sparse_mask(SparsePattern("local", window=2, block=2, global_tokens=(0, 5)), T)[0, 0]
    assert glob[:, 0].all() and glob[5, :6].all() and glob[9:, 5].all() and not glob[9, 3]


def test_skipped_blocks_cost_nothing():
    """Doubling the sequence doubles the work of a local pattern (dense attention would quadruple):
    counted as the multiply-adds of the matmuls the sparse path runs."""
    from torch.utils.flop_counter import FlopCounterMode

    pat = SparsePattern("local", window=64, block=32)

    def flops(T):
        q = torch.randn(1, 2, T, 16)
        with FlopCounterMode(display=False) as fc:
            sparse_attention(q, q, q, pat)
        return fc.get_total_flops()

    assert flops(2048) / flops(1024) < 2.05


def test_model_local_pattern_equals_sliding_window_model():
    base = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, d_ff=64, vocab_size=100, max_seq_len=96)
    torch.manual_seed(0)
    window = build_model(ModelConfig.from_name("smollm2-135m", **base, sliding_window=16))
    sparse = build_model(ModelConfig.from_name("smollm2-135m", **base, attention="sparse",
                                               attention_options={"pattern": "local", "window": 16, "block": 8}))  # fmt: skip
    sparse.load_state_dict(window.state_dict())
    ids = torch.randint(0, 100, (2, 90))
    a, b = window(ids), sparse(ids)
    torch.testing.assert_close(b, a, **TOL)
    ga = torch.autograd.grad(a.square().mean(), list(window.parameters()))
    gb = torch.autograd.grad(b.square().mean(), list(sparse.parameters()))
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, **TOL)


def test_bad_input_is_one_sentence():
    q = torch.randn(1, 2, 32, 8)
    with pytest.raises(AttentionInputError, match="window=32 is not smaller than the sequence"):
        sparse_attention(q, q, q, SparsePattern("local", window=32, block=8))
    with pytest.raises(AttentionInputError, match="block=24 does not divide the fixed pattern's stride=64"):
        SparsePattern("fixed", stride=64, block=24)
    with pytest.raises(AttentionInputError, match="unknown sparse pattern 'bigbird'; choose one of local, strided, fixed"):
        SparsePattern("bigbird")
    with pytest.raises(AttentionInputError, match="use pattern='local' for bidirectional"):
        SparsePattern("strided", causal=False)
    with pytest.raises(ConfigError, match="unknown sparse pattern 'dilated'"):
        ModelConfig(attention="sparse", attention_options={"pattern": "dilated"}, n_layer=1, n_embd=16, n_head=2)
    with pytest.raises(ConfigError, match="unknown sparse attention option"):
        ModelConfig(attention="sparse", attention_options={"windw": 8}, n_layer=1, n_embd=16, n_head=2)
    with pytest.raises(ConfigError, match="attention='sparse' replaces sliding_window"):
        ModelConfig(attention="sparse", sliding_window=8, n_layer=1, n_embd=16, n_head=2)
