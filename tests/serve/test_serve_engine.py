"""The engine on a tiny random decoder: paged attention against the plain forward, greedy output
against lmforge.generate, chunked prefill, prefix caching, preemption, cancellation, failures."""

import pytest
import torch
from serve_helpers import tiny_model

import lmforge
from lmforge.config import ConfigError, ModelConfig
from lmforge.inference import complete
from lmforge.engine.sampler import SamplingError, SamplingParams
from lmforge.models import build_model
from lmforge.engine import ContextLengthError, Engine, EngineConfig, QueueFullError
from lmforge.engine.runner import build_batch, run_paged
from lmforge.nn.kv_cache import PagedKVCache


def prompts_of(tokenizer, n, base="The quick brown fox jumps over the lazy dog. "):
    return [tokenizer.encode(f"{i}: " + base * (1 + 3 * i)) for i in range(n)]


def greedy(max_new, **kw):
    return SamplingParams(max_new_tokens=max_new, temperature=0, **kw)


# --- paged attention ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [{}, {"sliding_window": 5}, {"position": "learned", "family": "gpt2", "norm": "layernorm", "ffn": "mlp", "n_kv_head": 4}],
    ids=["rope-gqa", "sliding-window", "learned-positions"],
)
def test_paged_forward_matches_full_forward(overrides):
    torch.manual_seed(0)
    sizes = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, d_ff=64, vocab_size=100, max_seq_len=64)
    cfg = ModelConfig.from_name("smollm2-135m", **{**sizes, **overrides})
    model = build_model(cfg).eval()
    cache = PagedKVCache(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, 16, 4, torch.float32)
    a, b = torch.randint(0, 100, (13,)).tolist(), torch.randint(0, 100, (9,)).tolist()
    ta, tb = [5, 2, 7, 9], [1, 3, 11]  # scattered, out-of-order blocks

    def ref(seq):
        with torch.no_grad():
            return model(torch.tensor([seq]))[0, -1]

    # step 1: a's first 6 tokens and all of b, as two prefill chunks
    out = run_paged(model, build_batch(cache, [], [(ta, 0, a[:6]), (tb, 0, b)], [5, 14]))
    torch.testing.assert_close(out, torch.stack([ref(a[:6]), ref(b)]), atol=1e-5, rtol=1e-5)
    # step 2: one decode for b beside a's second chunk, which attends to the cached first one
    out = run_paged(model, build_batch(cache, [(tb, 9, 42)], [(ta, 6, a[6:12])], [0, 6]))
    torch.testing.assert_close(out, torch.stack([ref(b + [42]), ref(a[:12])]), atol=1e-5, rtol=1e-5)
    # step 3: two decodes of different lengths (padding mask)
    out = run_paged(model, build_batch(cache, [(tb, 10, 7), (ta, 12, a[12])], [], [0, 1]))
    torch.testing.assert_close(out, torch.stack([ref(b + [42, 7]), ref(a)]), atol=1e-5, rtol=1e-5)


# --- greedy parity -----------------------------------------------------------------------------
def test_greedy_matches_lmforge_generate(tiny, tokenizer):
    prompts = prompts_of(tokenizer, 5)
    # a small step budget: long prompts are prefilled in chunks beside running decodes
    engine = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.01, block_size=8, max_num_batched_tokens=24))
    results = engine.generate(prompts, greedy(12, ignore_eos=True))
    for prompt, (res,) in zip(prompts, results):
        ref = complete(tiny, tokenizer, prompt, max_new_tokens=12, temperature=0, ignore_eos=True)
        assert res.token_ids == ref.token_ids
        assert res.text == lmforge.generate(tiny, tokenizer, prompt, max_new_tokens=12, temperature=0, ignore_eos=True)
        assert res.finish_reason == "length"
    assert engine.stats()["steps"] > 12  # chunked: more steps than tokens
    assert engine.blocks.num_used == 0


