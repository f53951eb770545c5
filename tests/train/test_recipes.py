"""The MLM, prefix-LM and span-corruption recipes learn: short runs lower the validation loss."""

import pytest
import torch

from lmforge.checkpoints import load_model
from lmforge.data import TokenData, generator, masked_lm, special_ids
from lmforge.train import load_recipe, pretrain, read_metrics
from lmforge.train.sample import sample
from train_helpers import CONFIGS

SHORT = ["--max_iters=40", "--eval_interval=40", "--eval_iters=4", "--warmup_iters=5", "--lr_decay_iters=40",
         "--batch_size=8", "--progress=false", "--tensorboard=false", "--checkpoint_interval=0"]  # fmt: skip


def short_run(name, data, out, *extra):
    r = load_recipe(CONFIGS / name, [*SHORT, *extra])
    res = pretrain(r.train, r.model, data, out)
    vals = [rec["val_loss"] for rec in read_metrics(out) if "val_loss" in rec]
    return res, vals


@pytest.mark.parametrize("name, arch", [("prefix-lm-cpu.yaml", "decoder"), ("t5-span-cpu.yaml", "encoder-decoder")])
def test_recipe_lowers_validation_loss(name, arch, bpe_data, tmp_path):
    res, vals = short_run(name, bpe_data, tmp_path / "run")
    assert res.model_config.arch == arch and res.model_config.vocab_size == 512
    assert len(vals) == 2 and vals[1] < vals[0] - 0.5, vals


def test_mlm_recipe_learns_and_ranks_masked_tokens_above_chance(bpe_data, tmp_path):
    res, vals = short_run("bert-mlm-cpu.yaml", bpe_data, tmp_path / "run")
    assert res.model_config.arch == "encoder" and res.model_config.head == "mlm"
    assert len(vals) == 2 and vals[1] < vals[0] - 0.5, vals
    model = load_model(tmp_path / "run")
    data = TokenData(bpe_data)
    sp = special_ids(data.tokenizer())
    val = data.split("val")  # held-out text
    windows = val.windows(torch.arange(8) * 1000, 128)
    b = masked_lm(windows, mask_id=sp.mask, vocab_size=512, special_ids=sp.all, generator=generator(0))
    with torch.no_grad():
        logits = model(b["input_ids"])
    at = b["labels"] != -100
    true = logits[at].gather(1, b["labels"][at][:, None])
    rank = (logits[at] > true).sum(1).float()  # 0 = the true token scores highest
    assert at.sum() > 50
    assert rank.mean() / 512 < 0.15, rank.mean()  # chance: about 0.5
    assert (rank < 10).float().mean() > 0.15  # top-10 hits, chance 2%


def test_span_model_samples_from_a_sentinel_prompt(bpe_data, tmp_path):
    short_run("t5-span-cpu.yaml", bpe_data, tmp_path / "run", "--max_iters=5", "--eval_iters=1")
    texts = sample(tmp_path / "run", "To be or <extra_id_0> to be", num_samples=2, max_new_tokens=8)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
