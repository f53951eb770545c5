"""Attention kinds against sequence length: time and peak memory, every kind in one run.

Kinds (all causal self-attention on (1, 8, T, 64) fp32 tensors): PyTorch SDPA (the CPU flash
kernel), the textbook reference (only where its T x T matrices fit), chunked online softmax,
block-sparse local (window 512), strided and fixed (stride 128), local + 16 global tokens, and
linear attention with elu+1 and FAVOR+ features. One JSON line per (kind, T) with the median time,
the peak tensor bytes and peak RSS rise (see ``lmforge.nn.bench``), the ratio to SDPA and the load
average; then a summary line with the acceptance figures; and attention.png.

    flock /tmp/lmforge-heavy.lock python benchmarks/attention.py [--lengths 1024,4096,8192,16384,32768]
        [--kinds sdpa,chunked,...] [--repeats 3] [--backward] [--out out/bench-attention]

Same as ``lmforge bench-attention``.
"""

from __future__ import annotations

import argparse
import sys

from lmforge.nn.bench import add_parser


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["bench-attention", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
