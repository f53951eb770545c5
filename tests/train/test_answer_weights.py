"""Per-token loss weights from the corpus format (TrainConfig.answer_prefix): the spans, the loss, the trainer."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ConfigError
from lmforge.data import AnswerWeights, answer_spans
from lmforge.eval.passkey import write_passkey_corpus
from lmforge.train import load_recipe
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import DistContext
from lmforge.train.trainer import Trainer, compute_loss
from train_helpers import CHAR_RECIPE, SHAKESPEARE, TINY

QUESTION = "What is the pass key? The pass key is "


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def marked(text: str, prefix: str, end: str) -> list[str]:
    """The runs of characters answer_spans marks in ``text``."""
    spans = answer_spans(torch.tensor([ids(text)]), ids(prefix), ids(end))[0].tolist()
    runs, current = [], ""
    for c, m in zip(text, spans):
        if m:
            current += c
        elif current:
            runs.append(current)
            current = ""
    return runs + ([current] if current else [])


def test_answer_spans_run_from_the_prefix_through_the_end():
    text = "is 1. The key is 42. Remember: the key is 7.\nThe key is 99"
    assert marked(text, "key is ", ".") == ["42.", "7.", "99"]  # the last answer runs to the window's end
    assert marked(text, "key is ", ".\n") == ["42. Remember: the key is 7.\n", "99"]
    assert marked("a key is ", "key is ", ".") == []  # a prefix at the very end marks nothing
    assert marked("no answer here", "key is ", ".") == []
    with pytest.raises(Exception, match="non-empty"):
        answer_spans(torch.tensor([ids("abc")]), [], ids("."))


def test_answer_weights_are_those_of_the_labels():
    w = AnswerWeights(tuple(ids("k=")), tuple(ids(";")), answer=5.0, context=0.5)
    tokens = torch.tensor([ids("xk=12;y"), ids("k=3;abc")])  # (B, T+1)
    expected = torch.tensor([[0.5, 0.5, 5, 5, 5, 0.5], [0.5, 5, 5, 0.5, 0.5, 0.5]])  # labels = tokens[:, 1:]
    torch.testing.assert_close(w(tokens), expected)


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids):
        return self.logits


def test_the_loss_is_the_weighted_mean_and_the_weights_change_it():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[1, 0] = -100
    model = FixedLogits(logits)
    nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    weights = torch.tensor([[0.0, 0, 3, 3, 0, 0], [1, 0, 0, 0, 3, 0]])  # the -100 label's weight must not count
    batch = {"input_ids": labels, "labels": labels}
    plain = compute_loss(model, batch)
    torch.testing.assert_close(plain, nll[labels != -100].mean())
    weighted = compute_loss(model, {**batch, "loss_weights": weights})
    torch.testing.assert_close(weighted, (nll[0, 2] + nll[0, 3] + nll[1, 4]) / 3)
    assert not torch.isclose(weighted, plain)


def test_config_refuses_weights_without_a_prefix_and_other_objectives():
    with pytest.raises(ConfigError, match="set answer_prefix"):
        TrainConfig(answer_weight=10)
    with pytest.raises(ConfigError, match="objective causal or prefix"):
        TrainConfig(answer_prefix="A: ", objective="mlm")
    with pytest.raises(ConfigError, match="context_weight"):
        TrainConfig(answer_prefix="A: ", context_weight=-1)
    TrainConfig(answer_prefix="A: ", answer_weight=10, context_weight=0)


def test_the_trainer_takes_its_loss_on_the_answers_only(tmp_path):
    corpus = write_passkey_corpus(SHAKESPEARE, tmp_path / "passkey.txt", length=128, samples=64)
    r = load_recipe(CHAR_RECIPE, [*TINY, "--max_seq_len=128", "--block_size=128", "--batch_size=4", "--loader=sequential",
                                  "--max_iters=1", "--eval_iters=0", "--dropout=0", f"--answer_prefix={QUESTION}", "--answer_end=.",
                                  "--context_weight=0"])  # fmt: skip
    t = Trainer(r.train, r.model, corpus, tmp_path / "run", DistContext())
    batch = t.train_batch(0)
    w = batch["loss_weights"]
    assert w.shape == batch["labels"].shape and (w.sum(1) == 6).all()  # one sample per window: 5 digits and "."
    answers = [t.tokenizer.decode(batch["labels"][b][w[b] > 0].tolist()) for b in range(w.shape[0])]
    assert all(len(a) == 6 and a[:5].isdigit() and a[5] == "." for a in answers)
    logits = t.raw(batch["input_ids"])
    nll = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
    torch.testing.assert_close(t.loss(t.raw, batch), nll[w > 0].mean())
    assert not torch.isclose(t.loss(t.raw, batch), nll.mean())
    loss = t.train_step()  # the step trains on the same batch 0
    torch.testing.assert_close(loss, nll[w > 0].mean().detach())


class PerToken(torch.nn.Module):
    """Logits that depend on each token alone: a sequence's shards give the logits of the whole."""

    def __init__(self, vocab: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids, position_ids=None):
        return self.emb(input_ids)


def test_context_parallel_shards_add_up_to_the_weighted_loss():
    from lmforge.parallel.context import ContextParallel

    torch.manual_seed(0)
    model = PerToken(13)
    ids = torch.randint(0, 13, (2, 8))
    labels = torch.randint(0, 13, (2, 8))
    weights = torch.rand(2, 8) * (torch.rand(2, 8) > 0.5)
    batch = {"input_ids": ids, "labels": labels, "loss_weights": weights}
    shards = [ContextParallel(size=2, dp_size=1, dp_rank=0, cp_rank=r).loss(model, batch, training=False) for r in (0, 1)]
    torch.testing.assert_close(sum(shards), compute_loss(model, batch))
    assert not torch.isclose(sum(shards), compute_loss(model, {"input_ids": ids, "labels": labels}))
