"""GGUF Q4_0 / Q4_1 / Q8_0 weights loaded into the int4 / int8 kernels as stored: the unpacked
blocks equal gguf's own dequantize, and the models equal the dequantized ones up to bfloat16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_gguf import _tiny, _write_gguf

from lmforge import load_model
from lmforge.checkpoints.gguf import unpack_blocks
from lmforge.inference.quantize import Int4Linear

gguf = pytest.importorskip("gguf")


pytestmark = pytest.mark.usefixtures("one_thread")


def _quantized(kind: str, shape=(48, 96), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """(raw GGUF rows, gguf's dequantized float32) of a random matrix in that type."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 2, (shape[0], 1)) + rng.uniform(-0.5, 0.5, (shape[0], 1))).astype(np.float32)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    raw = gguf.quants.quantize(w, qtype)
    return raw, gguf.quants.dequantize(raw, qtype)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_unpacked_blocks_equal_gguf_dequantize(kind):
    raw, ref = _quantized(kind)
    b = unpack_blocks(raw, kind)
    assert b.bits == (8 if kind == "Q8_0" else 4) and b.shape == ref.shape
    lo, hi = (-127, 127) if kind == "Q8_0" else (0, 15)
    assert lo <= int(b.q.min()) and int(b.q.max()) <= hi
    torch.testing.assert_close(b.dequantize(), torch.from_numpy(ref), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_int4_kernel_on_gguf_blocks_is_gguf_dequantize(kind):
    """The kernel computes x @ W^T with W = gguf's dequantized weight: exactly with float32
    scales, and to bfloat16's rounding of the scales and zeros with the default bfloat16 ones."""
    raw, ref = _quantized(kind)
    W = torch.from_numpy(ref)
    exact = Int4Linear.from_blocks(unpack_blocks(raw, kind), act_dtype=torch.float32)
    torch.testing.assert_close(exact.dequantized(), W, atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 96)
    torch.testing.assert_close(exact(x), x @ W.T, atol=1e-4, rtol=1e-4)
    fast = Int4Linear.from_blocks(unpack_blocks(raw, kind))  # bfloat16 scales and activations
    rel = (fast.dequantized() - W).norm() / W.norm()
    assert rel < 5e-3, rel
    y = fast(x)
    assert y.dtype == torch.float32 and ((y - x @ W.T).norm() / (x @ W.T).norm()) < 1e-2


def _pair(tmp_path, arch, quant):
    path = tmp_path / f"{arch}-{quant}.gguf"
    _write_gguf(_tiny(arch), path, arch, quant=quant)
    return load_model(path), load_model(path, quantize="none")


def _kinds(model) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if n.endswith(("qkv", ".o", "up", "down", "lm_head"))}


@pytest.mark.parametrize("arch,quant", [("llama", "Q4_1"), ("llama", "Q4_0"), ("qwen2", "Q4_1")])
def test_4bit_gguf_loads_into_int4_layers_with_the_dequantized_weights(tmp_path, arch, quant):
    """Fused QKV (LLaMA's Q/K rows un-permuted) and gate/up blocks land in the right rows; the
    output head (tied for the Qwen2 model) is int8; the logits follow the dequantized model."""
    q, ref = _pair(tmp_path, arch, quant)
    kinds = _kinds(q)
    assert kinds.pop("lm_head") == "Int8Linear" and set(kinds.values()) == {"Int4Linear"}
    for name, m in q.named_modules():
        if isinstance(m, Int4Linear):
            w = ref.get_submodule(name).weight
            assert (m.dequantized() - w).norm() / w.norm() < 5e-3, name
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        a, b = q(ids), ref(ids)
    assert (a - b).norm() / b.norm() < 0.03
    if arch == "qwen2":  # tied: the float embedding stays, the head got its own int8 copy
        assert q.embed.tok.weight.dtype == torch.float32
        torch.testing.assert_close(q.embed.tok.weight, ref.embed.tok.weight)


def test_q8_gguf_runs_int8_and_explicit_schemes_override(tmp_path):
    path = tmp_path / "q8.gguf"
    _write_gguf(_tiny("llama"), path, "llama", quant="Q8_0")
    assert set(_kinds(load_model(path)).values()) == {"Int8Linear"}
    int4 = _kinds(load_model(path, quantize="int4"))
    assert int4.pop("lm_head") == "Int8Linear" and set(int4.values()) == {"Int4Linear"}
    q41 = tmp_path / "q41.gguf"
    _write_gguf(_tiny("llama"), q41, "llama", quant="Q4_1")
    assert set(_kinds(load_model(q41, quantize="int8")).values()) == {"Int8Linear"}
    assert set(_kinds(load_model(q41, quantize="none")).values()) == {"Linear"}


def test_a_quantized_model_refuses_to_save(tmp_path):
    from lmforge.errors import CheckpointError

    q, _ = _pair(tmp_path, "llama", "Q4_1")
    with pytest.raises(CheckpointError, match="quantize='none'"):
        q.save_pretrained(tmp_path / "out")
