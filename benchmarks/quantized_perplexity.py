"""WikiText-2 perplexity of the bundled SmolLM2 GGUF as lmforge runs it quantized, against the
dequantized fp32 model (the reference), in one run. Target: the default path within 1%.

The text is ``../shared/data/wikitext2-test.txt`` (repository-relative), its first ``--tokens``
tokens (default 65,536), scored by ``lmforge.eval.perplexity.perplexity`` with strided windows
(``--context`` 1024, ``--stride`` 512). One JSON line per way of loading:

  default      load_model(path): Q4_1 weights in the int4 kernel, the Q8_0 head in int8
  int8         load_model(path, quantize="int8"): every layer dequantized, then int8 per channel
  bf16         load_model(path, dtype="bf16"): the default, with bfloat16 everywhere else too

    python benchmarks/quantized_perplexity.py [--tokens 65536] [--only default int8 bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from lmforge import load_model, load_tokenizer
from lmforge.checkpoints import default_model_path
from lmforge.eval.perplexity import perplexity

WIKITEXT = Path(__file__).resolve().parents[1] / "../shared/data/wikitext2-test.txt"
WAYS = {"default": {}, "int8": {"quantize": "int8"}, "bf16": {"dtype": "bf16"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", choices=list(WAYS), default=["default"], help="ways of loading to score (default: default)")
    args = ap.parse_args()
    if not WIKITEXT.exists():
        print(json.dumps({"bench": "quantized_perplexity", "skipped": f"{WIKITEXT} not found"}))
        return
    torch.set_num_threads(args.threads)
    path = default_model_path()
    tok = load_tokenizer(path)
    text = WIKITEXT.read_text(encoding="utf-8")
    ids = tok.encode(text[: args.tokens * 8])[: args.tokens]  # ~4 characters a token: enough text
    kw = dict(context=args.context, stride=args.stride, progress=True)

    def score(**load):
        model = load_model(path, **load)
        t = time.perf_counter()
        ppl = perplexity(model, ids, **kw).ppl
        return ppl, time.perf_counter() - t

    ref, ref_s = score(quantize="none")
    common = dict(model=path.name, tokens=len(ids), context=args.context, stride=args.stride, threads=args.threads)
    for way in args.only:
        ppl, secs = score(**WAYS[way])
        call = "load_model(path" + "".join(f", {k}={v!r}" for k, v in WAYS[way].items()) + ")"
        print(json.dumps(dict(bench="quantized_perplexity", ours=f"{way}: {call}", ours_ppl=round(ppl, 4),
                              theirs="dequantized fp32 (quantize='none')", theirs_ppl=round(ref, 4),
                              ratio=round(ppl / ref, 5), target="within 1%", ours_s=round(secs, 1), theirs_s=round(ref_s, 1),
                              load_avg_1m=round(os.getloadavg()[0], 2), **common)), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
