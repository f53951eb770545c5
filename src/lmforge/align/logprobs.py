"""Per-token log-probabilities of responses under a decoder-only model, batched and masked.

A batch holds (prompt, response) token sequences of different lengths, right-padded into one
(B, T) tensor. Causal attention never lets a real token see the padding after it, so no attention
mask is needed, and position ids are the plain 0..T-1. The response token at position j is
predicted from the hidden state at j - 1; only those B × R states go through the LM head (the
vocabulary projection is the largest tensor of a small model's forward).

    batch = pack(prompts, responses, pad_id)
    logps, hidden = response_logprobs(model, batch, return_hidden=True)   # (B, R), (B, R, D)
    seq_logps = (logps * batch.mask).sum(-1)                               # (B,)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.errors import UserError


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # (B, T) prompt + response, right-padded
    index: torch.Tensor  # (B, R) position in input_ids of each response token (clamped on padding)
    mask: torch.Tensor  # (B, R) 1 on real response tokens
    tokens: torch.Tensor  # (B, R) the response tokens (pad on padding)
    prompt_lengths: list[int]

    @property
    def lengths(self) -> torch.Tensor:
        """Response tokens per row (B,)."""
        return self.mask.sum(-1)

    @property
    def last(self) -> torch.Tensor:
        """Position of each row's last real token in input_ids (B,)."""
        return torch.tensor(self.prompt_lengths, device=self.index.device) + self.lengths.long() - 1


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device=None) -> SequenceBatch:
    """Right-pad (prompt + response) sequences into one batch."""
    if any(len(p) == 0 for p in prompts):
        raise UserError("a prompt has no tokens; every sequence needs at least one prompt token to predict from.")
    B = len(prompts)
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    R = max(1, max(len(r) for r in responses))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    tokens = torch.full((B, R), pad_id, dtype=torch.long)
    index = torch.zeros((B, R), dtype=torch.long)
    mask = torch.zeros((B, R), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = list(p) + list(r)
        ids[i, : len(seq)] = torch.tensor(seq)
        if r:
            tokens[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        index[i] = (len(p) + torch.arange(R)).clamp(max=T - 1)
    return SequenceBatch(ids.to(device), index.to(device), mask.to(device), tokens.to(device), [len(p) for p in prompts])


def _check_decoder(model) -> None:
    if getattr(model, "config", None) is None or model.config.arch != "decoder":
        raise UserError("log-probs of responses need a decoder-only model (GPT-2, LLaMA, SmolLM, Qwen2, Mistral).")


def response_logprobs(
    model,
    batch: SequenceBatch,
    *,
    return_hidden: bool = False,
    return_logits: bool = False,
    temperature: float = 1.0,
):
    """log p(response token | everything before it) (B, R), 0 on padding; with ``return_hidden``
    also the hidden states that predicted them (B, R, D), for a value head; with ``return_logits``
    the logits (B, R, V) too (for entropy or a full-distribution KL)."""
    _check_decoder(model)
    h = model.hidden(batch.input_ids)  # (B, T, D)
    D = h.shape[-1]
    pred = torch.gather(h, 1, (batch.index - 1).clamp(min=0)[..., None].expand(-1, -1, D))  # (B, R, D)
    logits = model.lm_head(pred).float()  # (B, R, V)
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, 2, batch.tokens[..., None]).squeeze(-1)  # (B, R)
    logps = (picked - torch.logsumexp(logits, -1)) * batch.mask  # log-softmax at the chosen ids only
    extra = ((pred,) if return_hidden else ()) + ((logits,) if return_logits else ())
    return (logps, *extra) if extra else logps


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact KL(π || π_ref) of the next-token distributions, averaged over the masked positions:
    Σ_v p log(p/q) from full logits (B, R, V) each."""
    logp, logq = torch.log_softmax(logits.float(), -1), torch.log_softmax(ref_logits.float(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, R)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def sequence_logprobs(model, batch: SequenceBatch) -> torch.Tensor:
    """Sum of the response tokens' log-probs per row (B,)."""
    return response_logprobs(model, batch).sum(-1)
