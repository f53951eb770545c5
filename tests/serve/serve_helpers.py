"""Helpers of the serving tests: a tiny random decoder of SmolLM2's vocabulary, and an in-process
server (uvicorn on 127.0.0.1, a free port, a background thread)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import torch

from lmforge.config import ModelConfig
from lmforge.models import build_model

TINY = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, d_ff=128, max_seq_len=512)


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_name("smollm2-135m", **{**TINY, **overrides})).eval()


@contextmanager
def running_server(app):
    """Serve ``app`` with uvicorn on 127.0.0.1 in a background thread; yields the base URL."""
    import uvicorn

    # proto IPPROTO_TCP, as uvicorn's own sockets have: asyncio sets TCP_NODELAY only on those, and without it
    # every small reply waited ~40 ms (Nagle's algorithm holding the body for the client's delayed ACK)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
