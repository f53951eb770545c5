"""With a KV cache, attention reads the slots its mask covers: passing a mask over only the
written slots gives the logits of a mask over the whole buffer (whose unwritten slots the causal
rule hides), for every family that has a decoder, and attention really reads fewer keys."""

from __future__ import annotations

import pytest
import torch

import lmforge.nn.attention as attention
from lmforge import ModelConfig
from lmforge.models import build_model


@pytest.fixture
def keys_read(monkeypatch):
    """The number of keys each attention call got, in order."""
    seen, attend = [], attention.attend

    def spy(q, k, v, *args, **kwargs):
        seen.append(k.shape[2])
        return attend(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention, "attend", spy)
    return seen


@pytest.mark.parametrize("preset, over", [
    ("smollm2-135m", dict(n_kv_head=2)),  # RoPE, GQA
    ("gpt2", {}),  # learned positions
    ("mistral-7b", dict(sliding_window=3, n_kv_head=2)),  # sliding window
])  # fmt: skip
def test_reading_only_written_slots_changes_nothing(preset, over, keys_read):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(preset, n_layer=2, n_embd=32, n_head=4, d_ff=64, vocab_size=50, max_seq_len=64, **over)
    model = build_model(cfg).eval()
    ids = torch.randint(0, 50, (2, 6))
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :2] = False  # row 1 is left-padded
    outs = {}
    for sliced in (False, True):
        model.setup_cache(2, 20)
        steps = []
        with torch.no_grad():
            for t0, t1 in ((0, 6), (6, 7), (7, 8)):
                x = ids if t0 == 0 else torch.randint(0, 50, (2, 1), generator=torch.Generator().manual_seed(t0))
                del keys_read[:]
                steps.append(model(x, attention_mask=valid[:, :t1] if sliced else valid, input_pos=torch.arange(t0, t1)))
                assert keys_read == [t1 if sliced else 20] * cfg.n_layer
        outs[sliced] = steps
        model.clear_cache()
    for full, part in zip(outs[False], outs[True]):
        torch.testing.assert_close(full, part, atol=1e-5, rtol=1e-5)


def test_t5_decoder_reads_only_written_self_attention_slots(keys_read):
    torch.manual_seed(1)
    cfg = ModelConfig.from_name("t5-small", n_layer=2, n_embd=32, n_head=4, head_dim=8, d_ff=64, vocab_size=50)
    model = build_model(cfg).eval()
    src = torch.randint(0, 50, (1, 7))
    outs = {}
    with torch.no_grad():
        memory = model.encode(src)
        for sliced in (False, True):
            model.setup_cache(1, memory_len=7, max_len=16)
            logits = []
            for t, tok in enumerate([0, 5, 9, 3]):
                mask = torch.ones(1, t + 1 if sliced else 16, dtype=torch.bool)
                del keys_read[:]
                step = model.decode(torch.tensor([[tok]]), memory if t == 0 else None, None, mask, input_pos=torch.tensor([t]))
                assert keys_read[::2] == [t + 1 if sliced else 16] * cfg.n_decoder_layer  # self-attention
                assert keys_read[1::2] == [7] * cfg.n_decoder_layer  # cross-attention: the whole memory
                logits.append(step)
            outs[sliced] = torch.cat(logits, 1)
            model.clear_cache()
    torch.testing.assert_close(outs[False], outs[True], atol=1e-5, rtol=1e-5)
