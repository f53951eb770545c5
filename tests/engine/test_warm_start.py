"""A second start of the engine loads its compiled decode graphs from the disk cache
(``$LMFORGE_CACHE/decode-graphs``, AOTInductor packages) instead of compiling them again, and a
package is never used for other weights than the ones it was compiled with (they are frozen in)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.engine.runner import _weights_digest
from lmforge.models import build_model

# one start of the engine in a fresh process: a tiny model of the given seed, its greedy tokens with
# and without the compiled decode step, and whether the step's graph came from the disk cache
START = """
import json, sys, time
import torch
torch.set_num_threads(1)
from lmforge.config import ModelConfig
from lmforge.engine import Engine, EngineConfig, SamplingParams
from lmforge.inference.quantize import quantize_model
from lmforge.models import build_model

torch.manual_seed(int(sys.argv[1]))
cfg = ModelConfig.from_name("smollm2-135m", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, d_ff=128, vocab_size=512,
                            max_seq_len=256)
model = build_model(cfg).eval()
with torch.no_grad():
    model.lm_head.weight.normal_(0, 0.5)
if sys.argv[2] == "1":
    model = quantize_model(model, "int4")  # the default load of a GGUF file: int4 layers, int8 head
prompts = [[5, 17, 300, 42, 1], [9] * 20]
greedy = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
def tokens(engine):
    return [g[0].token_ids for g in engine.generate(prompts[:1], greedy)] + \\
           [g[0].token_ids for g in engine.generate(prompts[1:], greedy)]
eager = tokens(Engine(model, None, EngineConfig(num_blocks=64, block_size=8, max_num_seqs=1)))
t = time.perf_counter()
engine = Engine(model, None, EngineConfig(num_blocks=64, block_size=8, max_num_seqs=1, compile=True))
step = engine.runner.decode_step
assert step.wait([1], timeout=600), step.error
seconds = time.perf_counter() - t
before = step.steps
compiled = tokens(engine)
engine.shutdown()
print(json.dumps(dict(input_major=step.input_major, loaded=sorted(step.loaded), built=sorted(step.built), aot_error=repr(step._aot_error),
                      seconds=seconds, compiled_steps=step.steps - before, same=compiled == eager)))
"""


def start(cache, seed: int, quantize: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env |= {"LMFORGE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", START, str(seed), str(int(quantize))], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # three fresh processes, two of them compiling (~40 s on 2 cores)
def test_a_second_start_loads_the_decode_graph_and_other_weights_compile_their_own(tmp_path):
    cold = start(tmp_path, seed=0)
    assert cold["aot_error"] == "None" and cold["built"] == [1] and cold["loaded"] == []
    assert cold["same"] and cold["compiled_steps"] >= 40  # the compiled steps give the eager tokens
    assert len(list((tmp_path / "decode-graphs").glob("*.pt2"))) == 1

    warm = start(tmp_path, seed=0)
    assert warm["loaded"] == [1], warm  # from the disk cache, not compiled again
    assert warm["same"] and warm["compiled_steps"] >= 40

    other = start(tmp_path, seed=1)  # the same model but other weights: its own graph, its own tokens
    assert other["loaded"] == [] and other["aot_error"] == "None"
    assert other["same"] and other["compiled_steps"] >= 40
    assert len(list((tmp_path / "decode-graphs").glob("*.pt2"))) == 2

    fp32 = start(tmp_path, seed=0, quantize=False)  # float weights: a package of the input-major twin
    assert fp32["input_major"] is True and fp32["loaded"] == [] and fp32["built"] == [1] and fp32["same"]
    assert fp32["aot_error"] == "None" and len(list((tmp_path / "decode-graphs").glob("*.pt2"))) == 3
    again = start(tmp_path, seed=0, quantize=False)
    assert again["loaded"] == [1] and again["same"] and again["compiled_steps"] >= 40


def test_the_weights_hash_changes_with_any_weight_and_ignores_kv_caches():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("smollm2-135m", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, d_ff=128, vocab_size=512,
                                max_seq_len=256)  # fmt: skip
    model = build_model(cfg).eval()
    key = _weights_digest(model)
    assert _weights_digest(model) == key
    model.setup_cache(1, 32)  # a contiguous KV cache is state, not weights
    with torch.no_grad():
        for buf in model.stack.caches.buffers():
            buf.fill_(1)
    assert _weights_digest(model) == key
    model.clear_cache()
    with torch.no_grad():
        p = model.stack.layers[1].mlp.down.weight
        p[3, 5] += 1e-3  # one element of one weight
    assert _weights_digest(model) != key
    with torch.no_grad():
        p[3, 5] -= 1e-3
        p.data = p.data.clone()  # the same values in another tensor: the same hash
    assert _weights_digest(model) == key


def test_the_graph_cache_keeps_under_its_cap_dropping_the_least_recently_used(tmp_path, monkeypatch):
    import os

    from lmforge.engine.runner import _prune

    def package(name: str, size: int, age: int) -> str:
        path = tmp_path / f"{name}.pt2"
        path.write_bytes(b"\0" * size)
        os.utime(path, (1_000_000 - age, 1_000_000 - age))
        return str(path)

    monkeypatch.setenv("LMFORGE_DECODE_CACHE_GB", str(2500 / 2**30))  # 2500 bytes
    old = package("a" * 32 + "-w1", 1000, age=50)  # key a, other weights, oldest of its key
    mid = package("a" * 32 + "-w2", 1000, age=40)  # key a, other weights, newest of its key
    other = package("b" * 32 + "-w1", 1000, age=30)  # another model or version
    recent = package("c" * 32 + "-w1", 1000, age=10)
    new = package("a" * 32 + "-w3", 1000, age=100)  # just written, though its clock says otherwise
    _prune(str(tmp_path), "a" * 32, new)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not os.path.exists(old)  # its key keeps one package of other weights besides the new one
    assert os.path.exists(new) and os.path.exists(recent)  # the new one always; then the most recently used
    assert left == sorted(os.path.basename(p) for p in (new, recent)) and not os.path.exists(mid) and not os.path.exists(other)
