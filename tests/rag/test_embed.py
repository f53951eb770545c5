"""The RAG embedder: lmforge's encoder, unpadded batches, order kept, bf16 (packed) close to fp32 and
to sentence-transformers."""

import numpy as np
import pytest
import torch
from torch import nn

from lmforge.errors import UserError
from lmforge.rag.embed import Embedder, PackedLinear, can_pack, default_dtype, default_embedding_model_path

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
    texts = TEXTS + VERSE
    fp32 = Embedder.load(dtype=torch.float32)
    a, b = fp32.embed_texts(texts), Embedder.load(dtype=torch.bfloat16).embed_texts(texts)
    assert (a * b).sum(1).min() > 0.999  # pooled and normalised in fp32: only the encoder runs in bf16
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    sims32, sims16 = a @ a.T, b @ b.T
    # every ordering of two neighbours that fp32 separates by more than 0.005 is kept
    gap32 = sims32[:, :, None] - sims32[:, None, :]
    gap16 = sims16[:, :, None] - sims16[:, None, :]
    clear = gap32 > 0.005
    assert clear.sum() > 1000 and (gap16[clear] > 0).all()


def test_truncation_keeps_the_final_special_token(embedder):
    ids = embedder.encode("word " * 1000)
    assert len(ids) == embedder.max_len == 256  # sentence-transformers' max_seq_length for MiniLM
    assert ids[-1] == embedder.tokenizer.sep_id and ids[0] == embedder.tokenizer.cls_id
    assert embedder.count_tokens("hello world") == 2


def test_default_dtype():
    assert default_dtype("cpu") in (torch.bfloat16, torch.float32)
    assert default_dtype("meta") == torch.float32


# Lines of verse and prose of several lengths; some share a length, so batches hold several rows.
VERSE = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles,",
         "Now is the winter of our discontent", "Made glorious summer by this sun of York;",
         "Friends, Romans, countrymen, lend me your ears;", "I come to bury Caesar, not to praise him.",
         "Tomorrow, and tomorrow, and tomorrow,", "Creeps in this petty pace from day to day",
         "If music be the food of love, play on;", "Give me excess of it, that, surfeiting,",
         "All the world's a stage, and all the men and women merely players", "Is this a dagger which I see before me,"]  # fmt: skip
MIXED = TEXTS + VERSE + [" ".join(VERSE) * 4]  # the last one is cut at 256 tokens


def test_batches_are_unpadded_and_within_the_token_budget():
    fp32 = Embedder.load(dtype=torch.float32, batch_tokens=48)
    shapes, inner = [], fp32.model.embed_tokens

    def spy(ids, attention_mask=None, **kw):
        shapes.append((tuple(ids.shape), attention_mask))
        return inner(ids, attention_mask, **kw)

    fp32.model.embed_tokens = spy
    inputs = [fp32.encode(t) for t in MIXED]
    got = fp32.embed(inputs)
    assert {m is None for _, m in shapes} == {True}  # no mask: no row is padded
    assert all(b == 1 or b * t <= 48 for (b, t), _ in shapes)
    assert sum(b for (b, _), _ in shapes) == len(MIXED) and any(b > 1 for (b, _), _ in shapes)
    assert fp32.tokens_embedded == sum(len(x) for x in inputs)
    one_by_one = torch.cat([inner(torch.tensor([x])) for x in inputs])
    torch.testing.assert_close(got, one_by_one, atol=2e-5, rtol=0)


def test_matches_sentence_transformers():
    """fp32: within 2e-5 of sentence-transformers' all-MiniLM-L6-v2 (fp32, padded batches of 32);
    the default bf16 path (packed oneDNN linears where the CPU has bf16): cosine >= 0.99 to it for
    every text, >= 0.999 on average, and the same nearest neighbours."""
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(default_embedding_model_path()), device="cpu")
    assert ref.max_seq_length == 256
    want = ref.encode(MIXED, normalize_embeddings=True, convert_to_numpy=True)
    fp32 = Embedder.load(dtype=torch.float32).embed_texts(MIXED)
    np.testing.assert_allclose(fp32, want, atol=2e-5, rtol=0)
    fast = Embedder.load()  # what indexing uses
    got = fast.embed_texts(MIXED)
    cos = (got * want).sum(1)
    assert cos.min() >= 0.99 and cos.mean() >= 0.999, cos
    assert (np.argsort(-(got @ got.T), axis=1)[:, :3] == np.argsort(-(want @ want.T), axis=1)[:, :3]).all()


@pytest.mark.skipif(not can_pack(), reason="the CPU has no native bf16")
def test_packing_replaces_every_linear_and_fuses_the_activation():
    e = Embedder.load(dtype=torch.bfloat16)
    assert not any(type(m) is nn.Linear for m in e.model.modules())
    ups = [m.up for m in e.model.modules() if hasattr(m, "up") and hasattr(m, "down")]
    assert len(ups) == 6 and all(isinstance(u, PackedLinear) and u.act == "gelu" and u.algorithm == "none" for u in ups)
    plain = Embedder.load(dtype=torch.bfloat16, pack=False)
    assert any(type(m) is nn.Linear for m in plain.model.modules())
    a, b = e.embed_texts(VERSE), plain.embed_texts(VERSE)
    assert (a * b).sum(1).min() > 0.995  # the same bf16 model through other kernels


def test_pack_where_it_cannot_apply_is_refused():
    with pytest.raises(UserError, match="bf16"):
        Embedder.load(dtype=torch.float32, pack=True)
