"""Encoder-decoder model (T5, the 2017 Transformer): the decoder cross-attends to the encoder."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.base import Embeddings, Stack, TransformerModel
from lmforge.nn.kv_cache import PagedBatch


class EncoderDecoderLM(TransformerModel):
    """source -> encoder -> memory; target prefix + memory -> decoder -> logits. One shared embedding."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.embed = Embeddings(config)
        self.encoder = Stack(config, config.n_layer, causal=False)
        self.decoder = Stack(config, config.n_decoder_layer, causal=True, cross=True)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
        self.init_weights()
        self.tie_weights()

    def _positions(self, ids: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        pos = input_pos if input_pos is not None else torch.arange(ids.shape[1], device=ids.device)
        return pos[None].expand(ids.shape[0], -1)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output ("memory"), (B, S, D)."""
        pos = self._positions(input_ids)
        return self.encoder(self.embed(input_ids, pos), position_ids=pos, attention_mask=attention_mask)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,  # (B, T)
        memory: torch.Tensor | None,  # (B, S, D); None: reuse the cross-attention cache
        memory_mask: torch.Tensor | None = None,  # (B, S)
        decoder_attention_mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        paged: PagedBatch | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for the decoder tokens. ``paged``: (1, N) tokens of many sequences packed
        in one row (their self- and cross-attention K/V in the batch); logits of its ``logit_rows``."""
        pos = paged.positions[None] if paged is not None else self._positions(decoder_input_ids, input_pos)
        h = self.decoder(
            self.embed(decoder_input_ids, pos), position_ids=pos, attention_mask=decoder_attention_mask,
            input_pos=input_pos, memory=memory, memory_mask=memory_mask, paged=paged,
        )
        if paged is not None and paged.logit_rows is not None:
            h = h[:, paged.logit_rows]
        if self.config.logit_scale is not None:
            h = h * self.config.logit_scale
        return self.lm_head(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder model needs decoder_input_ids (the target prefix) as well as input_ids.")
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask)

    def cross_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention keys and values (B, H_kv, S, D) of an encoder output."""
        return [layer.cross_attn.memory_kv(memory) for layer in self.decoder.layers]

    def setup_cache(self, batch_size: int, memory_len: int, max_len: int | None = None, dtype=None, device=None) -> None:
        """Self-attention cache of ``max_len`` target slots and a cross-attention cache for the memory."""
        max_len = max_len or self.config.max_seq_len
        self.decoder.setup_cache(batch_size, max_len, dtype or self.dtype, device or self.device, memory_len=memory_len)

    def clear_cache(self) -> None:
        self.decoder.clear_cache()
