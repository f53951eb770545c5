"""Position encodings against their definitions and against transformers' implementations."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.config import ConfigError, ModelConfig
from lmforge.nn.positions import alibi_slopes, apply_rope, rope_frequencies, sinusoidal_table, t5_bucket


def test_sinusoidal_matches_the_paper():
    table = sinusoidal_table(50, 16)
    p, i = 37, 3
    assert table[p, 2 * i] == pytest.approx(math.sin(p / 10000 ** (2 * i / 16)), abs=1e-6)
    assert table[p, 2 * i + 1] == pytest.approx(math.cos(p / 10000 ** (2 * i / 16)), abs=1e-6)


def test_rope_preserves_norm_and_encodes_relative_position():
    cfg = ModelConfig(position="rope", n_embd=32, n_head=2, max_seq_len=64)
    from lmforge.nn.positions import RotaryEmbedding

    rope = RotaryEmbedding(cfg)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def rot(x, p):
        cos, sin = rope(torch.tensor([[p]]))
        return apply_rope(x, cos, sin)

    torch.testing.assert_close(rot(q, 9).norm(), q.norm())
    # <R_m q, R_n k> depends only on m - n
    a = (rot(q, 10) * rot(k, 7)).sum()
    b = (rot(q, 33) * rot(k, 30)).sum()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


HF_CASES = {
    "default": ({}, None),
    "linear": ({"rope_type": "linear", "factor": 4.0}, {"type": "linear", "factor": 4.0}),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
             {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}),
    "yarn-mscale": ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "mscale": 1.0,
                     "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2},
                    {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "mscale": 1.0,
                     "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2}),
    "yarn-untruncated": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "truncate": False},
                         {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "truncate": False}),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192},
               {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_rope_scalings_match_transformers(case):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_params, ours = HF_CASES[case]
    hf_cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=2048,
                                      rope_parameters={"rope_theta": 10000.0, "rope_type": "default", **hf_params})
    kind = hf_params.get("rope_type", "default")
    if kind == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        inv_hf, factor_hf = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    else:
        inv_hf, factor_hf = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu")
    cfg = ModelConfig(position="rope", n_embd=256, n_head=4, max_seq_len=2048, rope_scaling=ours)
    inv, factor = rope_frequencies(cfg)
    torch.testing.assert_close(inv, inv_hf.float(), atol=1e-7, rtol=1e-5)
    assert factor == pytest.approx(factor_hf)


def test_ntk_scaling_stretches_only_low_frequencies():
    base = ModelConfig(position="rope", n_embd=128, n_head=2, max_seq_len=256)
    ntk = base.replace(rope_scaling={"type": "ntk", "factor": 4.0})
    f0, _ = rope_frequencies(base)
    f1, _ = rope_frequencies(ntk)
    assert f1[0] == f0[0]  # the highest frequency is kept
    assert f1[-1].item() == pytest.approx(f0[-1].item() / 4.0, rel=1e-4)  # the lowest is interpolated by the factor
    assert (f1 <= f0).all()


def test_t5_buckets_match_transformers():
    pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        hf = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
        assert torch.equal(t5_bucket(rel, bidirectional, 32, 128), hf)


def test_alibi_slopes():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2 ** -(i + 1) for i in range(8)]).float())
    s = alibi_slopes(12)  # not a power of two: 8 geometric + 4 interleaved from the 16-head series
    assert len(s) == 12 and torch.allclose(s[:8], alibi_slopes(8))


def test_unknown_scaling_is_a_clear_error():
    with pytest.raises(ConfigError, match="not supported"):
        ModelConfig(position="rope", rope_scaling={"type": "longrope", "factor": 2.0})


def test_ntk_matches_transformers_dynamic_ntk_where_they_coincide():
    """HF's dynamic NTK rescales the base by (factor * T / T0 - (factor - 1))^(d/(d-2)); at T = T0 (2f-1)/f
    that is factor^(d/(d-2)), the static NTK-aware base used here."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    factor, t0 = 4.0, 2048
    hf_cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=t0,
                                      rope_parameters={"rope_theta": 10000.0, "rope_type": "dynamic", "factor": factor})
    inv_hf, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_cfg, "cpu", seq_len=int(t0 * (2 * factor - 1) / factor))
    cfg = ModelConfig(position="rope", n_embd=256, n_head=4, max_seq_len=t0, rope_scaling={"type": "ntk", "factor": factor})
    inv, attention_factor = rope_frequencies(cfg)
    torch.testing.assert_close(inv, inv_hf.float(), atol=1e-7, rtol=1e-5)
    assert attention_factor == 1.0
