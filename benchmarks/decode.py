"""Decode speed of lmforge against transformers' ``generate``, on identical weights, in one run.

Models: SmolLM2-135M-Instruct (the bundled GGUF, dequantised to fp32) and a GPT-2 124M config
(random weights). transformers loads the very weights lmforge saved (``save_pretrained``).

Decode tokens/s counts the tokens after the first one over the time after the first one, so
prefill is left out on both sides. Each configuration runs ``--repeats`` times, interleaved with
the others, and the median counts. Prints one JSON line per claim:

  decode    ours (compile=True, and eager) vs transformers, batch 1 and 8   target >= 1.5x at batch 1
  kv_cache  256 new tokens with the KV cache vs recomputing everything      target >= 5x
  int8      quantize="int8" vs fp32, batch 1 (compiled, and eager)          target >= 1.3x
  roofline  is in each decode line: weight bytes read per step x steps/s / memory bandwidth
            (bandwidth measured in this run by summing a 1 GiB tensor)
  ceiling   batch-1 lines also time a bare loop of ``x @ Wt`` over the model's own linear weights
            (the fastest matrix-vector path measured here): ``floor`` is that loop's rate, about
            the most tokens/s an fp32 batch-1 decoder reaches on this machine, ``ceiling_ratio``
            = floor / theirs is about the most any decoder can gain over transformers, and
            ``ours_of_floor`` says how close we are to it

    python benchmarks/decode.py [--quick] [--no-compile] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge import ModelConfig, load_model
from lmforge.inference import Generator, SamplingParams
from lmforge.inference.quantize import Int8Linear
from lmforge.models import build_model


_BANDWIDTH: list[float] = []


def bandwidth_gb_s(repeats: int = 3) -> float:
    """Read bandwidth: GB/s of summing a 1 GiB fp32 tensor (best of repeats). The machine's peak is
    the best of every such measurement in the run (they are taken between the timed rounds too)."""
    x = torch.ones(2**28)
    x.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    _BANDWIDTH.append(x.numel() * 4 / min(times) / 1e9)
    return max(_BANDWIDTH)


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: every matrix a token passes through (the output
    head included, tied or not), norms and biases; embedding tables only give one row per token."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if isinstance(module, Int8Linear):
            tensors = [t for t in (module.weight, module.scales, module.bias) if t is not None]
        elif module.__class__.__name__ == "KVCache" or module.__class__.__name__ == "RotaryEmbedding":
            continue
        for t in tensors:
            if id(t) not in seen and t.dtype != torch.bool:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def streaming_floor(model):
    """A function timing one pass of ``x @ Wt`` over every linear weight of ``model`` (input-major
    copies, batch 1): the weight streaming a decode step cannot avoid, at MKL's best matrix-vector
    speed. Returns passes/s, comparable to tokens/s."""
    mats = [m.weight.detach().t().contiguous() for m in model.modules() if type(m) is torch.nn.Linear]
    xs = {n: torch.randn(1, n) for n in {w.shape[0] for w in mats}}

    def rate() -> float:
        t = time.perf_counter()
        for w in mats:
            xs[w.shape[0]] @ w
        return 1 / (time.perf_counter() - t)

    return rate


class FirstTokenClock:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


def theirs_decode(hf, prompts: torch.Tensor, new: int) -> float:
    """transformers' decode tokens/s. At batch 1 a streamer clocks the first token; streamers take
    batch 1 only, so at batch 8 the time of 1 new token is subtracted from that of ``new``."""

    def run(n, streamer=None):
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0, streamer=streamer)  # fmt: skip
        return time.perf_counter() - t

    if prompts.shape[0] == 1:
        clock = FirstTokenClock()
        run(new, clock)
        return (new - 1) / (time.perf_counter() - clock.first)
    return (new - 1) * prompts.shape[0] / (run(new) - run(1))


def ours_decode(gen: Generator, prompts: list[list[int]], new: int) -> float:
    t = gen.run(prompts, SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)).finish().timing
    return t["decode_steps"] * len(prompts) / t["decode_s"]


def ours_total_s(gen: Generator, prompt: list[int], new: int, use_cache: bool) -> float:
    t = time.perf_counter()
    gen.complete(prompt, max_new_tokens=new, temperature=0, ignore_eos=True, use_cache=use_cache)
    return time.perf_counter() - t


def median_rates(configs: dict, repeats: int) -> dict:
    """Run every configuration once to warm up (and compile), then ``repeats`` interleaved rounds."""
    for fn in configs.values():
        fn()
    results = {name: [] for name in configs}
    for _ in range(repeats):
        for name, fn in configs.items():
            results[name].append(fn())
        bandwidth_gb_s(1)
    return {name: statistics.median(v) for name, v in results.items()}


def emit(**line) -> None:
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in line.items()}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens (a smoke run, not for claims)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled configurations")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="smollm2,gpt2")
    ap.add_argument("--claims", default="decode,int8,kv_cache", help="which claims to measure (int8 and kv_cache: smollm2 only)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both sides (default: torch's). On a busy machine 1 avoids OpenMP "
                         "barriers waiting on descheduled threads, which can slow every op several-fold")  # fmt: skip
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    new = 32 if args.quick else 128
    bandwidth_gb_s()
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    for name in args.models.split(","):
        torch.manual_seed(0)
        if name == "smollm2":
            model = load_model(quantize="none")  # bundled SmolLM2-135M-Instruct, fp32
        elif name == "gpt2":
            model = build_model(ModelConfig.from_name("gpt2")).eval()  # GPT-2 124M config, random weights
        else:
            raise SystemExit(f"unknown model {name!r}: choose smollm2 or gpt2")
        model.save_pretrained(tmp / name)
        hf = AutoModelForCausalLM.from_pretrained(tmp / name, dtype=torch.float32).eval()
        prompts = torch.randint(100, 1000, (8, 16)).tolist()
        step_bytes = weight_bytes_per_step(model)

        eager = Generator(model)
        compiled = None if args.no_compile else Generator(model, compile=True)
        claims = args.claims.split(",")
        for batch in (1, 8) if "decode" in claims else ():
            ours_p = prompts[:batch]
            hf_p = torch.tensor(ours_p)
            configs = {"theirs": lambda: theirs_decode(hf, hf_p, new), "eager": lambda: ours_decode(eager, ours_p, new)}
            if compiled is not None:
                configs["compiled"] = lambda: ours_decode(compiled, ours_p, new)
            if batch == 1:
                floor = streaming_floor(model)
                configs["floor"] = lambda: statistics.median(floor() for _ in range(5))
            r = median_rates(configs, args.repeats)
            best = r.get("compiled", r["eager"])
            ceiling = dict(floor=r["floor"], ceiling_ratio=r["floor"] / r["theirs"], ours_of_floor=best / r["floor"]) if batch == 1 else {}
            emit(bench="decode", model=name, dtype="fp32", batch=batch, new_tokens=new,
                 ours=best, ours_mode="compiled" if compiled else "eager", theirs=r["theirs"], ratio=best / r["theirs"],
                 ours_eager=r["eager"], ratio_eager=r["eager"] / r["theirs"],
                 roofline_fraction=step_bytes * best / batch / (max(_BANDWIDTH) * 1e9), bandwidth_gb_s=max(_BANDWIDTH),
                 weight_mb_per_step=step_bytes / 1e6, **ceiling, target=1.5 if batch == 1 else None,
                 met=(best / r["theirs"] >= 1.5) if batch == 1 else None)  # fmt: skip

        if name == "smollm2" and "int8" in claims:
            quant = Generator(model, quantize="int8")
            q_bytes = weight_bytes_per_step(quant.model)
            configs = {"fp32_eager": lambda: ours_decode(eager, prompts[:1], new),
                       "int8_eager": lambda: ours_decode(quant, prompts[:1], new)}  # fmt: skip
            qc = None
            if compiled is not None:
                qc = Generator(model, quantize="int8", compile=True)
                configs |= {"fp32_compiled": lambda: ours_decode(compiled, prompts[:1], new),
                            "int8_compiled": lambda: ours_decode(qc, prompts[:1], new)}  # fmt: skip
            r = median_rates(configs, args.repeats)
            mode = "compiled" if qc is not None else "eager"
            ratio = r[f"int8_{mode}"] / r[f"fp32_{mode}"]
            emit(bench="int8", model=name, batch=1, mode=mode, ours=r[f"int8_{mode}"], theirs=r[f"fp32_{mode}"],
                 ratio=ratio, ratio_eager=r["int8_eager"] / r["fp32_eager"], int8_eager=r["int8_eager"],
                 fp32_eager=r["fp32_eager"], roofline_fraction=q_bytes * r[f"int8_{mode}"] / (max(_BANDWIDTH) * 1e9),
                 weight_mb_per_step=q_bytes / 1e6, target=1.3, met=ratio >= 1.3)  # fmt: skip
            del quant, qc
        if name == "smollm2" and "kv_cache" in claims:
            kv_new = 64 if args.quick else 256
            cached = statistics.median(ours_total_s(eager, prompts[0], kv_new, True) for _ in range(args.repeats))
            uncached = ours_total_s(eager, prompts[0], kv_new, False)  # minutes; once is enough
            emit(bench="kv_cache", model=name, batch=1, new_tokens=kv_new, mode="eager", ours=kv_new / cached,
                 theirs=kv_new / uncached, ratio=uncached / cached, target=5.0, met=uncached / cached >= 5.0)  # fmt: skip
        del model, hf, eager, compiled
    emit(bench="bandwidth", gb_s=max(_BANDWIDTH), median_gb_s=statistics.median(_BANDWIDTH), samples=len(_BANDWIDTH),
         threads=torch.get_num_threads())  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