def test_a_tiny_step_budget_gives_the_same_tokens(tiny, tokenizer):
    # budget 4: three 1-token prompts decode beside one-token slices of a long prompt
    prompts = [tokenizer.encode("a"), tokenizer.encode("b"), tokenizer.encode("c"), tokenizer.encode("one two three four five")]
    params = greedy(6, ignore_eos=True)
    roomy = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.01, block_size=4))
    tight = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.01, block_size=4, max_num_batched_tokens=4))
    assert [r[0].token_ids for r in tight.generate(prompts, params)] == [r[0].token_ids for r in roomy.generate(prompts, params)]


def test_chunked_prefill_does_not_stall_decodes(tiny, tokenizer):
    engine = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.01, block_size=8, max_num_batched_tokens=16))
    got: dict[str, int] = {}
    sink = lambda o: got.__setitem__(o.request_id, got.get(o.request_id, 0) + len(o.token_ids))  # noqa: E731
    a = engine.add_request(tokenizer.encode("short"), greedy(40, ignore_eos=True), sink)
    engine.step()  # a's prompt and first token
    b = engine.add_request(tokenizer.encode("long " * 150), greedy(4, ignore_eos=True), sink)
    long_seq = None
    for _ in range(5):
        before = got.get(a, 0)
        engine.step()
        assert got[a] == before + 1  # a decodes every step
        long_seq = next(s for s in engine.running if s.request.id == b)
        assert long_seq.num_computed <= 15 * 5  # b advances at most budget - 1 tokens per step
    assert 0 < long_seq.num_computed < long_seq.num_prompt


def test_prefix_cache_reuses_blocks_and_keeps_outputs(tiny, tokenizer):
    shared = tokenizer.encode("You are a helpful assistant. " * 8)
    p1, p2 = shared + tokenizer.encode("Question one?"), shared + tokenizer.encode("Another question?")
    off = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.01, block_size=8, enable_prefix_caching=False))
    on = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.01, block_size=8))
    expected = [r[0].token_ids for r in off.generate([p1, p2], greedy(8, ignore_eos=True))]
    assert [on.generate([p], greedy(8, ignore_eos=True))[0][0].token_ids for p in (p1, p2)] == expected
    assert on.blocks.prefix_hits >= (len(shared) // 8) * 8
    assert off.blocks.prefix_hits == 0
    assert on.blocks.num_used == 0


def test_preemption_recomputes_and_keeps_outputs(tokenizer):
    model = tiny_model(max_seq_len=64)
    prompts = [tokenizer.encode(f"Sequence {i} says: " + "hello there " * (2 + 3 * i)) for i in range(4)]  # 9..35 tokens
    params = greedy(24, ignore_eos=True)
    roomy = Engine(model, tokenizer, EngineConfig(num_blocks=64, block_size=8))
    expected = [r[0].token_ids for r in roomy.generate(prompts, params)]
    tight = Engine(model, tokenizer, EngineConfig(num_blocks=9, block_size=8))  # one full context = 8 blocks
    got = [r[0].token_ids for r in tight.generate(prompts, params)]
    assert tight.num_preemptions > 0
    assert got == expected
    assert tight.blocks.num_used == 0 and not tight.running and not tight.waiting


def test_kv_cache_too_small_for_one_context_is_a_clear_error(tiny, tokenizer):
    with pytest.raises(ConfigError, match=r"cannot hold one full context of 512 tokens.*--kv-cache-gb to at least"):
        Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.0001))
    Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.0001, max_model_len=64))  # a shorter context fits


# --- per-request parameters ------------------------------------------------------------------------
def test_seeded_sampling_does_not_depend_on_the_batch(tiny, tokenizer):
    prompts = prompts_of(tokenizer, 3)
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, seed=7, ignore_eos=True)
    alone = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.01)).generate([prompts[0]], sampled)[0][0].token_ids
    mixed = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.01)).generate(
        prompts, [sampled, greedy(10, ignore_eos=True), SamplingParams(max_new_tokens=5, temperature=0.7, seed=1)]
    )
    assert mixed[0][0].token_ids == alone
    assert mixed[2][0].finish_reason in ("stop", "length") and len(mixed[2][0].token_ids) <= 5
    # n samples of one seeded request differ from each other but repeat across runs
    n3 = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, n=3, ignore_eos=True)
    first = [c.token_ids for c in Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.01)).generate([prompts[1]], n3)[0]]
    again = [c.token_ids for c in Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.01)).generate([prompts[1]], n3)[0]]
    assert first == again and len({tuple(t) for t in first}) == 3


