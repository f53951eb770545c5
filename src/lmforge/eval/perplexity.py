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
from collections.abc import Sequence
from dataclasses import dataclass

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
