"""The serving engine's compiled decode step (``EngineConfig(compile=True)``): graphs built in a
background thread per batch bucket, decode-only steps switch to them once ready, and the text is
the eager engine's, token for token, for batches that are padded up to their bucket."""

import torch

from lmforge.config import ModelConfig
from lmforge.engine import Engine, EngineConfig, SamplingParams
from lmforge.models import build_model


def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("smollm2-135m", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, d_ff=128, vocab_size=512,
                                max_seq_len=256)  # fmt: skip
    model = build_model(cfg).eval()
    with torch.no_grad():  # spread the logits, so greedy decoding walks through many tokens
        model.lm_head.weight.normal_(0, 0.5)
    return model


def _texts(engine, prompts, params):
    return [[r.token_ids for r in group] for group in engine.generate(prompts, params)]


def test_compiled_decode_steps_give_the_eager_tokens(one_thread):
    model = tiny_model()
    prompts = [[5, 17, 300 + i, 42, 7 * i + 1] for i in range(3)] + [[9] * 20]
    greedy = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    eager = Engine(model, None, EngineConfig(num_blocks=64, block_size=8, max_num_seqs=4))
    assert eager.runner.decode_step is None
    want = _texts(eager, prompts, greedy)

    engine = Engine(model, None, EngineConfig(num_blocks=64, block_size=8, max_num_seqs=4, compile=True))
    step = engine.runner.decode_step
    assert step.buckets == (1, 2, 4)
    assert step.wait([1], timeout=600) and step.built == {1}  # bucket 1 is built at start
    assert _texts(engine, prompts, greedy) == want  # the first batch of 4 runs eagerly and queues bucket 4
    assert step.wait([4], timeout=600) and step.built == {1, 4}, step.error  # only the buckets traffic used
    before = step.steps
    assert _texts(engine, prompts, greedy) == want  # 4 sequences: bucket 4
    assert _texts(engine, prompts[:3], greedy) == want[:3]  # 3 sequences padded up to 4
    assert _texts(engine, prompts[:1], greedy) == want[:1]  # bucket 1
    assert step.steps - before >= 3 * 20  # the decode steps ran compiled
    # sampled with seeds: the same draws as the eager engine
    sampled = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)
    assert _texts(engine, prompts[:2], sampled) == _texts(eager, prompts[:2], sampled)
    assert engine.stats()["compiled_decode_steps"] == step.steps
    engine.shutdown()
    step.thread.join(timeout=600)  # a graph queued by the last batch finishes, then the thread ends
    assert not step.thread.is_alive()
    assert engine.stats()["kv_blocks_free"] == 64
