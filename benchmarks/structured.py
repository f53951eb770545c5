"""Per-token cost of constrained decoding (grammar masks) on the bundled SmolLM2, at batch 1 and 16.

Each round decodes the same prompts for --tokens tokens free and under a grammar that never ends
early (a regex over lowercase text, ignore_eos), on the default (quantized, eager) path; the
decode rate excludes the prompt. Prints one JSON line per batch size with both rates and the
overhead (target: at most 10% at batch 1), medians of --repeats interleaved rounds.

    python benchmarks/structured.py [--threads 1] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from lmforge.checkpoints import load_model
from lmforge.engine.constraints import compile_grammar
from lmforge.engine.sampler import SamplingParams
from lmforge.inference import Generator
from lmforge.tokenizer import load_tokenizer


def rate(gen: Generator, prompts: list[list[int]], params: SamplingParams) -> float:
    run = gen.run(prompts, params)
    run.finish()
    t = run.timing
    return t["decode_steps"] * len(prompts) / t["decode_s"]  # tokens per second after the first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(), load_tokenizer()
    gen = Generator(model, tok)
    grammar = compile_grammar(regex=r"[a-z ,.]+")
    prompt = tok.encode("Write a sentence about the sea:")
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [prompt] * batch
        free = SamplingParams(max_new_tokens=args.tokens, temperature=0.8, seed=0, ignore_eos=True)
        masked = SamplingParams(max_new_tokens=args.tokens, temperature=0.8, seed=0, ignore_eos=True, constraint=grammar)
        rate(gen, prompts, free), rate(gen, prompts, masked)  # warm-up
        a, b = [], []
        for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits both
            a.append(rate(gen, prompts, free))
            b.append(rate(gen, prompts, masked))
        fa, fb = statistics.median(a), statistics.median(b)
        print(json.dumps({"claim": "structured_overhead", "batch": batch, "tokens": args.tokens, "threads": args.threads,
                          "free_tok_s": round(fa, 1), "constrained_tok_s": round(fb, 1), "overhead": round(fa / fb - 1, 4),
                          "load": round(os.getloadavg()[0], 2)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
