"""Compiled by default without the wait: a Generator answers eagerly while its decode step
compiles in a thread, and the compiled step takes over mid-generation once ready (logged once),
with the same tokens. On the engine (softmax attention) that step is the engine's paged graph per
batch bucket; a model the engine cannot page (sparse attention here) keeps the contiguous cache's
batch-1 ``BackgroundStep``. The swap logic is tested with the compile replaced by the plain step
(fast); slow tests compile a tiny model for real."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

import lmforge.engine.runner as runner_mod
from lmforge.config import ModelConfig
from lmforge.inference import Generator, SamplingParams
from lmforge.models import build_model


def tiny(vocab_size: int = 100, **over):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("smollm2-135m", n_layer=2, n_embd=32, n_head=4, n_kv_head=2, d_ff=64,
                                vocab_size=vocab_size, max_seq_len=256, **over)  # fmt: skip
    return build_model(cfg).eval()


# --- on the engine: its paged decode graphs --------------------------------------------------------
def assert_switches_mid_generation(gen, prompt, params, expected, eager_steps, log_text, message):
    """5 eager steps, then the compiled step for the rest of the call and all of the next; said once."""
    run = gen.run([prompt], params).finish()
    assert run.timing["step"] == "switched" and len(eager_steps) == 5  # the compiled step did the rest
    assert run.completions[0].token_ids == expected
    again = gen.run([prompt], params).finish()  # later calls start on the compiled step
    assert again.timing["step"] == "compiled" and again.completions[0].token_ids == expected
    assert len(eager_steps) == 5
    assert log_text().count(message) == 1


def test_the_engines_background_graph_takes_over_mid_generation(monkeypatch, caplog):
    model = tiny()
    prompt, params = [5, 17, 42, 8], SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    expected = Generator(model).run([prompt], params).finish().completions[0].token_ids

    plain_forward, gate, eager_steps = runner_mod.run_paged, threading.Event(), []

    def fake_compile(fn, **kw):  # the plain step; the background thread waits for the gate first
        def step(*args):
            if threading.current_thread().name == "lmforge-paged-compile":
                assert gate.wait(30)
            return fn(*args)

        return step

    def eager(model, batch):  # eager forwards: after 5 decode-only steps, let the background finish
        if not batch.chunks:
            eager_steps.append(1)
            if len(eager_steps) == 5:
                gate.set()
                assert gen.engine.runner.decode_step.wait([1], 30)
        return plain_forward(model, batch)

    monkeypatch.setattr(runner_mod, "compile_decode_step", fake_compile)
    monkeypatch.setattr(runner_mod, "run_paged", eager)
    caplog.set_level(logging.INFO, logger="lmforge.engine")
    gen = Generator(model, compile="background")
    assert gen.engine.runner.decode_step.built == set()  # nothing compiled yet: answers eagerly
    assert_switches_mid_generation(gen, prompt, params, expected, eager_steps, lambda: caplog.text,
                                   "decode steps switch to compiled graphs")  # fmt: skip
    assert not gen.compiling  # no thread left behind once nothing is queued
    gen.close()


def test_a_failed_background_compile_leaves_the_engine_eager(monkeypatch, caplog):
    def broken(fn, **kw):
        def step(*args):
            raise RuntimeError("no compiler here")

        return step

    monkeypatch.setattr(runner_mod, "compile_decode_step", broken)

    def no_aot(self, runner, b):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(runner_mod.PagedDecodeStep, "_aot_graph", no_aot)
    gen = Generator(tiny(), compile="background")
    assert not gen.engine.runner.decode_step.wait([1], 30) and "no compiler here" in caplog.text
    run = gen.run([[1, 2, 3]], SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)).finish()
    assert run.timing["step"] == "eager" and len(run.completions[0].token_ids) == 5


# --- off the engine: the contiguous cache's batch-1 step -------------------------------------------
def test_the_background_step_takes_over_mid_generation(monkeypatch, caplog):
    model = tiny(attention="sparse")
    prompt, params = [5, 17, 42, 8], SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    expected = Generator(model).run([prompt], params).finish().completions[0].token_ids

    plain, gate, eager_steps = runner_mod._decode_step, threading.Event(), []

    def fake_compile(**kw):  # the plain step; the background thread waits for the gate first
        def step(*args):
            if threading.current_thread().name == "lmforge-compile":
                assert gate.wait(30)
            return plain(*args)

        return step

    def eager(*args):  # the eager step: after 5 of them, let the background finish
        eager_steps.append(1)
        if len(eager_steps) == 5:
            gate.set()
            assert gen._background.wait(30) is not None
        return plain(*args)

    monkeypatch.setattr(runner_mod, "compile_decode_step", fake_compile)
    monkeypatch.setattr(runner_mod, "_decode_step", eager)
    caplog.set_level(logging.INFO, logger="lmforge.engine")
    gen = Generator(model, compile="background")
    assert gen.engine is None and gen.step is None  # off the engine; nothing compiled yet: answers eagerly
    assert_switches_mid_generation(gen, prompt, params, expected, eager_steps, lambda: caplog.text,
                                   "switched to the compiled decode step")  # fmt: skip


def test_a_failed_background_compile_leaves_decoding_eager(monkeypatch, caplog):
    def broken(**kw):
        def step(*args):
            raise RuntimeError("no compiler here")

        return step

    monkeypatch.setattr(runner_mod, "compile_decode_step", broken)
    gen = Generator(tiny(attention="sparse"), compile="background")
    assert gen._background.wait(30) is None and "no compiler here" in caplog.text
    run = gen.run([[1, 2, 3]], SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)).finish()
    assert run.timing["step"] == "eager" and len(run.completions[0].token_ids) == 5


@pytest.mark.slow  # compiles a tiny model
def test_a_real_background_compile_gives_the_eager_tokens():
    model = tiny()
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    expected = Generator(model).run([[3, 1, 4, 1, 5]], params).finish().completions[0].token_ids
    gen = Generator(model, compile="background")
    assert gen.engine.runner.decode_step.wait([1], 600)
    run = gen.run([[3, 1, 4, 1, 5]], params).finish()
    assert run.timing["step"] == "compiled" and run.completions[0].token_ids == expected
    gen.close()


@pytest.mark.slow  # compiles a tiny model in a fresh process
def test_compiled_artifacts_are_kept_on_disk(tmp_path):
    import os
    import subprocess
    import sys

    code = (
        "import torch; from lmforge.config import ModelConfig; from lmforge.models import build_model;"
        "from lmforge.inference import generate;"
        "m = build_model(ModelConfig.from_name('smollm2-135m', n_layer=1, n_embd=32, n_head=4, n_kv_head=2, d_ff=64,"
        " vocab_size=100, max_seq_len=64)).eval();"
        "generate(m, None, [1, 2, 3], max_new_tokens=3, temperature=0, compile=True)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"} | {"LMFORGE_CACHE": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)  # and exits: no thread left waiting
    # the next start finds the step's compiled kernels here (the engine's graphs freeze the weights in
    # as constants, which inductor's FX-graph cache does not store: it keeps the kernels they are built of)
    assert any((tmp_path / "inductor").glob("**/*.so"))


@pytest.mark.slow  # compiles a tiny model in a fresh process
def test_cli_generate_answers_eagerly_then_finishes_the_compile_before_exiting(tmp_path):
    import os
    import subprocess
    import sys

    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer()
    tiny(tok.vocab_size).save_pretrained(tmp_path / "m", tokenizer=tok)
    env = {k: v for k, v in os.environ.items() if k not in ("LMFORGE_COMPILE", "TORCHINDUCTOR_CACHE_DIR")}
    env["LMFORGE_CACHE"] = str(tmp_path / "cache")
    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "generate", str(tmp_path / "m"), "-p", "Hi",
                        "--max-new-tokens", "4"], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "[4 tokens" in r.stderr and "failed" not in r.stderr
    assert any((tmp_path / "cache" / "inductor").iterdir())  # the finished compile is on disk for the next start
