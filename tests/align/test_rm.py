"""Reward model: HF sequence-classification checkpoints with equal scores, Bradley–Terry training,
held-out accuracy, exact resume, and bad input refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.align.rm import RMConfig, RewardModel, load_reward_model, reward_model_from, train_reward_model
from lmforge.checkpoints import load_model
from lmforge.errors import UserError
from rl_helpers import tiny_model_dir, word_pairs, write_jsonl


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saved_reward_model_loads_in_transformers_with_equal_scores(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    base = load_model(tiny_model_dir(family))
    rm = reward_model_from(base, pad_id=2)
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    rm.save_pretrained(tmp_path / "rm")
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["architectures"][0].endswith("ForSequenceClassification") and cfg["num_labels"] == 1

    ids = torch.tensor([[5, 17, 301, 2, 44, 9], [7, 8, 2, 2, 2, 2], [11, 12, 13, 14, 2, 2]])  # right-padded, pad = 2
    ours = rm.eval()(ids)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        mask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])  # an eos inside row 0 is a real token
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(ours.detach(), theirs, atol=1e-5, rtol=1e-5)
    again = load_reward_model(tmp_path / "rm")
    torch.testing.assert_close(again(ids).detach(), ours.detach())


def test_reward_model_learns_held_out_pairs_and_resumes_exactly(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", word_pairs(80))
    common = dict(model=str(tiny_model_dir("llama")), batch_size=8, learning_rate=3e-3, eval_fraction=0.25,
                  eval_interval=0, checkpoint_interval=3, progress=False, max_length=64)  # fmt: skip
    full = train_reward_model(RMConfig(max_steps=6, **common), data, tmp_path / "full")
    assert full.eval_accuracy >= 0.9, full
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7)) and "eval_accuracy" in records[-1]
    assert (tmp_path / "full" / "curves.png").stat().st_size > 1000

    train_reward_model(RMConfig(max_steps=3, **common), data, tmp_path / "cut")
    resumed = train_reward_model(RMConfig(max_steps=6, **common), data, tmp_path / "cut", resume=True)
    a, b = load_reward_model(full.model_dir), load_reward_model(resumed.model_dir)
    ids = torch.tensor([[5, 17, 301, 44, 9]])
    torch.testing.assert_close(a(ids), b(ids))
    assert resumed.eval_accuracy == full.eval_accuracy


@pytest.mark.parametrize("row,match", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, r"pairs\.jsonl:2: chosen and rejected are the same"),
    ({"prompt": "p", "chosen": "a"}, r"pairs\.jsonl:2: missing key 'rejected'"),
    ({"prompt": [{"role": "wizard", "content": "x"}], "chosen": "a", "rejected": "b"}, r"pairs\.jsonl:2: .*unknown role 'wizard'"),
])  # fmt: skip
def test_bad_pairs_name_file_and_line_and_write_nothing(tmp_path, row, match):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(UserError, match=match):
        train_reward_model(RMConfig(model=str(tiny_model_dir("llama")), progress=False), data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_encoder_reward_model_scores_with_its_classifier(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge import ModelConfig, build_model

    torch.manual_seed(0)
    enc = build_model(ModelConfig.from_name("minilm-l6", n_layer=1, n_embd=32, n_head=4, d_ff=64, vocab_size=50, max_seq_len=16))
    rm = reward_model_from(enc, pad_id=0)
    ids = torch.tensor([[1, 5, 6, 0], [1, 7, 0, 0]])
    s = rm.eval()(ids)
    assert s.shape == (2,)
    # padding does not change a sequence's score
    torch.testing.assert_close(rm(ids[:1, :3]), s[:1])
    assert isinstance(rm, RewardModel) and rm.score is None and rm.backbone.config.num_labels == 1
    rm.save_pretrained(tmp_path / "rm")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=(ids != 0).long()).logits.squeeze(-1)
    torch.testing.assert_close(s.detach(), theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(load_reward_model(tmp_path / "rm")(ids).detach(), s.detach())
