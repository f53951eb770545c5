"""Lanes on the engine's paged pool: the same logits as the contiguous cache through prefill, extend
(one token and several), rewind and reorder; forked lanes copy a shared block before writing into it;
every block goes back; beam search and speculative decoding run on them (their tokens against
transformers and the target alone: tests/inference/test_generate.py)."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.engine import Engine, EngineConfig
from lmforge.engine.lanes import Lanes, PoolFullError
from lmforge.engine.runner import DecoderRunner
from lmforge.inference import Generator, SamplingParams
from lmforge.models import build_model


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    pass


def tiny(arch: str = "smollm2-135m", **over):
    torch.manual_seed(0)
    sizes = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, d_ff=64, vocab_size=100, max_seq_len=128)
    cfg = ModelConfig.from_name(arch, **sizes | over)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def engine_of(model, num_blocks: int = 64, block_size: int = 4) -> Engine:
    return Engine(model, None, EngineConfig(num_blocks=num_blocks, block_size=block_size))


PROMPTS = [[5, 17, 42, 8, 9, 11], [3, 1, 4]]


def test_lanes_give_the_contiguous_caches_logits():
    model = tiny()
    engine = engine_of(model)
    lanes = Lanes.of_engine(engine, PROMPTS)
    ref = DecoderRunner(model, PROMPTS, 20)
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # noqa: E731
    close(lanes.prefill(), ref.prefill())
    close(lanes.extend(torch.tensor([[7], [9]])), ref.extend(torch.tensor([[7], [9]])))
    fed = torch.tensor([[1, 2, 3], [4, 5, 6]])
    close(lanes.extend(fed, all_logits=True), ref.extend(fed, all_logits=True))  # several tokens, every logit
    lanes.rewind(2), ref.rewind(2)
    close(lanes.extend(torch.tensor([[8, 8]])[[0, 0]]), ref.extend(torch.tensor([[8, 8]])[[0, 0]]))
    index = torch.tensor([1, 1])  # both lanes become lane 1: they share every block
    lanes.reorder(index), ref.reorder(index)
    close(lanes.extend(torch.tensor([[2], [3]])), ref.extend(torch.tensor([[2], [3]])))
    ref.close()
    lanes.close()
    assert engine.blocks.num_free == engine.blocks.num_blocks  # every block went back


def test_a_forked_lane_copies_a_shared_block_before_writing():
    model = tiny()
    engine = engine_of(model, block_size=4)
    lanes = Lanes.of_engine(engine, [PROMPTS[0]], copies=3)  # 6 tokens: one full block, one half full
    lanes.prefill()
    assert len({tuple(t) for t in lanes.tables}) == 1  # the copies share the prompt's blocks
    assert engine.blocks.num_used == 2
    out = lanes.extend(torch.tensor([[10], [20], [30]]))
    full, partial = zip(*[(t[0], t[1]) for t in lanes.tables])
    assert len(set(full)) == 1 and len(set(partial)) == 3  # the full block stays shared; the written one is copied
    for i, tok in enumerate((10, 20, 30)):  # each lane as if it had been alone
        alone = Lanes.of_engine(engine, [PROMPTS[0] + [tok]])
        torch.testing.assert_close(out[i], alone.prefill()[0], atol=1e-4, rtol=1e-4)
        alone.close()
    lanes.close()
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_lanes_say_when_the_pool_is_full():
    engine = engine_of(tiny(), num_blocks=32, block_size=4)  # 128 tokens: one full context
    lanes = Lanes.of_engine(engine, [list(range(1, 41))], copies=4)
    lanes.prefill()
    with pytest.raises(PoolFullError, match="KV pool .* is full"):
        for _ in range(40):
            lanes.extend(torch.tensor([[1]] * 4))
    lanes.close()
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_beam_search_and_speculative_decoding_run_on_the_generators_engine(monkeypatch):
    model = tiny()
    gen = Generator(model, draft_model=tiny(n_layer=1))
    used = []
    real = Lanes.of_engine.__func__
    monkeypatch.setattr(Lanes, "of_engine", classmethod(lambda cls, *a, **k: used.append(1) or real(cls, *a, **k)))
    beams = gen.complete([1, 2, 3], max_new_tokens=12, temperature=0, num_beams=3, n=2, ignore_eos=True)
    off = gen.complete([1, 2, 3], max_new_tokens=12, temperature=0, num_beams=3, n=2, ignore_eos=True, use_cache=False)
    assert [c.token_ids for c in beams] == [c.token_ids for c in off]
    params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    spec = gen.run([[1, 2, 3]], params).finish()
    assert spec.completions[0].token_ids == Generator(model).run([[1, 2, 3]], params).finish().completions[0].token_ids
    assert spec.draft_stats["target_passes"] < 30
    assert len(used) == 2  # the beams and the speculative target ran on the engine's pool
    assert gen.engine.blocks.num_free == gen.engine.blocks.num_blocks
