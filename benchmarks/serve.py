"""Serving throughput: lmforge's server at 1, 4, 16 and 32 concurrent streams vs sequential
`transformers` generate on the same weights, in one run.

    python benchmarks/serve.py [--max-tokens 32] [--repeats 3] [--threads N]

The server (``lmforge.serve``, the bundled SmolLM2-135M-Instruct GGUF loaded the default way: its Q4_1
weights in the int4 kernel, the Q8_0 head in int8; decode steps on the compiled graphs of their batch
buckets, as `lmforge serve` runs by default, built before the timed runs; ``--no-compile``: eager) runs
in a child process;
clients stream chat completions over HTTP on 127.0.0.1. Every stream is greedy and generates exactly
--max-tokens tokens (``ignore_eos``), every prompt is distinct (only the chat template's system
prompt is shared, as in real traffic). The baseline loads the very same weights into
``transformers``' LlamaForCausalLM (written out by our own converter) and generates the same prompts
one after another, greedy, with exactly as many new tokens. Both sides use the same number of
torch threads. Aggregate tokens/s are medians over --repeats runs; time to first token (TTFT) and
inter-token latency (ITL) are p50/p99 over all streams of all runs at each concurrency.

Prints progress to stderr and JSON lines to stdout, each with ours, theirs (sequential transformers
tokens/s, fp32: the same file dequantized) and the ratio:

  serve          aggregate tokens/s at 16 streams vs sequential transformers      target >= 8x
  serve_single   one stream through the server vs transformers                    target >= 1.0x

then the details per concurrency (tokens/s, TTFT and ITL p50/p99) in the first line. Every line
carries the load average: timings on a busy machine are not comparable with quiet ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import torch

TOPICS = ["a dragon", "the sea", "a robot", "winter", "a lost key", "the moon", "a small town", "a violin",
          "a storm", "an old map", "a garden", "a train", "a lighthouse", "a cat", "a mountain", "a library"]  # fmt: skip


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def question(tag: str, i: int) -> str:
    return f"[{tag}] Write a short story about {TOPICS[i % len(TOPICS)]}, number {i}."


# --- the server side -----------------------------------------------------------------------------
def start_server(threads: int, kv_cache_gb: float, compile: bool) -> tuple[subprocess.Popen, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    code = (
        "import torch, sys; torch.set_num_threads(int(sys.argv[1]));"
        "from lmforge.serve.server import serve; serve(host='127.0.0.1', port=int(sys.argv[2]), kv_cache_gb=float(sys.argv[3]),"
        " compile=sys.argv[4] == '1')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(threads), str(port), str(kv_cache_gb), str(int(compile))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up:\n" + proc.stderr.read().decode()[-2000:])
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start within 300 s")
        time.sleep(0.2)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise RuntimeError(f"/metrics has no {name}")


def warm_compiled(url: str, model: str, levels: list[int], max_tokens: int, timeout: float = 3600) -> None:
    """Run every concurrency once and wait until the decode graphs those batch sizes asked for are
    built; repeat until a round asks for no new graph, so no compile runs beside the timed runs."""
    deadline = time.monotonic() + timeout
    while True:
        before = metric(url, "lmforge_compiled_decode_graphs")
        for s in levels:
            asyncio.run(run_level(url, model, s, max_tokens, "warm"))
        while metric(url, "lmforge_compiled_decode_pending") > 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the decode graphs were not built within {timeout:.0f} s")
            time.sleep(1)
        built = metric(url, "lmforge_compiled_decode_graphs")
        log(f"compiled decode graphs: {built:.0f}")
        if built == before:
            return


async def one_stream(client: httpx.AsyncClient, model: str, text: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    times, tokens, content = [], 0, ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                if c["delta"].get("content"):
                    times.append(time.perf_counter())
                    content += c["delta"]["content"]
    end = time.perf_counter()
    return {"start": start, "end": end, "tokens": tokens, "ttft": times[0] - start if times else float("nan"),
            "itl": [b - a for a, b in zip(times, times[1:])], "text": content}  # fmt: skip


async def run_level(url: str, model: str, streams: int, max_tokens: int, tag: str) -> list[dict]:
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        return await asyncio.gather(*(one_stream(client, model, question(tag, i), max_tokens) for i in range(streams)))


# --- the baseline --------------------------------------------------------------------------------
def transformers_baseline(model, tokenizer, max_tokens: int, n_requests: int, repeats: int) -> tuple[float, str]:
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    eos = tokenizer.eos_id

    def ids_of(text: str) -> torch.Tensor:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        return torch.tensor([tokenizer.encode(chat, add_special_tokens=False)])

    def gen(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                               min_new_tokens=max_tokens, do_sample=False, pad_token_id=eos)  # fmt: skip

    first = gen(ids_of(question("warm", 0)))
    first_text = tokenizer.decode(first[0, -max_tokens:].tolist(), skip_special_tokens=True)
    rates = []
    for r in range(repeats):
        start, tokens = time.perf_counter(), 0
        for i in range(n_requests):
            ids = ids_of(question(f"hf{r}", i))
            out = gen(ids)
            tokens += out.shape[1] - ids.shape[1]
        rates.append(tokens / (time.perf_counter() - start))
        log(f"transformers sequential, run {r + 1}: {rates[-1]:.1f} tokens/s")
    return statistics.median(rates), first_text


def _common_words(a: str, b: str) -> str:
    wa, wb = a.split(), b.split()
    n = next((i for i, (x, y) in enumerate(zip(wa, wb)) if x != y), min(len(wa), len(wb)))
    return f"{n}/{max(len(wa), len(wb))}"


# --- main ----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="1,4,16,32", help="concurrency levels, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens generated per stream")
    ap.add_argument("--repeats", type=int, default=3, help="runs per level (the median is reported)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    ap.add_argument("--hf-requests", type=int, default=4, help="sequential transformers requests per run")
    ap.add_argument("--kv-cache-gb", type=float, default=1.0)
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="decode eagerly (default: as `lmforge serve`, decode steps on compiled graphs, built before timing)")
    args = ap.parse_args()
    levels = [int(s) for s in args.streams.split(",")]
    torch.set_num_threads(args.threads)

    from lmforge.checkpoints import default_model_path, load_model
    from lmforge.tokenizer import load_tokenizer

    log(f"starting the server (torch threads: {args.threads}) ...")
    proc, url = start_server(args.threads, args.kv_cache_gb, args.compile)
    results: dict[int, dict] = {}
    try:
        model_name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(run_level(url, model_name, 2, 4, "warm"))  # first-call costs out of the way
        if args.compile:
            warm_compiled(url, model_name, levels, args.max_tokens)
        greedy_text = asyncio.run(run_level(url, model_name, 1, args.max_tokens, "warm"))[0]["text"]
        for s in levels:
            rates, ttft, itl = [], [], []
            for r in range(args.repeats):
                streams = asyncio.run(run_level(url, model_name, s, args.max_tokens, f"s{s}r{r}"))
                wall = max(x["end"] for x in streams) - min(x["start"] for x in streams)
                tokens = sum(x["tokens"] for x in streams)
                if tokens != s * args.max_tokens:
                    raise RuntimeError(f"expected {s * args.max_tokens} tokens at {s} streams, got {tokens}")
                rates.append(tokens / wall)
                ttft += [x["ttft"] for x in streams]
                itl += [g for x in streams for g in x["itl"]]
                log(f"{s:>2} streams, run {r + 1}: {rates[-1]:.1f} tokens/s")
            results[s] = {
                "tokens_per_s": round(statistics.median(rates), 2),
                "ttft_ms": {"p50": round(percentile(ttft, 0.5) * 1e3, 1), "p99": round(percentile(ttft, 0.99) * 1e3, 1)},
                "itl_ms": {"p50": round(percentile(itl, 0.5) * 1e3, 1), "p99": round(percentile(itl, 0.99) * 1e3, 1)},
            }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    log("transformers baseline ...")
    model, tokenizer = load_model(quantize="none"), load_tokenizer(default_model_path())
    theirs, hf_text = transformers_baseline(model, tokenizer, args.max_tokens, args.hf_requests, args.repeats)
    for s in results:
        results[s]["ratio"] = round(results[s]["tokens_per_s"] / theirs, 2)
    key = 16 if 16 in results else max(results)
    common = {"model": "SmolLM2-135M-Instruct Q4_1 GGUF (lmforge: default load, int4/int8; transformers: dequantized fp32)",
              "lmforge_decode": "compiled graphs per batch bucket" if args.compile else "eager",
              "max_tokens": args.max_tokens, "repeats": args.repeats, "torch_threads": args.threads,
              "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}  # fmt: skip
    print(json.dumps({
        "bench": "serve",
        "metric": f"aggregate generated tokens/s at {key} concurrent streams vs sequential transformers generate",
        "ours": results[key]["tokens_per_s"],
        "theirs": round(theirs, 2),
        "ratio": results[key]["ratio"],
        "target_ratio": 8.0,
        "by_streams": {str(s): v for s, v in results.items()},
        # the int4 path follows fp32 until a near-tie rounds the other way (parity of the fp32 path
        # is tested: tests/inference/test_smollm2.py vs transformers, tests/serve/test_serve_smollm2.py
        # server vs generate); this says how far they agree here
        "same_greedy_words_as_transformers": _common_words(greedy_text, hf_text),
        **common,
    }))
    if 1 in results:
        print(json.dumps({"bench": "serve_single", "metric": "one stream through the server vs transformers generate",
                          "ours": results[1]["tokens_per_s"], "theirs": round(theirs, 2), "ratio": results[1]["ratio"],
                          "target_ratio": 1.0, **common}))  # fmt: skip


if __name__ == "__main__":
    main()
