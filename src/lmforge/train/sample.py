"""``lmforge sample DIR``: text sampled from a trained checkpoint (nanoGPT's sample.py).

A run directory holds its final model at the top level; a checkpoint folder
(``RUN/checkpoints/step-...``) works as well.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.errors import UserError


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A directory with config.json: the path itself, or the latest checkpoint of a run directory."""
    from lmforge.train.checkpoint import latest_checkpoint

    p = Path(path)
    if (p / "config.json").is_file():
        return p
    latest = latest_checkpoint(p) if p.is_dir() else None
    if latest is None:
        raise UserError(f"{p} holds no model: expected a run directory or a checkpoint with config.json.")
    return latest


def sample(
    path: str | os.PathLike,
    prompt: str | None = None,
    *,
    num_samples: int = 1,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int = 1337,
) -> list[str]:
    """``num_samples`` texts from the model in ``path`` (``lmforge.inference.generate`` does the
    sampling). A decoder continues ``prompt`` (default: a newline, as nanoGPT's sample.py) and the
    prompt is included in the text; an encoder-decoder model reads the prompt and writes its output."""
    from lmforge.checkpoints import load_model
    from lmforge.inference import generate
    from lmforge.tokenizer import load_tokenizer

    model_dir = resolve_model_dir(path)
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    if prompt is None:
        prompt = "\n" if tok.token_to_id("\n") is not None else tok.decode([tok.bos_id if tok.bos_id is not None else 0])
    texts = generate(model, tok, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0,
                     seed=seed, n=num_samples)  # fmt: skip
    texts = texts if isinstance(texts, list) else [texts]
    return [prompt + t for t in texts] if model.config.arch == "decoder" else texts
