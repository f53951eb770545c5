"""64 concurrent clients x 4 requests of mixed lengths through the server, some cancelled mid-stream,
on a KV pool small enough that the engine has to preempt: no 5xx, and every block free at idle."""

import asyncio
import random
import time

import httpx
import openai
import pytest
from serve_helpers import running_server

from lmforge.engine import Engine, EngineConfig
from lmforge.serve.server import create_app

MODEL = "tiny"


@pytest.mark.slow
def test_64_clients_x_4_requests(tiny, tokenizer):
    engine = Engine(tiny, tokenizer, EngineConfig(num_blocks=160, block_size=8, max_num_seqs=64, max_num_batched_tokens=256))
    with running_server(create_app(engine, MODEL)) as url:
        stats = {"done": 0, "cancelled": 0, "streamed": 0}
        failures: list[str] = []

        async def client_task(c: int, client: openai.AsyncOpenAI) -> None:
            rng = random.Random(c)
            for k in range(4):
                words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "echo"]) for _ in range(rng.randint(1, 120)))
                max_tokens = rng.randint(1, 48)
                stream = rng.random() < 0.6
                cancel_after = rng.randint(1, 4) if stream and rng.random() < 0.3 else None
                try:
                    if rng.random() < 0.5:
                        kw = dict(model=MODEL, messages=[{"role": "user", "content": words}], max_tokens=max_tokens,
                                  temperature=rng.choice([0.0, 0.8]), seed=c * 10 + k)  # fmt: skip
                        call = client.chat.completions.create
                    else:
                        kw = dict(model=MODEL, prompt=words, max_tokens=max_tokens, temperature=rng.choice([0.0, 0.8]),
                                  extra_body={"top_k": 40})  # fmt: skip
                        call = client.completions.create
                    if not stream:
                        r = await call(**kw)
                        assert r.choices[0].finish_reason in ("stop", "length")
                        assert r.usage.completion_tokens <= max_tokens
                    else:
                        s = await call(**kw, stream=True)
                        n = 0
                        async for _ in s:
                            n += 1
                            if cancel_after is not None and n >= cancel_after:
                                await s.close()  # the client hangs up mid-stream
                                stats["cancelled"] += 1
                                break
                        stats["streamed"] += 1
                    stats["done"] += 1
                except openai.APIStatusError as e:
                    failures.append(f"client {c} request {k}: HTTP {e.status_code}: {e.message}")
                except Exception as e:  # noqa: BLE001 - every failure is reported below
                    failures.append(f"client {c} request {k}: {type(e).__name__}: {e}")

        async def main() -> None:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120,
                                        http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=128)))  # fmt: skip
            try:
                await asyncio.gather(*(client_task(c, client) for c in range(64)))
            finally:
                await client.close()

        t0 = time.monotonic()
        asyncio.run(main())
        elapsed = time.monotonic() - t0
        assert not failures, "\n".join(failures[:10])
        assert stats["done"] == 256 and stats["cancelled"] > 0
        deadline = time.monotonic() + 10
        while engine.has_work() or engine.blocks.num_used:
            assert time.monotonic() < deadline, f"engine not idle: {engine.stats()}"
            time.sleep(0.02)
        st = engine.stats()
        assert st["kv_blocks_used"] == 0 and st["kv_blocks_free"] == st["kv_blocks_total"]
        assert st["running"] == 0 and st["waiting"] == 0
        metrics = httpx.get(url + "/metrics").text
        assert "lmforge_kv_blocks_in_use 0" in metrics
        statuses = [line for line in metrics.splitlines() if line.startswith("lmforge_http_requests_total")]
        assert not any('status="5' in line for line in statuses), statuses
        print(f"\n64x4 requests in {elapsed:.1f}s, {stats}, engine {st}")
