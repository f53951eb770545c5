"""generate / stream / complete as synchronous clients of the one Engine: the same tokens as the
contiguous cache's fixed-batch loop, pieces as the steps produce them, seeded samples whatever the
batch, timings, one engine per prepared model (reused, rebuilt when the weights change), and a
failed or abandoned call leaves the engine clean."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import lmforge.engine.runner as runner_mod
from lmforge.engine.batch import Row, decode_batch
from lmforge.engine.output import OutputProcessor, stop_token_ids
from lmforge.engine.prompt import token_budget
from lmforge.engine.runner import make_runner
from lmforge.engine.sampler import make_generator
from lmforge.inference import Generator, SamplingParams, complete, generate, stream
from lmforge.inference.generate import _generator

PROMPTS = [[5, 17, 42, 8, 3], [9, 1], [4, 60, 4, 60, 4, 33, 12, 7, 80, 2, 2]]


def contiguous(model, prompts, params: SamplingParams) -> list[list[int]]:
    """Token ids from the fixed-batch loop over a contiguous KV cache (the path generate took before)."""
    cfg = model.config
    stops = stop_token_ids(params, cfg)
    rows = [Row(params, p, make_generator(params, model.device, j),
                OutputProcessor(params, stops, token_budget(len(p), params.max_new_tokens, cfg, cfg.max_seq_len), None, p))
            for p in prompts for j in range(params.n)]  # fmt: skip
    runner = make_runner(model, [r.prompt for r in rows], max(r.out.max_new for r in rows))
    try:
        for _ in decode_batch(runner, rows):
            pass
    finally:
        runner.close()
    return [r.out.token_ids for r in rows]


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_t5"])
def test_the_engine_gives_the_contiguous_paths_tokens(fixture, request):
    _, model = request.getfixturevalue(fixture)
    gen = Generator(model)
    stop = contiguous(model, PROMPTS[:1], SamplingParams(max_new_tokens=40, temperature=0))[0][4]
    greedy = SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=(stop,))
    assert len({len(t) for t in contiguous(model, PROMPTS, greedy)}) > 1  # rows end at different steps
    sampled = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.9, seed=4, n=2, ignore_eos=True)
    for params in (greedy, sampled):
        want = contiguous(model, PROMPTS, params)
        got = gen.run(PROMPTS, params).finish().completions
        assert [c.token_ids for c in got] == want
    assert gen.engine.blocks.num_used == 0 and not gen.engine.has_work()


def test_logprobs_are_always_there_and_top_logprobs_when_asked(tiny_gpt2):
    hf, model = tiny_gpt2
    plain = complete(model, None, PROMPTS[0], max_new_tokens=6, temperature=0, ignore_eos=True)
    assert len(plain.logprobs) == 6 and plain.top_logprobs is None
    asked = complete(model, None, PROMPTS[0], max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    assert asked.logprobs == pytest.approx(plain.logprobs, abs=1e-5) and len(asked.top_logprobs) == 6
    with torch.no_grad():
        logp = hf(torch.tensor([PROMPTS[0] + asked.token_ids[:-1]])).logits[0, len(PROMPTS[0]) - 1 :].log_softmax(-1)
    for i, tok in enumerate(asked.token_ids):
        assert asked.logprobs[i] == pytest.approx(float(logp[i, tok]), abs=1e-4)
        assert list(asked.top_logprobs[i]) == logp[i].topk(3).indices.tolist()


def test_pieces_come_as_the_steps_produce_them(tiny_chat, smol_tokenizer):
    _, model = tiny_chat
    kw = dict(max_new_tokens=40, temperature=1.0, seed=2, ignore_eos=True)
    reply = stream(model, smol_tokenizer, "Tell me a story.", **kw)
    seen = []
    for piece in reply:
        seen.append((piece, len(reply.completion.token_ids)))
    assert len(seen) > 5 and seen[0][1] < 5  # the first piece came before most of the tokens existed
    assert "".join(p for p, _ in seen) == reply.completion.text == generate(model, smol_tokenizer, "Tell me a story.", **kw)
    # a batch: (row, piece) as rows advance together; each row's pieces join to its text
    gen = _generator(model, smol_tokenizer, False, None, None, 4)
    prompts = [gen.encode("One"), gen.encode("Two, three")]
    run = gen.run(prompts, SamplingParams(n=2, **kw))
    texts = [""] * 4
    order = []
    for row, piece in run:
        texts[row] += piece
        order.append(row)
    assert texts == [c.text for c in run.completions] and all(texts)
    assert len(set(order[:8])) > 1  # interleaved, not one row after another


def test_seeded_samples_repeat_and_do_not_depend_on_the_batch(tiny_gpt2):
    _, model = tiny_gpt2
    kw = dict(max_new_tokens=20, temperature=1.0, seed=11, n=3, ignore_eos=True)
    batch = complete(model, None, PROMPTS, **kw)
    assert [[c.token_ids for c in g] for g in complete(model, None, PROMPTS, **kw)] == [[c.token_ids for c in g] for g in batch]
    for prompt, group in zip(PROMPTS, batch):
        alone = complete(model, None, prompt, **kw)
        assert [c.token_ids for c in alone] == [c.token_ids for c in group]
        assert len({tuple(c.token_ids) for c in group}) == 3  # the n samples differ (seed + j)
    shuffled = complete(model, None, PROMPTS[::-1] + [PROMPTS[0]], **kw)
    assert [c.token_ids for c in shuffled[0]] == [c.token_ids for c in batch[2]]
    assert [c.token_ids for c in shuffled[3]] == [c.token_ids for c in batch[0]]


def test_timing_has_the_keys_the_cli_reads(tiny_gpt2):
    _, model = tiny_gpt2
    run = Generator(model).run(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)).finish()
    t = run.timing
    assert set(t) == {"prefill_s", "decode_s", "decode_steps", "first_step_s", "step"}
    assert t["step"] == "eager" and t["decode_steps"] == 11  # every row got its first token in the prefill step
    assert 0 < t["first_step_s"] <= t["decode_s"] and t["prefill_s"] > 0
    one = Generator(model).run([PROMPTS[0]], SamplingParams(max_new_tokens=1, temperature=0)).finish().timing
    assert one["decode_steps"] == 0 and "first_step_s" not in one and one["step"] == "eager"


def test_one_engine_per_prepared_model_rebuilt_when_the_weights_change(tiny_gpt2):
    model = copy.deepcopy(tiny_gpt2[1])
    prompt = [(7 * i) % 90 + 1 for i in range(40)]  # more than a KV block: the prefix cache holds some of it
    kw = dict(max_new_tokens=8, temperature=0, ignore_eos=True)
    first = complete(model, None, prompt, **kw).token_ids
    engine = _generator(model, None, False, None, None, 4).engine
    assert complete(model, None, prompt, **kw).token_ids == first
    assert _generator(model, None, False, None, None, 4).engine is engine  # the same engine, pool and prefix cache
    assert engine.blocks.prefix_hits >= 32  # the second call reused the first one's blocks
    assert engine.blocks.num_blocks * engine.config.block_size >= model.config.max_seq_len  # one full context fits
    gen = Generator(model)
    assert gen.engine is gen.engine
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)  # an in-place update, as an optimizer step makes
    after = complete(model, None, prompt, **kw).token_ids
    assert after != first
    assert after == contiguous(model, [prompt], SamplingParams(**kw))[0]  # no K/V of the old weights reused
    assert _generator(model, None, False, None, None, 4).engine is not engine
    assert gen.complete(prompt, **kw).token_ids == after  # an eager Generator rebuilds its engine too
    # a copy of the model is another model: its own engine, and copying does not copy engines
    twin = copy.deepcopy(model)
    assert complete(twin, None, prompt, **kw).token_ids == after
    assert _generator(twin, None, False, None, None, 4).engine is not _generator(model, None, False, None, None, 4).engine


def test_the_model_keeps_its_mode_and_a_new_tokenizer_gets_its_engine(tiny_chat, smol_tokenizer):
    _, model = tiny_chat
    model = copy.deepcopy(model).train()
    assert model.training  # (dropout is 0: generating in train mode changes nothing here)
    text = generate(model, smol_tokenizer, "Hi", max_new_tokens=4, temperature=0)
    assert model.training  # the engine put it in eval mode only while it was built
    engine = _generator(model, smol_tokenizer, False, None, None, 4).engine
    ids = complete(model, None, smol_tokenizer.encode("Hi"), max_new_tokens=4, temperature=0)
    without = _generator(model, None, False, None, None, 4).engine
    assert without is not engine and without.tokenizer is None and engine.tokenizer is smol_tokenizer
    assert smol_tokenizer.decode(ids.token_ids) == text


def test_a_failed_step_raises_and_leaves_the_engine_clean(tiny_gpt2, monkeypatch):
    _, model = tiny_gpt2
    gen = Generator(model)
    want = gen.complete(PROMPTS[:2], max_new_tokens=5, temperature=0, ignore_eos=True)
    plain = runner_mod.run_paged

    def failing(m, batch):  # a forward that fails for one request's sequences (the engine isolates them)
        if 93 in batch.input_ids.tolist():
            raise RuntimeError("kernel fell over")
        return plain(m, batch)

    monkeypatch.setattr(runner_mod, "run_paged", failing)
    with pytest.raises(RuntimeError, match="kernel fell over"):  # what the step raised, not a message about it
        gen.complete([[93, 5, 6], [7, 8, 9]], max_new_tokens=60, temperature=0, ignore_eos=True)
    monkeypatch.setattr(runner_mod, "run_paged", plain)
    # the failed call's other request was cancelled: the next call runs alone and leaves nothing behind
    again = gen.complete(PROMPTS[:2], max_new_tokens=5, temperature=0, ignore_eos=True)
    assert [c.token_ids for c in again] == [c.token_ids for c in want]
    assert gen.engine.blocks.num_used == 0 and not gen.engine.has_work()


def test_an_abandoned_stream_is_cancelled(tiny_chat, smol_tokenizer):
    _, model = tiny_chat
    gen = Generator(model, smol_tokenizer)
    reply = gen.stream("Once upon a time", max_new_tokens=100, temperature=0, ignore_eos=True)
    next(iter(reply))
    assert gen.engine.running  # its sequence holds blocks mid-generation
    del reply  # dropped mid-stream: its request is cancelled
    short = gen.complete("Once upon a time", max_new_tokens=20, temperature=0, ignore_eos=True)
    assert len(short.token_ids) == 20
    assert gen.engine.blocks.num_used == 0 and not gen.engine.has_work()
    never = gen.stream("Hello", max_new_tokens=5)  # never iterated: nothing was queued
    assert not gen.engine.has_work() and never.run.timing == {}


@pytest.mark.slow  # compiles the paged decode step of a tiny model (about a minute on 2 cores)
def test_compile_true_waits_for_its_graph_and_gives_the_eager_tokens(tmp_path, monkeypatch):
    from lmforge import ModelConfig
    from lmforge.models import build_model

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))  # a cold start: no decode graph on disk from an earlier run

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("smollm2-135m", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, d_ff=128, vocab_size=300,
                                max_seq_len=256)  # fmt: skip
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    eager = [c.token_ids for c in Generator(model).run(PROMPTS[:1], params).finish().completions]
    gen = Generator(model, compile=True)
    run = gen.run(PROMPTS[:1], params).finish()
    assert [c.token_ids for c in run.completions] == eager
    graphs = gen.engine.runner.decode_step
    assert run.timing["step"] == "compiled" and graphs.steps == 23  # every decode step ran the graph it waited for
    assert run.timing["first_step_s"] > 1  # the first call paid for the compile
    again = gen.run(PROMPTS[:1], params).finish()
    assert [c.token_ids for c in again.completions] == eager and again.timing["first_step_s"] < 1
    # beam search's lanes: the first call waits for the graph of its beam count, then every step runs it
    beams = dict(max_new_tokens=16, temperature=0, num_beams=3, n=3, ignore_eos=True)
    before = graphs.steps
    got = [c.token_ids for c in gen.complete(PROMPTS[0], **beams)]
    assert got == [c.token_ids for c in Generator(model).complete(PROMPTS[0], **beams)]
    assert graphs.steps - before == 15 and 4 in graphs.built  # 3 beams: the bucket-4 graph, padded
    assert not any(t.name == "lmforge-paged-compile" for t in threading.enumerate())  # nothing left running


def test_threads_sharing_one_generator_take_turns(tiny_gpt2):
    """Several threads calling one Generator (its engine stepped inline by each of them, and beam
    search's lanes on the same pool) get what each would get alone, and leave the pool empty."""
    _, model = tiny_gpt2
    gen = Generator(model)
    prompts = [[i + 1, i + 2, i + 3, 5] for i in range(6)]
    kinds = [dict(temperature=0), dict(temperature=0.9, seed=4), dict(temperature=0, num_beams=3)]
    calls = [(p, kinds[i % 3]) for i, p in enumerate(prompts)]
    alone = [gen.complete(p, max_new_tokens=30, ignore_eos=True, **kw).token_ids for p, kw in calls]
    got, errors = {}, []

    def work(i):
        try:
            p, kw = calls[i]
            for _ in range(4):
                got.setdefault(i, []).append(gen.complete(p, max_new_tokens=30, ignore_eos=True, **kw).token_ids)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "the threads hang (seen without the engine's step lock)"
    assert not errors
    assert all(got[i] == [alone[i]] * 4 for i in range(len(calls)))
    assert gen.engine.blocks.num_used == 0  # every sequence and lane gave its blocks back
