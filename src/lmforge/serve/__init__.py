"""Serving: a continuous-batching engine over a paged KV cache, and an OpenAI-compatible server.

    from lmforge.serve import Engine, EngineConfig, create_app, serve

``blocks`` (the block manager), ``paged`` (paged attention), ``engine`` (scheduler and stepping
thread), ``server`` (FastAPI app). Names are imported on first use, so the engine does not pull in
FastAPI.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BlockManager": "lmforge.serve.blocks",
    "Engine": "lmforge.serve.engine",
    "EngineConfig": "lmforge.serve.engine",
    "Embedder": "lmforge.serve.server",
    "create_app": "lmforge.serve.server",
    "build_app": "lmforge.serve.server",
    "serve": "lmforge.serve.server",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.serve' has no attribute {name!r}")


__all__ = list(_EXPORTS)
