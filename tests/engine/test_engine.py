"""The engine's parts on tiny random models: the paged cache behind the model's own attention for
every position kind (ALiBi and T5's relative bias included), encoder-decoder serving, prompt
logprobs, the one finish rule, and errors that carry their parameter."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.engine import Engine, EngineConfig, PromptError, SamplingError, SamplingParams
from lmforge.engine.output import OutputProcessor, stop_token_ids
from lmforge.engine.runner import build_batch, run_paged
from lmforge.inference import complete
from lmforge.models import build_model
from lmforge.nn.kv_cache import PagedKVCache

SIZES = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, d_ff=64, vocab_size=100, max_seq_len=64)


def decoder(position: str, **over):
    torch.manual_seed(0)
    return build_model(ModelConfig.from_name("smollm2-135m", **{**SIZES, "position": position, **over})).eval()


def t5():
    torch.manual_seed(1)
    cfg = ModelConfig.from_name("t5-small", n_layer=2, n_embd=32, n_head=4, head_dim=8, d_ff=64, vocab_size=100)
    return build_model(cfg).eval()


@pytest.mark.parametrize("position, over", [("alibi", {}), ("alibi", {"sliding_window": 5}), ("none", {})])
def test_paged_batches_through_the_models_own_forward_match_the_full_forward(position, over):
    model = decoder(position, **over)
    cfg = model.config
    pool = PagedKVCache(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, 16, 4)
    a, b = torch.randint(0, 100, (13,)).tolist(), torch.randint(0, 100, (9,)).tolist()
    ta, tb = [5, 2, 7, 9], [1, 3, 11]

    def ref(seq):
        with torch.no_grad():
            return model(torch.tensor([seq]))[0, -1]

    out = run_paged(model, build_batch(pool, [], [(ta, 0, a[:6]), (tb, 0, b)], [5, 14]))
    torch.testing.assert_close(out, torch.stack([ref(a[:6]), ref(b)]), atol=1e-5, rtol=1e-5)
    out = run_paged(model, build_batch(pool, [(tb, 9, 42)], [(ta, 6, a[6:12])], [0, 6]))
    torch.testing.assert_close(out, torch.stack([ref(b + [42]), ref(a[:12])]), atol=1e-5, rtol=1e-5)
    out = run_paged(model, build_batch(pool, [(tb, 10, 7), (ta, 12, a[12])], [], [0, 1]))
    torch.testing.assert_close(out, torch.stack([ref(b + [42, 7]), ref(a)]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [lambda: decoder("alibi"), t5], ids=["alibi", "t5"])
def test_engine_greedy_equals_generate(make):
    model = make()
    prompts = [torch.randint(2, 100, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 11, 7)]
    engine = Engine(model, None, EngineConfig(num_blocks=32, block_size=4, max_num_batched_tokens=8, max_model_len=64))
    results = engine.generate(prompts, SamplingParams(max_new_tokens=9, temperature=0, ignore_eos=True))
    for prompt, (res,) in zip(prompts, results):
        # generate itself runs on an engine now: the reference is the contiguous path, recomputing every step
        ref = complete(model, None, prompt, max_new_tokens=9, temperature=0, ignore_eos=True, use_cache=False)
        assert res.token_ids == ref.token_ids and res.finish_reason == "length"
    assert engine.blocks.num_used == 0


def test_prompt_logprobs_are_the_models_own():
    model = decoder("rope")
    prompt = torch.randint(0, 100, (14,)).tolist()
    engine = Engine(model, None, EngineConfig(num_blocks=32, block_size=4, max_num_batched_tokens=5))
    engine.generate([prompt[:8]], SamplingParams(max_new_tokens=2, temperature=0))  # fills the prefix cache
    res = engine.generate([prompt], SamplingParams(max_new_tokens=1, temperature=0), prompt_logprobs=3)[0][0]
    with torch.no_grad():
        logp = model(torch.tensor([prompt]))[0].log_softmax(-1)  # (T, V)
    got = res.prompt_logprobs
    assert got[0] is None and len(got) == len(prompt)
    for p in range(1, len(prompt)):
        assert got[p].token_id == prompt[p]
        assert abs(got[p].logprob - float(logp[p - 1, prompt[p]])) < 1e-4
        assert [i for i, _ in got[p].top] == logp[p - 1].topk(3).indices.tolist()


def test_one_finish_rule():
    class Tok:  # one character per id
        eos_ids = {0}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(96 + i) for i in ids if not (skip_special_tokens and i == 0))

    cfg = ModelConfig.from_name("smollm2-135m", **SIZES, eos_token_id=99)
    params = SamplingParams(max_new_tokens=5, stop=("cd",), stop_token_ids=(26,))
    ids = stop_token_ids(params, cfg, Tok())
    assert {0, 26} <= ids and cfg.eos_token_id in ids

    def run(tokens, p=params):
        out = OutputProcessor(p, stop_token_ids(p, cfg, Tok()), 5, Tok())
        text = "".join(out.accept(t) for t in tokens if out.finish_reason is None)
        return text, out.token_ids, out.finish_reason

    assert run([1, 2, 3, 4, 5]) == ("ab", [1, 2, 3, 4], "stop")  # a stop string: the text ends before it
    assert run([1, 26, 2]) == ("a", [1, 26], "stop")  # a stop token: kept in the ids, not in the text
    assert run([1, 0, 2]) == ("a", [1, 0], "stop")  # eos
    assert run([1, 1, 1, 1, 1, 1]) == ("aaaaa", [1] * 5, "length")
    no_eos = SamplingParams(max_new_tokens=5, ignore_eos=True)
    assert run([1, 0, 2], no_eos)[2] is None  # ignore_eos: eos is an ordinary token


def test_errors_carry_their_parameter():
    with pytest.raises(SamplingError) as e:
        SamplingParams(top_p=0.0)
    assert e.value.param == "top_p"
    engine = Engine(decoder("rope"), None, EngineConfig(num_blocks=32, block_size=4))
    with pytest.raises(PromptError, match="outside the vocabulary") as e:
        engine.add_request([1000], SamplingParams(), lambda o: None)
    assert e.value.param == "prompt"
    with pytest.raises(SamplingError, match="decoder-only") as e:
        Engine(t5(), None, EngineConfig(num_blocks=40, block_size=16, max_model_len=64)).add_request([5], SamplingParams(), lambda o: None,
                                                                                   prompt_logprobs=1)  # fmt: skip


@pytest.mark.parametrize("attention", ["sparse", "linear"])
def test_the_paged_engine_refuses_what_it_cannot_page(attention):
    from lmforge.config import ConfigError, ModelConfig
    from lmforge.engine import Engine
    from lmforge.models import build_model

    cfg = ModelConfig.from_name("smollm2-135m", n_layer=1, n_embd=32, n_head=4, n_kv_head=2, d_ff=64, vocab_size=100,
                                max_seq_len=64, attention=attention)  # fmt: skip
    with pytest.raises(ConfigError, match=f"{attention} attention runs through lmforge.generate"):
        Engine(build_model(cfg), None)
