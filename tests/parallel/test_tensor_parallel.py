"""Tensor parallelism over 2 gloo processes: logits and greedy tokens equal one process's."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lmforge.config import ModelConfig
from lmforge.models import build_model
from lmforge.parallel.tensor import TensorParallelError, check_tensor_parallel, tensor_parallel

CONFIGS = {
    "llama-gqa": dict(preset="smollm2-135m", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, d_ff=96, vocab_size=101, max_seq_len=64),
    "gpt2-bias": dict(preset="gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=101, max_seq_len=64),
}
PROMPT = [3, 14, 15, 92, 65, 35]


def tiny(name):
    kw = dict(CONFIGS[name])
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name(kw.pop("preset"), **kw)).eval()
    with torch.no_grad():  # non-zero biases, so a mis-split bias would show
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def run(model):
    from lmforge.inference import complete

    x = torch.tensor([PROMPT + [7, 7, 1]])
    with torch.no_grad():
        logits = model(x)
    c = complete(model, None, PROMPT, max_new_tokens=12, temperature=0)
    return logits, c.token_ids


def worker(rank, world, port, name, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from lmforge.parallel.tensor import init_tensor_parallel

    mesh = init_tensor_parallel(world)
    model = tensor_parallel(tiny(name), mesh)
    logits, tokens = run(model)
    torch.save({"logits": logits, "tokens": tokens, "local_heads": model.stack.layers[0].attn.n_head}, f"{out}.{rank}")
    import torch.distributed as dist

    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_equal_one_process(tmp_path, name):
    ref_logits, ref_tokens = run(tiny(name))
    out = tmp_path / "result"
    mp.start_processes(worker, args=(2, free_port(), name, str(out)), nprocs=2, start_method="spawn")
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        assert got["local_heads"] == CONFIGS[name]["n_head"] // 2
        torch.testing.assert_close(got["logits"], ref_logits, rtol=1e-5, atol=1e-5)
        assert got["tokens"] == ref_tokens


def test_what_cannot_be_split_says_why():
    cfg = ModelConfig.from_name("smollm2-135m", n_head=6, n_kv_head=3, n_embd=48)
    with pytest.raises(TensorParallelError, match="n_kv_head=3 is not divisible by --tensor-parallel 2"):
        check_tensor_parallel(cfg, 2)
    with pytest.raises(TensorParallelError, match="alibi"):
        check_tensor_parallel(ModelConfig.from_name("smollm2-135m", position="alibi"), 2)
    with pytest.raises(TensorParallelError, match="encoder-decoder"):
        check_tensor_parallel(ModelConfig.from_name("t5-small"), 2)


def tiny_checkpoint(path):
    """A tiny random LLaMA-style checkpoint with SmolLM2's tokenizer, for the CLI under torchrun."""
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer()
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("smollm2-135m", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, d_ff=96,
                                              vocab_size=tok.vocab_size, max_seq_len=128))  # fmt: skip
    model.save_pretrained(path, tokenizer=tok)


@pytest.mark.slow
def test_cli_generate_under_torchrun_prints_one_processs_text(tmp_path):
    """`torchrun --nproc_per_node 2 -m lmforge.cli generate --tensor-parallel 2` prints (once) the greedy text of one process."""
    import subprocess
    import sys

    tiny_checkpoint(tmp_path / "ckpt")
    args = ["generate", str(tmp_path / "ckpt"), "-p", "Once upon a time", "--max-new-tokens", "12", "--temperature", "0", "--no-compile"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, env=env, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                          "-m", "lmforge.cli", *args, "--tensor-parallel", "2"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert one.stdout.strip() and two.stdout == one.stdout
    refused = subprocess.run([sys.executable, "-m", "lmforge.cli", *args, "--tensor-parallel", "2"], capture_output=True, text=True,
                             env=env, timeout=300)  # fmt: skip
    assert refused.returncode == 2 and "needs 2 processes" in refused.stderr


# --- serving: rank 0's engine drives the other ranks -------------------------------------------
def engine_tokens(model, rank0: bool = True):
    from lmforge.engine import Engine, EngineConfig
    from lmforge.engine.sampler import SamplingParams

    engine = Engine(model, None, EngineConfig(num_blocks=32, block_size=4, max_num_batched_tokens=8))
    prompts = [PROMPT, PROMPT[:3] + [9] * 7, [5, 4]]  # chunked prefill beside decodes
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    return engine, prompts, params


def engine_worker(rank, world, port, name, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from lmforge.parallel.tensor import follow, init_tensor_parallel, lockstep

    model = tensor_parallel(tiny(name), init_tensor_parallel(world))
    engine, prompts, params = engine_tokens(model)
    if rank == 0:
        lockstep(engine)
        result = [r[0].token_ids for r in engine.generate(prompts, params)]
        engine.runner.close()
    else:
        result = follow(engine)  # the number of forwards it took part in
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


def test_the_serving_engine_under_two_ranks_equals_one_process(tmp_path):
    engine, prompts, params = engine_tokens(tiny("llama-gqa"))
    ref = [r[0].token_ids for r in engine.generate(prompts, params)]
    out = tmp_path / "result"
    mp.start_processes(engine_worker, args=(2, free_port(), "llama-gqa", str(out)), nprocs=2, start_method="spawn")
    assert torch.load(f"{out}.0") == ref
    assert torch.load(f"{out}.1") >= 10  # rank 1 ran every step with rank 0 (then was released)


@pytest.mark.slow
def test_cli_serve_under_torchrun_answers_with_one_processs_text(tmp_path):
    """`torchrun --nproc_per_node 2 -m lmforge.cli serve --tensor-parallel 2`: greedy completions equal one process's."""
    import signal
    import subprocess
    import sys
    import time

    import httpx

    tiny_checkpoint(tmp_path / "ckpt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    body = {"model": "ckpt", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}

    def answer(cmd):
        port = free_port()
        proc = subprocess.Popen([*cmd, "serve", str(tmp_path / "ckpt"), "--port", str(port), "--kv-cache-gb", "0.01"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 240
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:] if proc.poll() is not None else "timeout"
                time.sleep(0.5)
            texts = [httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
                     for _ in range(2)]  # fmt: skip
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        return texts, code, proc.stdout.read()

    one, _, _ = answer([sys.executable, "-m", "lmforge.cli"])
    two, _, log = answer([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                        "-m", "lmforge.cli"])  # fmt: skip
    assert one[0] and one[0] == one[1]
    assert two == one
    # Ctrl-C: rank 0 shuts its server down and releases rank 1; torchrun itself then exits 1 with its
    # SignalException, but no worker may fail or hang in a collective
    assert "Application shutdown complete" in log and "ChildFailedError" not in log, log[-3000:]
    assert "lmforge/" not in log, log[-3000:]  # no worker traceback


@pytest.mark.slow
def test_smollm2_under_three_ranks_prints_one_processs_greedy_text():
    """The bundled SmolLM2-135M (fp32) split over 3 gloo processes (its 9 heads and 3 KV heads split 3
    ways, not 2) prints one process's greedy text, which tests/inference/test_smollm2.py holds equal
    to transformers'."""
    import subprocess
    import sys

    args = ["generate", "-p", "The capital of France is", "--max-new-tokens", "12", "--temperature", "0", "--no-compile",
            "--quantize", "none"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, env=env, timeout=300)
    three = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port", str(free_port()),
                            "-m", "lmforge.cli", *args, "--tensor-parallel", "3"], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert one.returncode == 0 and three.returncode == 0, three.stderr[-2000:]
    assert "Paris" in one.stdout and three.stdout == one.stdout
