"""compile=True: the compiled decode step gives the eager tokens, keeps one graph per shape across
calls, and never runs one model on another's frozen weights."""

from __future__ import annotations

import pytest
import torch

from lmforge import ModelConfig
from lmforge.inference import Generator, complete
from lmforge.models import build_model

pytestmark = pytest.mark.slow  # inductor compiles take tens of seconds on a small CPU


def _model(seed: int):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("smollm2-135m", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, d_ff=128,
                                max_seq_len=512, vocab_size=300)  # fmt: skip
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def test_compiled_equals_eager_and_models_keep_their_own_weights():

    m1, m2 = _model(0), _model(1)  # same shapes, different weights
    g1, g2 = Generator(m1, compile=True), Generator(m2, compile=True)
    prompts = [[5, 17, 42, 8, 3], [9, 9, 1, 2, 3, 4, 5, 6]]
    kw = dict(max_new_tokens=24, temperature=0, ignore_eos=True)
    eager1 = [complete(m1, None, p, **kw).token_ids for p in prompts]
    eager2 = [complete(m2, None, p, **kw).token_ids for p in prompts]
    assert eager1 != eager2
    assert [g1.complete(p, **kw).token_ids for p in prompts] == eager1
    step1 = g1.engine.runner.decode_step
    assert [g2.complete(p, **kw).token_ids for p in prompts] == eager2  # not m1's frozen weights
    assert [g1.complete(p, **kw).token_ids for p in prompts] == eager1  # eager runs between do not disturb it
    step2 = g2.engine.runner.decode_step
    assert step1.built == step2.built == {1}  # one graph each, m1's reused for its second round
    assert step1.steps == 2 * 2 * 23 and step2.steps == 2 * 23  # every decode step ran a compiled graph
    batch = g1.complete(prompts, **kw)
    assert [c.token_ids for c in batch] == eager1  # batch 2: another graph, same tokens


def test_batch_one_runs_an_input_major_twin_that_shares_everything_else():
    from lmforge.engine.runner import input_major_twin

    model = _model(2)
    twin = input_major_twin(model)
    ours = dict(model.named_parameters(remove_duplicate=False))
    linear = {f"{n}.weight" for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert linear and "lm_head.weight" in linear
    for name, p in twin.named_parameters(remove_duplicate=False):
        if name in linear:  # a copy, stored input-major: W.t() is contiguous
            assert p.data_ptr() != ours[name].data_ptr() and p.t().is_contiguous() and torch.equal(p, ours[name])
        else:  # the very same tensor
            assert p is ours[name]
    assert all(m.weight.is_contiguous() for m in model.modules() if type(m) is torch.nn.Linear)  # model untouched
    assert model.lm_head.weight is model.embed.tok.weight  # still tied in the model


@pytest.mark.slow
def test_a_cold_max_autotune_compile_prints_nothing_to_the_terminal(tmp_path):
    """An int8 head makes the compiled step use max-autotune; its kernel-timing reports ("Autotune
    Choices Stats", the timing table) must not reach the terminal of `lmforge generate` / `chat`."""
    import subprocess
    import sys

    script = """
import torch
from lmforge.config import ModelConfig
from lmforge.models import build_model
from lmforge.inference import complete
from lmforge.inference.quantize import quantize_linears
torch.manual_seed(0)
m = build_model(ModelConfig.from_name("smollm2-135m", n_layer=1, n_embd=64, n_head=4, n_kv_head=2, d_ff=128,
                                      vocab_size=256, max_seq_len=64)).eval()
quantize_linears(m, "int8")
print(complete(m, None, [1, 2, 3], max_new_tokens=4, temperature=0, compile=True).token_ids)
"""
    env = {**__import__("os").environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # cold: autotuning runs
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Autotune Choices Stats" not in r.stderr and "AUTOTUNE" not in r.stderr, r.stderr[-2000:]
