"""Encoder-only model (BERT, MiniLM): bidirectional blocks, optional pooler and task heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.base import Embeddings, Stack, TransformerModel
from lmforge.nn.layers import ACTIVATIONS, make_norm


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense -> activation -> norm -> vocabulary (tied to the embeddings)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.act = ACTIVATIONS[config.activation]
        self.norm = make_norm(config)
        self.decoder = nn.Linear(config.n_embd, config.vocab_size, bias=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(h))))


class EncoderModel(TransformerModel):
    """tokens -> embeddings -> bidirectional blocks -> (head).

    head=None: ``forward`` returns the last hidden state (B, T, D); ``embed`` pools it into
    sentence embeddings. head="mlm": token logits (B, T, V); "seq_cls": (B, num_labels) from the
    pooled first token; "token_cls": (B, T, num_labels).
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.embed = Embeddings(config)
        self.stack = Stack(config, config.n_layer, causal=False)
        self.pooler = nn.Linear(config.n_embd, config.n_embd) if config.pooler else None
        self.mlm = MLMHead(config) if config.head == "mlm" else None
        self.classifier = nn.Linear(config.n_embd, config.num_labels) if config.head in ("seq_cls", "token_cls") else None
        self.dropout = nn.Dropout(config.dropout)
        self.init_weights()
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.mlm is not None and self.config.tie_embeddings:
            self.mlm.decoder.weight = self.embed.tok.weight

    def hidden(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"input has {T} tokens but the model's context is {self.config.max_seq_len}.")
        position_ids = torch.arange(T, device=input_ids.device)[None].expand(B, T)
        h = self.embed(input_ids, position_ids, token_type_ids)
        return self.stack(h, attention_mask=attention_mask)  # (B, T, D)

    def pooled(self, h: torch.Tensor) -> torch.Tensor:
        """BERT pooler: tanh(W h[CLS] + b)."""
        return torch.tanh(self.pooler(h[:, 0])) if self.pooler is not None else h[:, 0]

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        h = self.hidden(input_ids, attention_mask, token_type_ids)
        if self.config.head is None:
            return h
        if self.config.head == "mlm":
            return self.mlm(h)
        if self.config.head == "seq_cls":
            return self.classifier(self.dropout(self.pooled(h)))
        return self.classifier(self.dropout(h))

    @torch.no_grad()
    def embed_tokens(self, input_ids, attention_mask=None, pooling: str | None = None, normalize: bool = True):
        """Sentence embeddings (B, D), float32: mean over real tokens or the first token, L2-normalised.
        Pooling and the norm run in float32 whatever the model's dtype (in bf16 the pooled vector is
        rounded and its norm misses 1 by up to ~0.5%)."""
        h = self.hidden(input_ids, attention_mask).float()
        if (pooling or self.config.pooling) == "cls":
            e = h[:, 0]
        elif attention_mask is None:
            e = h.mean(1)
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(e, p=2, dim=-1) if normalize else e

    @torch.no_grad()
    def embed_texts(self, tokenizer, texts: list[str], batch_size: int = 32, normalize: bool = True) -> torch.Tensor:
        """Sentence embeddings (N, D) of raw texts: tokenize, right-pad per batch, pool."""
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        out = []
        for i in range(0, len(texts), batch_size):
            batch = [tokenizer.encode(t)[: self.config.max_seq_len] for t in texts[i : i + batch_size]]
            width = max(len(b) for b in batch)
            ids = torch.tensor([b + [pad] * (width - len(b)) for b in batch], device=self.device)
            mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch], device=self.device)
            out.append(self.embed_tokens(ids, mask, normalize=normalize))
        return torch.cat(out)
