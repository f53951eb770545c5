"""Decode speed of lmforge's default path on the bundled SmolLM2 GGUF against llama.cpp on the same file.

Both read SmolLM2-135M-Instruct.Q4_1.gguf. lmforge loads it as ``load_model`` does by default
(Q4_1 weights in the int4 kernel, the Q8_0 output head in int8, no dequantizing); llama.cpp runs it
through llama-cpp-python (``make bench`` installs it, built from source for this CPU). Batch 1, the
same thread count on both sides, greedy, the same 16-token prompt, 128 new tokens after the first:
the rate counts those 128 tokens over their time, so prefill is left out on both sides. Each
configuration runs ``--repeats`` times, interleaved, and the median counts. JSON lines:

  llamacpp        lmforge's default path in its steady state vs llama.cpp    target >= 1.0x (stretch 1.2x)
                  (generate/chat/serve decode eagerly while the compiled step builds in the
                  background, then swap it in: the steady state is the compiled int4 step,
                  timed here warm, as compile=True)
  llamacpp_eager  the default path before the swap (eager, quantized) vs llama.cpp
  eager_vs_fp32   lmforge default before the swap (eager, quantized) vs eager fp32   target >= 1.5x
                  (the same file loaded with quantize="none": dequantized, today's reference)
  compiled_int4   compile=True over the quantized model vs eager quantized

llama.cpp's batched prompt evaluation segfaults in its native build here, so it runs with
``n_batch=1`` (the prompt is evaluated a token at a time; decoding is one token a step anyway).
Without llama_cpp installed, its lines are skipped with a message. Every line carries the load
average, since timings on a busy machine are not comparable with quiet ones.

    python benchmarks/decode_llamacpp.py [--threads 2] [--repeats 5] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from lmforge import load_model, load_tokenizer
from lmforge.checkpoints import default_model_path
from lmforge.inference import complete
from lmforge.inference.quantize import describe_linears

PROMPT = "The history of the Roman Empire begins with the founding of the city of Rome, which"


def lmforge_rate(model, prompt: list[int], new: int, compile: bool = False) -> tuple[float, list[int]]:
    """(tokens/s of the ``new`` tokens after the first, the greedy tokens), through the public
    ``complete``: the time of 1 + new tokens minus the time of 1 token (prompt + first token)."""

    def run(n):
        t = time.perf_counter()
        out = complete(model, None, prompt, max_new_tokens=n, temperature=0, ignore_eos=True, compile=compile)
        return time.perf_counter() - t, out.token_ids

    first, _ = run(1)
    total, tokens = run(1 + new)
    return new / (total - first), tokens


def llamacpp_rate(llm, prompt: list[int], new: int) -> tuple[float, list[int]]:
    """(tokens/s of the ``new`` tokens after the first, the greedy tokens): clocked from the first
    generated token to the last, each yielded as soon as it is sampled."""
    llm.reset()
    tokens, first = [], None
    for tok in llm.generate(prompt, temp=0.0, reset=True):
        tokens.append(tok)
        if len(tokens) == 1:
            first = time.perf_counter()
        if len(tokens) == 1 + new:
            break
    return new / (time.perf_counter() - first), tokens


def median_rates(configs: dict, repeats: int) -> dict:
    """A warm-up round (and compilation), then ``repeats`` interleaved rounds; medians."""
    tokens = {name: fn()[1] for name, fn in configs.items()}
    rates = {name: [] for name in configs}
    for _ in range(repeats):
        for name, fn in configs.items():
            rates[name].append(fn()[0])
    return {name: statistics.median(v) for name, v in rates.items()}, tokens


def agreement(a: list[int], b: list[int]) -> float:
    """Share of the leading greedy tokens two runs have in common (both run the same weights:
    they follow each other until a near-tie is rounded differently)."""
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n / max(min(len(a), len(b)), 1)


def emit(**line) -> None:
    line["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(line), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads for both (default 2)")
    ap.add_argument("--new", type=int, default=128, help="tokens timed after the first (default 128)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled int4 line")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    path = default_model_path()
    tok = load_tokenizer(path)
    prompt = tok.encode(PROMPT)[:16]
    quant, fp32 = load_model(path), load_model(path, quantize="none")
    print(f"# {path.name}: default load = {describe_linears(quant)}; {args.threads} threads", file=sys.stderr)

    configs = {
        "ours_quantized": lambda: lmforge_rate(quant, prompt, args.new),
        "ours_fp32": lambda: lmforge_rate(fp32, prompt, args.new),
    }
    try:
        from llama_cpp import Llama
    except ImportError:
        Llama = None
        print("# llama_cpp is not installed (make bench installs llama-cpp-python): llama.cpp lines skipped", file=sys.stderr)
    if Llama is not None:
        llm = Llama(model_path=str(path), n_threads=args.threads, n_threads_batch=args.threads, n_batch=1, n_ubatch=1,
                    n_ctx=256, verbose=False)  # fmt: skip
        configs["llamacpp"] = lambda: llamacpp_rate(llm, prompt, args.new)
    if not args.no_compile:
        configs["ours_compiled"] = lambda: lmforge_rate(quant, prompt, args.new, compile=True)

    rates, tokens = median_rates(configs, args.repeats)
    common = dict(model=path.name, batch=1, threads=args.threads, new_tokens=args.new, repeats=args.repeats)
    llama = rates.get("llamacpp")
    theirs = dict(theirs="llama.cpp (llama-cpp-python, n_batch=1)", theirs_tok_s=round(llama, 1)) if llama else {}
    if llama and "ours_compiled" in rates:
        emit(bench="llamacpp", ours="lmforge default path, steady state (the compiled int4 step it swaps in)",
             ours_tok_s=round(rates["ours_compiled"], 1), **theirs, ratio=round(rates["ours_compiled"] / llama, 3), target=1.0,
             stretch=1.2, same_greedy_prefix=round(agreement(tokens["ours_compiled"], tokens["llamacpp"]), 3), **common)  # fmt: skip
    if llama:
        emit(bench="llamacpp_eager", ours="lmforge default path before the swap (eager, quantized)",
             ours_tok_s=round(rates["ours_quantized"], 1), **theirs, ratio=round(rates["ours_quantized"] / llama, 3),
             same_greedy_prefix=round(agreement(tokens["ours_quantized"], tokens["llamacpp"]), 3), **common)  # fmt: skip
    emit(bench="eager_vs_fp32", ours="lmforge default before the swap (eager, quantized)", ours_tok_s=round(rates["ours_quantized"], 1),
         theirs="lmforge eager fp32 (quantize='none')", theirs_tok_s=round(rates["ours_fp32"], 1),
         ratio=round(rates["ours_quantized"] / rates["ours_fp32"], 3), target=1.5, **common)  # fmt: skip
    if "ours_compiled" in rates:
        emit(bench="compiled_int4", ours="lmforge compile=True, quantized", ours_tok_s=round(rates["ours_compiled"], 1),
             theirs="lmforge eager, quantized", theirs_tok_s=round(rates["ours_quantized"], 1),
             ratio=round(rates["ours_compiled"] / rates["ours_quantized"], 3), **common)  # fmt: skip


if __name__ == "__main__":
    main()
