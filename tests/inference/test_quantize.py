"""Weight-only int8: per-channel quantisation error, layers swapped, generation still sensible."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.inference import generate
from lmforge.inference.quantize import Int8Linear, QuantizeError, quantize_int8, quantize_model


def test_per_channel_int8_round_trip_error_is_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scales
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    err = (q.float() * scale[:, None] - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-7)  # per channel: a per-tensor scale would fail the small rows


def test_int8_linear_matches_the_float_layer():
    torch.manual_seed(1)
    lin = nn.Linear(96, 40)
    q = Int8Linear(lin)
    x = torch.randn(3, 5, 96)
    ref = lin(x)
    out = q(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    exact = torch.nn.functional.linear(x.bfloat16().float(), q.dequantized(), lin.bias)
    torch.testing.assert_close(out, exact, atol=2e-2, rtol=1e-2)  # it is the dequantised product


def test_quantize_model_swaps_every_linear_and_leaves_the_original(tiny_gpt2):
    _, model = tiny_gpt2
    q = quantize_model(model, "int8")
    assert not any(isinstance(m, nn.Linear) for m in q.modules())
    assert any(isinstance(m, nn.Linear) for m in model.modules())
    ids = torch.tensor([[5, 17, 42, 8, 3, 9, 1]])
    with torch.no_grad():
        a, b = model(ids).log_softmax(-1), q(ids).log_softmax(-1)
    kl = torch.nn.functional.kl_div(b, a, log_target=True, reduction="batchmean")
    assert kl < 0.05
    out = generate(model, None, [5, 17, 42], max_new_tokens=8, temperature=0, quantize="int8")
    assert isinstance(out, str)  # no tokenizer: empty text, but the run completes


def test_unknown_scheme_is_a_clear_error(tiny_gpt2):
    with pytest.raises(QuantizeError, match="int8"):
        quantize_model(tiny_gpt2[1], "int3")


def test_prepared_weights_follow_training(tiny_gpt2):
    """A quantised (or compiled) snapshot must not outlive the weights it was taken from."""
    import copy

    from lmforge.inference import Generator, StaleWeightsError, complete

    model = copy.deepcopy(tiny_gpt2[1])
    kw = dict(max_new_tokens=12, temperature=0, ignore_eos=True)
    before = complete(model, None, [5, 17, 42], quantize="int8", **kw).token_ids  # cached per model
    gen = Generator(model, quantize="int8")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)  # an in-place update, as an optimizer step makes
    with pytest.raises(StaleWeightsError, match="new Generator"):
        gen.complete([5, 17, 42], **kw)
    after = complete(model, None, [5, 17, 42], quantize="int8", **kw).token_ids  # the cache noticed
    assert after == Generator(model, quantize="int8").complete([5, 17, 42], **kw).token_ids
    assert after != before
