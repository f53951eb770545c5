"""lmforge.eval.passkey: the seeded generator, the retrieval and position-NLL measurements, the CLI."""

import json
import random
import re
from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.eval.passkey import (
    KEY_DIGITS,
    make_sample,
    nll_by_position,
    passkey_accuracy,
    with_context,
    write_passkey_corpus,
)
from lmforge.eval.perplexity import perplexity
from lmforge.models import build_model
from lmforge.tokenizer import CharTokenizer

FILLER = ("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 40)
ALPHABET = FILLER + "0123456789.?WTRhkmpsy "


def tiny(max_seq_len=64, **kw):
    tok = CharTokenizer.from_text(ALPHABET)
    cfg = ModelConfig.from_name("smollm2-135m", n_layer=1, n_embd=32, n_head=4, n_kv_head=2, d_ff=64,
                                vocab_size=tok.vocab_size, max_seq_len=max_seq_len, **kw)  # fmt: skip
    torch.manual_seed(0)
    return build_model(cfg).eval(), tok


def test_samples_have_the_exact_length_and_the_key_at_the_depth():
    for length, depth in [(160, 0.0), (200, 0.5), (512, 1.0)]:
        s = make_sample(FILLER, length, depth, random.Random(3))
        assert len(s.text) == length and s.text == s.prompt + s.key + ".\n"
        assert re.fullmatch(r"\d{5}", s.key) and s.prompt.endswith("The pass key is ")
        where = s.text.index(f"The pass key is {s.key}. Remember it.") / length
        assert abs(where - depth * (length - 120) / length) < 0.05
    a, b = make_sample(FILLER, 200, 0.3, random.Random(7)), make_sample(FILLER, 200, 0.3, random.Random(7))
    assert a == b  # seeded
    with pytest.raises(UserError, match="needs at least"):
        make_sample(FILLER, 50, 0.5, random.Random(0))


def test_corpus_is_back_to_back_samples(tmp_path):
    (tmp_path / "f.txt").write_text(FILLER * 3)
    out = write_passkey_corpus(tmp_path / "f.txt", tmp_path / "c.txt", length=180, samples=7, seed=1)
    text = out.read_text()
    assert len(text) == 7 * 180
    for i in range(7):  # every window of 180 characters is one whole sample ending with its answer
        sample = text[i * 180 : (i + 1) * 180]
        key = re.search(r"The pass key is (\d{5})\. Remember", sample).group(1)
        assert sample.endswith(f"What is the pass key? The pass key is {key}.\n")


class Oracle(torch.nn.Module):
    """Reads the key from the prompt (a perfect retriever), or answers a fixed wrong key."""

    def __init__(self, tok, wrong=False):
        super().__init__()
        self.tok, self.wrong, self.w = tok, wrong, torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.tok.vocab_size)
        for b, row in enumerate(ids.tolist()):
            key = "99999" if self.wrong else re.search(r"pass key is (\d{5})", self.tok.decode(row)).group(1)
            for j, digit in enumerate(key):  # logits[t] predicts token t+1; the last 4 inputs are digits 0..3
                logits[b, ids.shape[1] - KEY_DIGITS + j, self.tok.encode(digit, add_special_tokens=False)[0]] = 1.0
        return logits


def test_accuracy_counts_whole_keys():
    tok = CharTokenizer.from_text(ALPHABET)
    assert passkey_accuracy(Oracle(tok), tok, FILLER, 200, 0.5, 6, batch_size=4) == 1.0
    assert passkey_accuracy(Oracle(tok, wrong=True), tok, FILLER, 200, 0.5, 6) == 0.0
    model, _ = tiny(max_seq_len=256)
    assert passkey_accuracy(model, tok, FILLER, 200, 0.5, 4) == 0.0  # an untrained model: chance is 1e-5


def test_nll_by_position_sums_to_the_perplexity_of_one_window():
    model, tok = tiny()
    ids = torch.tensor(tok.encode(FILLER[:64], add_special_tokens=False))
    ids = torch.cat([ids, ids[:1]])  # 65 tokens: exactly one window of 64 starts at 0
    per_position = nll_by_position(model, ids, 64, 3)
    assert per_position.shape == (63,)
    ref = perplexity(model, ids[:64], context=64, stride=64)
    assert per_position.sum().item() == pytest.approx(ref.nll, rel=1e-5)


