"""Serving: an OpenAI-compatible server (FastAPI), an async client of ``lmforge.engine``.

    from lmforge.serve import create_app, serve

``server`` holds the app; the engine it drives (continuous batching over a paged KV cache) is
``lmforge.engine.Engine``, re-exported here. Names are imported on first use, so the engine does not
pull in FastAPI.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Engine": "lmforge.engine",
    "EngineConfig": "lmforge.engine",
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
