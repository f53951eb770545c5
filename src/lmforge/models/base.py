"""What the three families share: embeddings, a stack of blocks, weight init, caches, saving."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.nn.attention import build_mask
from lmforge.nn.kv_cache import KVCache, PagedBatch
from lmforge.nn.layers import Block, make_norm
from lmforge.nn.positions import ALiBi, RotaryEmbedding, T5RelativeBias, sinusoidal_table


class Embeddings(nn.Module):
    """Token embedding (x embed_scale) + absolute positions + token types, then norm and dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.n_embd) if cfg.position == "learned" else None
        self.sinusoid_shape = (cfg.max_seq_len, cfg.n_embd) if cfg.position == "sinusoidal" else None
        self.init_buffers()
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.n_embd) if cfg.type_vocab_size else None
        self.norm = make_norm(cfg) if cfg.embedding_norm else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.scale = cfg.embed_scale

    def init_buffers(self) -> None:
        table = sinusoidal_table(*self.sinusoid_shape) if self.sinusoid_shape else None
        self.register_buffer("sinusoid", table, persistent=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        h = self.tok(input_ids)  # (B, T, D)
        if self.scale is not None:
            h = h * self.scale
        if self.pos is not None:
            h = h + self.pos(position_ids)
        if self.sinusoid is not None:
            h = h + self.sinusoid[position_ids]
        if self.token_type is not None:
            h = h + self.token_type(torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids)
        if self.norm is not None:
            h = self.norm(h)
        return self.dropout(h)


class Stack(nn.Module):
    """A stack of blocks with the position machinery they share (RoPE, T5 bias, ALiBi) and the
    final norm. ``causal`` decides the mask; ``cross`` adds cross-attention to the encoder memory."""

    def __init__(self, cfg: ModelConfig, n_layers: int, *, causal: bool, cross: bool = False):
        super().__init__()
        self.causal, self.window = causal, cfg.sliding_window
        self.layers = nn.ModuleList(Block(cfg, cross=cross) for _ in range(n_layers))
        self.rope = RotaryEmbedding(cfg) if cfg.position == "rope" else None
        self.rel_bias = T5RelativeBias(cfg, bidirectional=not causal) if cfg.position == "t5" else None
        self.alibi = ALiBi(cfg) if cfg.position == "alibi" else None
        self.norm = make_norm(cfg) if cfg.final_norm else None
        self.dropout = nn.Dropout(cfg.dropout) if cfg.position == "t5" else None  # T5 drops after the final norm
        self.caches: nn.ModuleList | None = None
        self.cross_caches: nn.ModuleList | None = None

    def forward(
        self,
        h: torch.Tensor,  # (B, T, D)
        *,
        position_ids: torch.Tensor | None = None,  # (B, T) positions for RoPE
        attention_mask: torch.Tensor | None = None,  # (B, T); with a cache (B, n): its first n slots, read
        prefix_len: torch.Tensor | None = None,  # (B,) prefix-LM
        input_pos: torch.Tensor | None = None,  # (T,) cache slots being written; None: no cache
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,  # (B, S)
        paged: PagedBatch | None = None,  # a packed row of many sequences over a paged KV pool
    ) -> torch.Tensor:
        B, T, _ = h.shape
        if paged is not None:
            return self._paged(h, position_ids, paged)
        use_cache = input_pos is not None
        if use_cache and self.caches is None:
            raise RuntimeError("input_pos given but no KV cache is set up: call model.setup_cache(batch, max_len) first.")
        q_pos = input_pos if use_cache else torch.arange(T, device=h.device)
        if use_cache:  # keys: the cache slots attention_mask covers (B, n), the first n; all without one
            n_slots = attention_mask.shape[1] if attention_mask is not None else self.caches[0].k.shape[2]
            k_pos = torch.arange(n_slots, device=h.device)
        else:
            k_pos = q_pos
        if position_ids is None:
            position_ids = q_pos[None].expand(B, T)
        rope = self.rope(position_ids) if self.rope is not None else None
        bias = None
        if self.rel_bias is not None:
            bias = self.rel_bias(q_pos, k_pos)
        elif self.alibi is not None:
            bias = self.alibi(q_pos, k_pos)
        windowed = self.window is not None and k_pos.numel() > self.window
        if use_cache or attention_mask is not None or prefix_len is not None or windowed or (bias is not None and self.causal):
            mask = build_mask(
                q_pos, k_pos, causal=self.causal, key_valid=attention_mask, prefix_len=prefix_len,
                window=self.window if windowed else None,
            )
            is_causal = False
        else:
            mask, is_causal = None, self.causal
        mem_mask = memory_mask[:, None, None, :].bool() if memory_mask is not None else None
        for i, layer in enumerate(self.layers):
            h = layer(
                h, rope=rope, mask=mask, bias=bias, is_causal=is_causal,
                cache=self.caches[i] if use_cache else None, input_pos=input_pos,
                memory=memory, memory_mask=mem_mask,
                cross_cache=self.cross_caches[i] if self.cross_caches is not None else None,
            )
        if self.norm is not None:
            h = self.norm(h)
        return self.dropout(h) if self.dropout is not None else h

    def _paged(self, h: torch.Tensor, position_ids: torch.Tensor, paged: PagedBatch) -> torch.Tensor:
        """The same blocks over (1, N) packed tokens; each layer's cache attends per sequence."""
        paged.prepare(self.rel_bias or self.alibi, self.window)
        rope = self.rope(position_ids) if self.rope is not None else None
        cross = self.layers[0].cross_attn is not None
        for i, layer in enumerate(self.layers):
            h = layer(h, rope=rope, cache=paged.layer(i), cross_cache=paged.cross_layer(i) if cross else None)
        if self.norm is not None:
            h = self.norm(h)
        return self.dropout(h) if self.dropout is not None else h

    def setup_cache(self, batch: int, max_len: int, dtype, device, memory_len: int | None = None) -> None:
        layer = self.layers[0].attn
        make = lambda n: nn.ModuleList(  # noqa: E731
            KVCache(batch, layer.n_kv_head, n, layer.head_dim, dtype=dtype, device=device) for _ in self.layers
        )
        self.caches = nn.ModuleList(block.attn.new_cache(batch, max_len, dtype, device) for block in self.layers)
        self.cross_caches = make(memory_len) if memory_len is not None else None

    def clear_cache(self) -> None:
        self.caches = self.cross_caches = None


class TransformerModel(nn.Module):
    """Base of the three families: holds the config, initialises weights, saves checkpoints."""

    config: ModelConfig

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    # --- init ----------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """N(0, init_std) for matrices and embeddings, zero biases, unit norms; residual output
        projections scaled by 1/sqrt(2 * n_layers) (GPT-2) so the residual stream stays O(1)."""
        std = self.config.init_std
        n_layers = self.config.n_layer + (self.config.n_decoder_layer if self.config.arch == "encoder-decoder" else 0)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                proj_std = std / math.sqrt(2 * max(n_layers, 1)) if name.endswith((".o", ".down")) else std
                nn.init.normal_(module.weight, mean=0.0, std=proj_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm":
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings and getattr(self, "lm_head", None) is not None:
            self.lm_head.weight = self.embed.tok.weight

    # --- facts ---------------------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied matrix counts once), as transformers' ``num_parameters``."""
        seen, total = set(), 0
        for name, p in self.named_parameters(remove_duplicate=True):
            if exclude_embeddings and name.startswith("embed."):
                continue
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # --- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path, tokenizer=None) -> Path:
        """Write a Hugging Face directory (config.json + model.safetensors [+ tokenizer files])."""
        from lmforge.checkpoints import save_pretrained

        return save_pretrained(self, out_dir, tokenizer=tokenizer)
