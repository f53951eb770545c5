"""Tiny checkpoints and data files shared by the reward-model, DPO, PPO and GRPO tests."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import torch

from lmforge import ModelConfig, build_model
from lmforge.checkpoints import save_pretrained


@functools.cache
def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer (chat template included) as tokenizer.json, read from the bundled GGUF once
    and kept in the repository's git-ignored .cache/ (reading the GGUF takes seconds)."""
    import os
    import shutil

    from lmforge.tokenizer import load_tokenizer

    d = Path(__file__).resolve().parents[2] / ".cache" / "smollm2-tokenizer"
    if not (d / "tokenizer_config.json").is_file():
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-tokenizer-", dir=d.parent))
        load_tokenizer().save(tmp)
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)  # whole or absent
    return d


@functools.cache
def tiny_model_dir(family: str = "llama", seed: int = 0) -> Path:
    """A 2-layer, 32-wide model of ``family`` with SmolLM2's tokenizer (49152 ids), saved in HF format."""
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_tokenizer_dir())
    preset = {"llama": "smollm2-135m", "gpt2": "gpt2"}[family]
    kw = dict(n_kv_head=2) if family == "llama" else {}
    cfg = ModelConfig.from_name(preset, n_layer=2, n_embd=32, n_head=4, d_ff=64, vocab_size=tok.vocab_size,
                                max_seq_len=160, **kw)  # fmt: skip
    if family == "gpt2":
        cfg = cfg.replace(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(seed)
    model = build_model(cfg)
    d = Path(tempfile.mkdtemp(prefix=f"lmforge-rl-{family}-"))
    save_pretrained(model, d, tokenizer=tok)
    return d


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = ["lovely", "kind", "bright", "gentle", "sweet", "happy", "fair", "noble"]
BAD = ["vile", "cruel", "dark", "foul", "bitter", "wretched", "base", "grim"]


def word_pairs(n: int, seed: int = 0) -> list[dict]:
    """A preference task a tiny model learns in a few steps: chosen responses use pleasant words."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        subject = rng.choice(["the night", "my lord", "this day", "the king", "her voice"])
        rows.append({"prompt": f"Describe {subject}.", "chosen": f"{subject} is {rng.choice(GOOD)}.",
                     "rejected": f"{subject} is {rng.choice(BAD)}."})  # fmt: skip
    return rows


ALPHABET = "abcdefghijklmnopqrstuvwxyz .,"


@functools.cache
def char_model_dir(seed: int = 0) -> Path:
    """A 2-layer decoder over 29 characters (no end-of-sequence token: every completion runs to
    max_new_tokens) — small enough that a few RL steps visibly move it."""
    from lmforge.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text(ALPHABET)
    cfg = ModelConfig.from_name("smollm2-135m", n_layer=2, n_embd=32, n_head=4, n_kv_head=2, d_ff=64,
                                vocab_size=tok.vocab_size, max_seq_len=64, bos_token_id=None, eos_token_id=None,
                                pad_token_id=None)  # fmt: skip
    torch.manual_seed(seed)
    model = build_model(cfg)
    d = Path(tempfile.mkdtemp(prefix="lmforge-rl-char-"))
    save_pretrained(model, d, tokenizer=tok)
    return d


def vowel_share(prompt=None, completion: str = "", **_) -> float:
    """A reward a tiny character model can learn in a few steps: the share of vowels it writes."""
    return sum(c in "aeiou" for c in completion) / max(1, len(completion))


def char_prompts(n: int) -> list[dict]:
    import random

    rng = random.Random(0)
    return [{"prompt": "".join(rng.choice("bcdfg ") for _ in range(4)) + "x"} for _ in range(n)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cli(args: list, procs: int = 2, timeout: int = 600, module: str | None = "lmforge.cli"):
    """``torchrun --nproc_per_node=procs -m lmforge.cli ARGS`` (``module=None``: ARGS start with a
    script) on gloo, one thread per process, with this folder importable (reward functions named
    ``rl_helpers:...``)."""
    import os
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *(["-m", module] if module else []), *map(str, args)]  # fmt: skip
    path = os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(cmd, cwd=here.parents[1], env=env, capture_output=True, text=True, timeout=timeout)


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in recipe.items()))
    return path


def assert_metrics_match(a: list[dict], b: list[dict], keys: list[str], steps: list[int], tol: float = 1e-4) -> None:
    """Two runs' metrics.jsonl records: the same steps, and each of ``keys`` present in both or
    neither, equal within ``tol`` (a distributed run against one process)."""
    assert [r["step"] for r in a] == [r["step"] for r in b] == steps
    for ra, rb in zip(a, b):
        for k in keys:
            assert (k in ra) == (k in rb), k
            if k in ra:
                assert abs(ra[k] - rb[k]) < tol, (ra["step"], k, ra[k], rb[k])
