"""``lmforge sample DIR``: text sampled from a trained checkpoint (nanoGPT's sample.py).

A run directory holds its final model at the top level; a checkpoint folder
(``RUN/checkpoints/step-...``) works as well.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

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


@torch.no_grad()
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
    """``num_samples`` continuations of ``prompt`` (default: a newline, or BOS) from a decoder model;
    for an encoder-decoder model the prompt is the encoder input and the decoder writes the rest."""
    from lmforge.checkpoints import load_model
    from lmforge.tokenizer import load_tokenizer

    if temperature < 0 or max_new_tokens < 1 or num_samples < 1 or (top_k is not None and top_k < 1):
        raise UserError("temperature must be >= 0, and max_new_tokens, num_samples and top_k at least 1.")
    model_dir = resolve_model_dir(path)
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    cfg = model.config
    if cfg.arch == "encoder":
        raise UserError(f"{model_dir} is an encoder ({cfg.head or 'no'} head); sampling needs a decoder or encoder-decoder model.")
    g = torch.Generator().manual_seed(seed)
    if prompt is None:
        prompt = "\n" if tok.token_to_id("\n") is not None or tok.bos_id is None else ""
    ids = tok.encode(prompt, add_special_tokens=False) if prompt else []
    if not ids:
        start = tok.bos_id if tok.bos_id is not None else tok.eos_id
        if start is None:
            raise UserError("give a prompt: this tokenizer has no BOS token to start from.")
        ids = [start]

    def pick(logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B, 1)
        if temperature == 0:
            return logits.argmax(-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None and top_k < logits.size(-1):
            kth = torch.topk(logits, top_k).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=g)

    stop = tok.eos_id
    x = torch.tensor([ids] * num_samples)
    if cfg.arch == "decoder":
        prompt_len = x.shape[1]
        if prompt_len + max_new_tokens > cfg.max_seq_len:
            max_new_tokens = max(cfg.max_seq_len - prompt_len, 0)
            if max_new_tokens == 0:
                raise UserError(f"the prompt has {prompt_len} tokens, filling the model's context of {cfg.max_seq_len}.")
        model.setup_cache(num_samples, prompt_len + max_new_tokens)
        logits = model(x, input_pos=torch.arange(prompt_len))[:, -1]
        out = x
        for i in range(max_new_tokens):
            nxt = pick(logits)
            out = torch.cat([out, nxt], 1)
            if i + 1 < max_new_tokens:
                logits = model(nxt, input_pos=torch.tensor([prompt_len + i]))[:, -1]
        model.clear_cache()
        texts = []
        for row in out.tolist():
            gen = row[prompt_len:]
            if stop is not None and stop in gen:
                gen = gen[: gen.index(stop)]
            texts.append(prompt + tok.decode(gen))
        return texts
    # encoder-decoder: the decoder starts from decoder_start_token_id and writes until EOS
    start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else (tok.pad_id or 0)
    memory = model.encode(x)
    dec = torch.full((num_samples, 1), start, dtype=torch.long)
    for _ in range(min(max_new_tokens, cfg.max_seq_len - 1)):
        nxt = pick(model.decode(dec, memory)[:, -1])
        dec = torch.cat([dec, nxt], 1)
        if stop is not None and bool((dec == stop).any(1).all()):
            break
    texts = []
    for row in dec[:, 1:].tolist():
        if stop is not None and stop in row:
            row = row[: row.index(stop)]
        texts.append(tok.decode(row))
    return texts
