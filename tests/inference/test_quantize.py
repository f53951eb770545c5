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


@pytest.mark.parametrize("in_features", [96, 8, 24])  # 8, 24: torch's kernel segfaults on them from two rows up
def test_int8_linear_matches_the_float_layer(in_features):
    torch.manual_seed(1)
    lin = nn.Linear(in_features, 40)
    q = Int8Linear(lin)
    x = torch.randn(3, 5, in_features)
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


# --- int4 ----------------------------------------------------------------------------------------
from lmforge.inference.quantize import Int4Linear, quantize_int4  # noqa: E402


def test_int4_groups_keep_min_and_max_and_err_at_most_half_a_step():
    torch.manual_seed(2)
    w = torch.randn(32, 96) * torch.logspace(-2, 1, 96)  # groups of very different ranges
    q, scale, zero = quantize_int4(w)
    assert q.dtype == torch.uint8 and int(q.max()) == 15 and int(q.min()) == 0 and scale.shape == (32, 3)
    deq = (q.float() - 8) * scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1)
    step = scale.repeat_interleave(32, 1)
    assert torch.all((deq - w).abs() <= step / 2 + 1e-6)  # per group of 32: one scale per row would fail
    g = w.view(32, 3, 32)
    torch.testing.assert_close(deq.view(32, 3, 32).amin(-1), g.amin(-1))
    torch.testing.assert_close(deq.view(32, 3, 32).amax(-1), g.amax(-1))


def test_int4_linear_is_the_dequantized_product():
    torch.manual_seed(3)
    lin = nn.Linear(128, 48)
    q = Int4Linear.from_linear(lin)
    x = torch.randn(2, 5, 128)
    out, ref = q(x), lin(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert (out - ref).norm() / ref.norm() < 0.1  # 4 bits: a few percent
    exact = torch.nn.functional.linear(x.bfloat16().float(), q.dequantized(), lin.bias)
    torch.testing.assert_close(out, exact, atol=3e-2, rtol=2e-2)


def test_to_dtype_keeps_the_kernels_scale_dtype():
    q = Int4Linear.from_linear(nn.Linear(64, 32))
    q.float()
    assert q.scales_and_zeros.dtype == torch.bfloat16 and q(torch.randn(1, 64)).dtype == torch.float32
    assert q.to(torch.bfloat16)(torch.randn(1, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_int4_model_keeps_the_head_int8_and_computes_with_its_dequantized_weights(tiny_chat):
    import copy

    _, model = tiny_chat
    q = quantize_model(model, "int4")
    kinds = {n: type(m).__name__ for n, m in q.named_modules() if isinstance(m, (Int4Linear, Int8Linear))}
    assert kinds.pop("lm_head") == "Int8Linear" and set(kinds.values()) == {"Int4Linear"} and len(kinds) == 8
    twin = copy.deepcopy(model)  # the float model with the weights the kernels multiply by
    twin.lm_head.weight = nn.Parameter(q.lm_head.dequantized())
    for name, m in q.named_modules():
        if isinstance(m, Int4Linear):
            twin.get_submodule(name).weight.data.copy_(m.dequantized())
    ids = torch.tensor([[5, 17, 42, 8, 3, 9, 1, 200, 1000]])
    with torch.no_grad():
        got, want = q(ids), twin(ids)
    assert (got - want).norm() / want.norm() < 0.02  # bfloat16 activations are the only difference


def test_int4_on_shapes_the_kernel_cannot_take_names_the_int8_fallback():
    from lmforge import ModelConfig, build_model

    cfg = ModelConfig.from_name("smollm2-135m", n_layer=1, n_embd=48, n_head=4, n_kv_head=2, d_ff=64, vocab_size=100, max_seq_len=32)
    model = build_model(cfg).eval()
    with pytest.warns(UserWarning, match=r"in_features divisible by 32.*fall back to int8") as record:
        q = quantize_model(model, "int4")
    assert len(record) == 1 and "100x48" not in str(record[0].message)  # one sentence for the whole model
    assert "96x48" in str(record[0].message)  # the fused QKV: 48 inputs (the head is int8 anyway: not listed)
    assert isinstance(q.stack.layers[0].attn.qkv, Int8Linear) and isinstance(q.stack.layers[0].mlp.down, Int4Linear)


def test_load_model_quantizes_a_float_checkpoint_on_load(tiny_chat):
    from lmforge import load_model
    from lmforge.checkpoints import CheckpointError

    path, model = tiny_chat
    q = load_model(path, quantize="int4", dtype="bf16")
    assert isinstance(q.stack.layers[0].mlp.up, Int4Linear) and isinstance(q.lm_head, Int8Linear)
    assert q.dtype == torch.bfloat16 and q.stack.layers[0].mlp.up.scales_and_zeros.dtype == torch.bfloat16
    assert not any(isinstance(m, (Int4Linear, Int8Linear)) for m in load_model(path).modules())  # auto: float stays float
    out = generate(q, None, [5, 17, 42], max_new_tokens=4, temperature=0)
    assert isinstance(out, str)
    with pytest.raises(CheckpointError, match="auto, none, int8, int4"):
        load_model(path, quantize="int3")
    with pytest.raises(CheckpointError, match="auto, fp32, bf16"):
        load_model(path, dtype="fp16")
