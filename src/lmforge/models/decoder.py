"""Decoder-only language model (GPT-2, LLaMA, Mistral, Qwen2, SmolLM, nanoGPT)."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.base import Embeddings, Stack, TransformerModel
from lmforge.nn.kv_cache import PagedBatch


class DecoderLM(TransformerModel):
    """tokens -> embeddings -> causal blocks -> norm -> logits over the vocabulary."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.embed = Embeddings(config)
        self.stack = Stack(config, config.n_layer, causal=True)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
        self.init_weights()
        self.tie_weights()

    def hidden(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
        paged: PagedBatch | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, D); see ``forward`` for the arguments."""
        if position_ids is None:
            T = input_ids.shape[1]
            pos = input_pos if input_pos is not None else torch.arange(T, device=input_ids.device)
            position_ids = pos[None].expand(input_ids.shape[0], T)
        h = self.embed(input_ids, position_ids)
        return self.stack(
            h, position_ids=position_ids, attention_mask=attention_mask, prefix_len=prefix_len, input_pos=input_pos,
            paged=paged,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
        paged: PagedBatch | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V).

        attention_mask  (B, T) 1 = real token, 0 = padding; with a cache, (B, n) over its first n slots,
                        which are the ones attention reads (default: all)
        position_ids    (B, T) positions (default: 0..T-1, or input_pos with a cache)
        input_pos       (T,) cache slots these tokens are written to (after ``setup_cache``)
        prefix_len      (B,) prefix LM: the first prefix_len tokens attend bidirectionally
        paged           a ``PagedBatch``: input_ids (1, N) are many sequences' tokens packed in one row,
                        their K/V in its block pool; logits (1, S, V) of its ``logit_rows`` only
        """
        h = self.hidden(input_ids, attention_mask, position_ids, input_pos, prefix_len, paged)
        if paged is not None and paged.logit_rows is not None:
            h = h[:, paged.logit_rows]  # the vocabulary projection only where a token is sampled
        return self.lm_head(h)

    def setup_cache(self, batch_size: int, max_len: int | None = None, dtype=None, device=None) -> None:
        """Preallocate a KV cache of ``max_len`` slots per layer (default: the context length)."""
        max_len = max_len or self.config.max_seq_len
        self.stack.setup_cache(batch_size, max_len, dtype or self.dtype, device or self.device)

    def clear_cache(self) -> None:
        self.stack.clear_cache()
