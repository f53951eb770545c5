"""KVCache.length: attending to the written slots only gives the logits of attending to the whole
buffer (whose unwritten slots the mask hides), for every family that has a decoder."""

from __future__ import annotations

import pytest
import torch

from lmforge import ModelConfig
from lmforge.models import build_model


def slots_read(cache) -> int:
    """How many slots attention gets from this cache (an update that writes nothing)."""
    b, h, _, d = cache.k.shape
    return cache.update(torch.arange(0), torch.zeros(b, h, 0, d), torch.zeros(b, h, 0, d))[0].shape[2]


@pytest.mark.parametrize("preset, over", [
    ("smollm2-135m", dict(n_kv_head=2)),  # RoPE, GQA
    ("gpt2", {}),  # learned positions
    ("mistral-7b", dict(sliding_window=3, n_kv_head=2)),  # sliding window
])  # fmt: skip
def test_reading_only_written_slots_changes_nothing(preset, over):
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
                if sliced:
                    for c in model.stack.caches:
                        c.length = t1
                x = ids if t0 == 0 else torch.randint(0, 50, (2, 1), generator=torch.Generator().manual_seed(t0))
                steps.append(model(x, attention_mask=valid, input_pos=torch.arange(t0, t1)))
                if sliced:
                    assert slots_read(model.stack.caches[0]) == t1  # the slicing is really in effect
        outs[sliced] = steps
        model.clear_cache()
    for full, part in zip(outs[False], outs[True]):
        torch.testing.assert_close(full, part, atol=1e-5, rtol=1e-5)


def test_t5_decoder_reads_only_written_self_attention_slots():
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
                if sliced:
                    for c in model.decoder.caches:
                        c.length = t + 1
                logits.append(model.decode(torch.tensor([[tok]]), memory if t == 0 else None, input_pos=torch.tensor([t])))
            outs[sliced] = torch.cat(logits, 1)
            model.clear_cache()
    torch.testing.assert_close(outs[False], outs[True], atol=1e-5, rtol=1e-5)