def test_with_context_grows_rope_tables_and_keeps_the_scaling():
    model, tok = tiny(rope_scaling={"type": "linear", "factor": 2.0})
    ids = torch.tensor([tok.encode(FILLER[:120], add_special_tokens=False)])
    before = model(ids[:, :64])
    with_context(model, 128)
    assert model.config.max_seq_len == 128 and model.config.rope_scaling == {"type": "linear", "factor": 2.0}
    torch.testing.assert_close(model(ids)[:, :64], before)  # causal: the first 64 positions are unchanged
    learned, _ = tiny(position="learned")
    with pytest.raises(UserError, match="learned positions cannot run 128 tokens"):
        with_context(learned, 128)


def test_cli_writes_reports_and_a_plot(tmp_path, capsys):
    from lmforge.cli import main

    model, tok = tiny()
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    (tmp_path / "filler.txt").write_text(FILLER * 10)
    code = main(["eval-passkey", str(tmp_path / "m"), "--filler", str(tmp_path / "filler.txt"), "--lengths", "128,160",
                 "--depths", "0.2,0.8", "-n", "2", "--bucket", "32", "--windows", "2", "--json", str(tmp_path / "r.json"),
                 "--png", str(tmp_path / "p.png")])  # fmt: skip
    assert code == 0
    (report,) = json.loads((tmp_path / "r.json").read_text())
    assert report["accuracy"] == {"128": 0.0, "160": 0.0} and report["trained_context"] == 64
    assert len(report["nll_buckets"]) == 5 and all(v > 0 for v in report["nll_buckets"])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert "passkey 128: 0%, 160: 0%" in capsys.readouterr().out
    assert main(["eval-passkey", str(tmp_path / "m"), "--filler", str(tmp_path / "filler.txt"), "--lengths", "1k"]) == 2
    assert "is not a comma-separated list of whole numbers" in capsys.readouterr().err


def test_the_three_recipes_chain(tmp_path):
    """The curriculum chains: 128 -> 256 -> 1024, each step loading the previous run's weights and
    tokenizer (the 1024 fine-tune with YaRN positions), every step weighting the key digits."""
    from lmforge.checkpoints import load_model
    from lmforge.train import load_recipe, pretrain
    from lmforge.train.distributed import init_distributed
    from lmforge.train.trainer import Trainer

    configs = Path(__file__).resolve().parents[2] / "configs"
    small = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--d_ff=64", "--batch_size=2", "--max_iters=2", "--warmup_iters=1",
             "--eval_interval=0", "--eval_iters=1", "--progress=false", "--tensorboard=false"]  # fmt: skip
    (tmp_path / "f.txt").write_text(FILLER * 20)
    first = load_recipe(configs / "rope-passkey-128-cpu.yaml", small)
    assert first.train.block_size == first.model["max_seq_len"] == 128
    write_passkey_corpus(tmp_path / "f.txt", tmp_path / "c128.txt", length=128, samples=40)
    pretrain(first.train, first.model, tmp_path / "c128.txt", tmp_path / "base128")
    from_run = lambda run: [*small, f"--init_from={tmp_path / run}", f"--tokenizer={tmp_path / run}"]  # noqa: E731
    base = load_recipe(configs / "rope-passkey-256-cpu.yaml", from_run("base128"))
    write_passkey_corpus(tmp_path / "f.txt", tmp_path / "c256.txt", length=256, samples=40)
    trainer = Trainer(base.train, base.model, tmp_path / "c256.txt", tmp_path / "base", init_distributed("cpu", "ddp"))
    source = load_model(tmp_path / "base128").state_dict()
    for name, tensor in trainer.raw.state_dict().items():
        torch.testing.assert_close(tensor, source[name], msg=name)
    trainer.run()
    ext = load_recipe(configs / "rope-passkey-extend-1024-cpu.yaml", from_run("base"))
    write_passkey_corpus(tmp_path / "f.txt", tmp_path / "c1024.txt", length=1024, samples=12)
    trainer = Trainer(ext.train, ext.model, tmp_path / "c1024.txt", tmp_path / "ext", init_distributed("cpu", "ddp"))
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    assert trainer.model_config.max_seq_len == 1024 and trainer.model_config.rope_scaling == yarn
    assert trainer.block_size == 1024
    source = load_model(tmp_path / "base").state_dict()
    for name, tensor in trainer.raw.state_dict().items():
        torch.testing.assert_close(tensor, source[name], msg=name)
    w = trainer.train_batch(0)["loss_weights"]  # one sample per window: its 5 key digits and "." weigh 20
    assert (w == 20).sum(1).tolist() == [6, 6] and ((w == 1) | (w == 20)).all()
