"""Strided sliding-window perplexity, the method of transformers' perplexity guide.

A long text is cut into windows of ``context`` tokens that start every ``stride`` tokens. Each
window scores only the tokens that no earlier window scored (the last ``end - prev_end``), so every
token after the first is predicted exactly once, with up to ``context - stride`` tokens of history
before it. ``stride == context`` gives disjoint windows (fast, least history); a small stride
approaches the full-context figure.

    ppl = perplexity(model, ids, context=1024, stride=512).ppl
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmforge.errors import UserError


@dataclass
class PerplexityResult:
    nll: float  # summed negative log-likelihood of the scored tokens, in nats
    tokens: int  # tokens scored (every token but the first)
    windows: int

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    def bits_per_byte(self, num_bytes: int) -> float:
        """The same likelihood per UTF-8 byte of the scored text: comparable across tokenizers."""
        return self.nll / (num_bytes * math.log(2))


@torch.inference_mode()
def perplexity(model, ids: Sequence[int] | torch.Tensor, *, context: int | None = None, stride: int | None = None,
               progress: bool = False) -> PerplexityResult:  # fmt: skip
    """Perplexity of a decoder-only ``model`` on the token sequence ``ids``.

    ``context`` defaults to the model's context length and ``stride`` to half of it.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    context = context or model.config.max_seq_len
    stride = stride or max(context // 2, 1)
    if context > model.config.max_seq_len:
        raise UserError(f"context {context} is longer than the model's {model.config.max_seq_len} positions; lower --context")
    if stride < 1 or stride > context:
        raise UserError(f"stride {stride} must be between 1 and the context ({context}); a stride longer than the context skips tokens")
    if ids.numel() < 2:
        raise UserError("perplexity needs at least two tokens of text")
    device = model.device
    nll, scored, windows, prev_end = 0.0, 0, 0, 0
    starts = range(0, ids.numel() - 1, stride)
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        end = min(begin + context, ids.numel())
        window = ids[begin:end].to(device)[None]  # (1, T)
        logits = model(window).float()  # (1, T, V)
        new = end - max(prev_end, begin + 1)  # tokens this window scores; the window's first is never a target
        targets = window[0, -new:]
        logp = F.log_softmax(logits[0, -new - 1 : -1], dim=-1)  # predictions of the scored tokens
        nll -= logp.gather(1, targets[:, None]).sum().item()
        scored, windows, prev_end = scored + new, windows + 1, end
        if end == ids.numel():
            break
    return PerplexityResult(nll=nll, tokens=scored, windows=windows)


@dataclass
class TextPerplexity:
    """What ``lmforge eval perplexity`` reports for one text: perplexity per token and bits per byte."""

    ppl: float
    bits_per_byte: float
    mean_nll: float  # nats per scored token
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the text (the bits-per-byte denominator, as lm-evaluation-harness counts them)
    windows: int
    context: int
    stride: int

    def to_dict(self) -> dict:
        return dict(vars(self))


def _check_stride(context: int | None, stride: int | None) -> None:
    if context is not None and stride is not None and stride > context:
        raise UserError(f"the context ({context} tokens) is shorter than the stride ({stride}); "
                        f"use a stride of at most {context}, or a longer context")  # fmt: skip


def text_perplexity(model, tokenizer, text: str, *, context: int | None = None, stride: int | None = None,
                    max_tokens: int | None = None, progress: bool = False) -> TextPerplexity:  # fmt: skip
    """Strided perplexity and bits per byte of ``text`` (tokenized whole, as transformers' guide does).

    ``max_tokens`` keeps the first N tokens only (a quick figure on a slice); the byte count is then
    that of the decoded slice, so bits per byte stays a per-byte figure of what was scored.
    """
    context = context or model.config.max_seq_len
    stride = stride or max(context // 2, 1)
    _check_stride(context, stride)  # before tokenizing a large file
    ids = tokenizer.encode(text)
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        text = tokenizer.decode(ids, skip_special_tokens=True)
    r = perplexity(model, ids, context=context, stride=stride, progress=progress)
    n_bytes = len(text.encode("utf-8"))
    return TextPerplexity(ppl=r.ppl, bits_per_byte=r.bits_per_byte(n_bytes), mean_nll=r.mean_nll, tokens=r.tokens,
                          bytes=n_bytes, windows=r.windows, context=context, stride=stride)  # fmt: skip


def file_perplexity(model_path=None, data: str | os.PathLike = "", *, context: int | None = None,
                    stride: int | None = None, max_tokens: int | None = None, progress: bool = True) -> TextPerplexity:  # fmt: skip
    """``lmforge eval perplexity``: the model at ``model_path`` (fp32, GGUF dequantized) on a UTF-8 text file."""
    from lmforge.checkpoints import load_model
    from lmforge.tokenizer import load_tokenizer

    _check_stride(context, stride)  # before loading anything
    path = Path(data)
    if not path.is_file():
        raise UserError(f"{path} is not a file; pass --data with a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; convert it or pass a .txt file") from None
    model = load_model(model_path, dtype=torch.float32, quantize="none")
    if model.config.arch != "decoder":
        raise UserError(f"perplexity needs a decoder-only model, and {model_path} is {model.config.arch}; pass a causal LM")
    tokenizer = load_tokenizer(model_path)
    return text_perplexity(model, tokenizer, text, context=context, stride=stride, max_tokens=max_tokens, progress=progress)
