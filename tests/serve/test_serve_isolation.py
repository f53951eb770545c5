"""One request's failure inside the shared batched step ends that request only: the other sequences
of the batch go on and produce exactly the text they produce alone."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import running_server

from lmforge.engine import Engine, EngineConfig
from lmforge.engine.sampler import SamplingParams
from lmforge.serve.server import create_app

MODEL = "tiny"
TEXTS = [f"{i}: the quick brown fox jumps over the lazy dog " * (1 + i) for i in range(8)]


def greedy(n: int = 12) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)


def new_engine(tiny, tokenizer) -> Engine:
    return Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.02, block_size=8, max_num_batched_tokens=64))


def poison(engine: Engine, where: str, params: SamplingParams, after: int = 3):
    """Make the step fail whenever the sequence with these (identical-object) params is in it and has
    generated ``after`` tokens: in the forward, in the batched sampler, or on accepting its token."""
    def victim():
        for req in list(engine._requests.values()):
            if req.params is params:
                return req.seqs[0]
        return None

    if where == "forward":
        real = engine.runner.execute

        def execute(decodes, prefills, rows, cross=None):
            s = victim()
            if s is not None and s.num_output >= after and any(t is s.table for t, _, _ in decodes):
                raise RuntimeError("injected kernel failure")
            return real(decodes, prefills, rows, cross)

        engine.runner.execute = execute
    elif where == "sampler":
        real_sampler = engine.sampler

        class Sampler:
            def __call__(self, logits, plist, *args):
                s = victim()
                if s is not None and s.num_output >= after and any(p is params for p in plist):
                    raise RuntimeError("injected sampling failure")
                return real_sampler(logits, plist, *args)

        engine.sampler = Sampler()
    else:  # "accept": the output processing of the one sequence breaks
        def patch(engine=engine):
            s = victim()
            real_accept = s.out.accept

            def accept(tok):
                if s.num_output > after:
                    raise ValueError("injected detokenizer failure")
                return real_accept(tok)

            s.out.accept = accept

        return patch


@pytest.mark.parametrize("where", ["forward", "sampler", "accept"])
def test_a_failing_sequence_leaves_the_other_seven_unchanged(tiny, tokenizer, where):
    prompts = [tokenizer.encode(t) for t in TEXTS]
    alone = []
    engine = new_engine(tiny, tokenizer)
    for p in prompts:
        alone.append(engine.generate([p], greedy())[0][0].text)
    assert engine.blocks.num_used == 0

    engine = new_engine(tiny, tokenizer)
    bad = greedy()
    params = [bad if i == 3 else greedy() for i in range(8)]
    patch = poison(engine, where, bad)
    results = [None] * 8
    done = []

    def sink_for(k):
        def sink(out):
            if results[k] is None:
                results[k] = {"text": "", "reason": None, "error": None}
            results[k]["text"] += out.text
            if out.finish_reason is not None:
                results[k].update(reason=out.finish_reason, error=out.error)
                done.append(k)

        return sink

    for k, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(p, sp, sink_for(k))
    steps = 0
    while len(done) < 8:
        engine.step()
        steps += 1
        if patch is not None and engine._requests and any(r.params is bad for r in engine._requests.values()):
            patch()
            patch = None
        assert steps < 500
    assert results[3]["reason"] == "error" and "injected" in results[3]["error"]
    assert len(results[3]["text"]) > 0  # it failed mid-generation, after some tokens
    for k in range(8):
        if k != 3:
            assert results[k]["reason"] == "length" and results[k]["text"] == alone[k], k
    assert engine.num_failed_steps >= (0 if where == "accept" else 1)
    assert not engine.has_work() and engine.blocks.num_used == 0


def test_over_http_the_failing_request_gets_its_error_and_the_others_their_text(tiny, tokenizer):
    engine = new_engine(tiny, tokenizer)
    body = lambda i: {"model": MODEL, "prompt": TEXTS[i], "max_tokens": 12, "temperature": 0, "ignore_eos": True}  # noqa: E731
    with running_server(create_app(engine, MODEL)) as url:
        alone = [httpx.post(url + "/v1/completions", json=body(i), timeout=60).json()["choices"][0]["text"] for i in range(4)]
        real = engine.runner.execute
        target = tokenizer.encode(TEXTS[2])

        def execute(decodes, prefills, rows, cross=None):
            for req in list(engine._requests.values()):
                s = req.seqs[0]
                if req.prompt == target and s.num_output >= 2 and any(t is s.table for t, _, _ in decodes):
                    raise RuntimeError("injected kernel failure")
            return real(decodes, prefills, rows, cross)

        engine.runner.execute = execute
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda i: httpx.post(url + "/v1/completions", json=body(i), timeout=60), range(4)))
        stream = httpx.post(url + "/v1/completions", json={**body(2), "stream": True}, timeout=60).text
        assert httpx.get(url + "/health").status_code == 200
    assert replies[2].status_code == 500 and "injected kernel failure" in replies[2].json()["error"]["message"]
    assert [r.json()["choices"][0]["text"] for i, r in enumerate(replies) if i != 2] == [alone[0], alone[1], alone[3]]
    assert '"server_error"' in stream and "injected kernel failure" in stream
    assert engine.blocks.num_used == 0