def test_stop_strings_stop_tokens_and_logprobs(tiny, tokenizer):
    prompt = prompts_of(tokenizer, 1)[0]
    engine = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.01))

    def run(**kw):
        params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=5, ignore_eos=True, **kw)
        return engine.generate([prompt], params)[0][0]

    free = run()
    j = next(i for i, t in enumerate(free.token_ids) if i > 0 and t not in free.token_ids[:i])
    by_id = run(stop_token_ids=(free.token_ids[j],))
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[: j + 1]
    stop = free.text[len(free.text) // 2 :][:3]
    by_text = run(stop=(stop,))
    assert by_text.finish_reason == "stop" and by_text.text == free.text[: free.text.index(stop)]
    assert free.finish_reason == "length" and len(free.token_ids) == 16
    lp = engine.generate([prompt], greedy(4, ignore_eos=True, logprobs=3))[0][0]
    assert len(lp.logprobs) == 4 and all(len(x.top) == 3 for x in lp.logprobs)
    assert all(x.top[0][0] == x.token_id and abs(x.top[0][1] - x.logprob) < 1e-5 for x in lp.logprobs)  # greedy = top-1
    assert engine.blocks.num_used == 0


def test_prompt_checks(tiny, tokenizer):
    engine = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.01, max_queue=2))
    sink = lambda o: None  # noqa: E731
    with pytest.raises(ContextLengthError, match="the prompt has 600 tokens but the model's context is 512"):
        engine.add_request([5] * 600, greedy(4), sink)
    with pytest.raises(ContextLengthError, match="500 tokens and max_tokens asks for 20 more"):
        engine.add_request([5] * 500, greedy(20), sink)
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        engine.add_request([10**6], greedy(4), sink)
    with pytest.raises(SamplingError, match="empty"):
        engine.add_request([], greedy(4), sink)
    engine.add_request([5], greedy(4), sink)
    engine.add_request([5], greedy(4), sink)
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.add_request([5], greedy(4), sink)


# --- cancellation and failures -------------------------------------------------------------------
def test_abort_frees_blocks_before_the_next_forward(tiny, tokenizer):
    engine = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.01, block_size=8))
    outs = []
    rid = engine.add_request(prompts_of(tokenizer, 3)[2], greedy(100, ignore_eos=True), outs.append)
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_used > 0
    engine.abort(rid)
    engine.step()
    assert engine.blocks.num_used == 0 and not engine.running
    assert outs[-1].finish_reason == "abort"
    assert not engine.has_work()


def test_a_failing_sink_or_step_never_takes_the_engine_down(tiny, tokenizer, monkeypatch):
    engine = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.01)).start()
    try:
        def broken(out):
            raise RuntimeError("client gone")

        engine.add_request(tokenizer.encode("doomed"), greedy(50, ignore_eos=True), broken)
        ok = engine.generate([tokenizer.encode("fine")], greedy(5, ignore_eos=True))[0][0]
        assert ok.finish_reason == "length" and len(ok.token_ids) == 5

        real = engine.runner.execute
        calls = {"n": 0}

        def fails_once(*args):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("simulated kernel failure")
            return real(*args)

        monkeypatch.setattr(engine.runner, "execute", fails_once)
        failed = engine.generate([tokenizer.encode("unlucky")], greedy(5))[0][0]
        assert failed.finish_reason == "error" and "simulated kernel failure" in failed.error
        later = engine.generate([tokenizer.encode("fine again")], greedy(5, ignore_eos=True))[0][0]
        assert later.finish_reason == "length"
        assert engine.num_failed_steps == 1
    finally:
        engine.shutdown()
    assert engine.blocks.num_used == 0
