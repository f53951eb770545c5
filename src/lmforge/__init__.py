"""lmforge: a complete, fast, hackable LLM stack on PyTorch.

    from lmforge import ModelConfig, load_model, load_tokenizer, generate, stream

Names are imported on first use, so `import lmforge` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "lmforge.config",
    "build_model": "lmforge.models",
    "load_model": "lmforge.checkpoints",
    "save_pretrained": "lmforge.checkpoints",
    "load_tokenizer": "lmforge.tokenizer",
    "generate": "lmforge.inference",
    "stream": "lmforge.inference",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")


__all__ = list(_EXPORTS)
