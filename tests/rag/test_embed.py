"""The RAG embedder: lmforge's encoder, length-sorted batches, order kept, bf16 close to fp32."""

import numpy as np
import torch

from lmforge.rag.embed import Embedder, default_dtype

TEXTS = ["A short one.", "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer " * 3,
         "Tomatoes need full sun.", "The Moon orbits the Earth every 27 days, and Jupiter is the largest planet.", "x"]  # fmt: skip


def test_batches_in_length_order_and_returns_in_input_order():
    fp32 = Embedder.load(dtype=torch.float32, batch_tokens=64)  # several batches of mixed lengths
    got = fp32.embed_texts(TEXTS)
    ref = fp32.model.embed_texts(fp32.tokenizer, TEXTS, batch_size=1).numpy()  # the encoder's own path, unpadded
    assert got.shape == (5, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    calls = []
    fp32.embed_texts(TEXTS, progress=calls.append)
    assert sum(calls) == 5 and len(calls) > 1


def test_bf16_embeddings_keep_rankings(embedder):
    fp32 = Embedder.load(dtype=torch.float32)
    a, b = fp32.embed_texts(TEXTS), Embedder.load(dtype=torch.bfloat16).embed_texts(TEXTS)
    assert (a * b).sum(1).min() > 0.99
    sims32, sims16 = a @ a.T, b @ b.T
    assert (np.argsort(-sims32, axis=1)[:, :3] == np.argsort(-sims16, axis=1)[:, :3]).all()


def test_truncation_keeps_the_final_special_token(embedder):
    ids = embedder.encode("word " * 1000)
    assert len(ids) == embedder.max_len == 256  # sentence-transformers' max_seq_length for MiniLM
    assert ids[-1] == embedder.tokenizer.sep_id and ids[0] == embedder.tokenizer.cls_id
    assert embedder.count_tokens("hello world") == 2


def test_default_dtype():
    assert default_dtype("cpu") in (torch.bfloat16, torch.float32)
    assert default_dtype("meta") == torch.float32
