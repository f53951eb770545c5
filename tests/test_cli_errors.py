"""Mistakes a user can fix get one sentence and exit 2 from the CLI, never a traceback, and leave nothing behind."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge import ModelConfig, build_model, load_model
from lmforge.cli import main
from lmforge.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "configs" / "nanogpt-shakespeare-char-cpu.yaml")


def run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def one_sentence(err):
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture()
def ckpt(tmp_path):
    cfg = ModelConfig.from_name("smollm2-135m", vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, d_ff=48, max_seq_len=32)
    torch.manual_seed(0)
    build_model(cfg).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.mark.parametrize("key, value, field, words", [
    ("hidden_size", "32", "n_embd", "an integer"),
    ("num_hidden_layers", None, "n_layer", "an integer"),
    ("rms_norm_eps", "tiny", "norm_eps", "a number"),
])  # fmt: skip
def test_wrong_types_in_config_json(capsys, ckpt, key, value, field, words):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[key] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    code, err = run(capsys, "info", str(ckpt))
    assert code == 2
    assert f"{ckpt / 'config.json'} does not describe a working model: {field} must be {words}" in one_sentence(err)


def test_model_config_types_are_checked_directly():
    with pytest.raises(ConfigError, match=r"n_head must be an integer, got 4.0"):
        ModelConfig(n_head=4.0)
    with pytest.raises(ConfigError, match=r"tie_embeddings must be true or false"):
        ModelConfig(tie_embeddings="yes")
    assert ModelConfig(norm_eps=1).norm_eps == 1  # an integer is a number


def test_legacy_pickle_checkpoint_loads_with_equal_logits(tmp_path, ckpt):
    legacy = tmp_path / "legacy"
    shutil.copytree(ckpt, legacy)
    state = load_file(legacy / "model.safetensors")
    (legacy / "model.safetensors").unlink()
    torch.save(state, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # pre-1.6 format
    x = torch.randint(0, 64, (2, 12))
    assert torch.equal(load_model(legacy)(x), load_model(ckpt)(x))


@pytest.mark.parametrize("argv", [
    ["data", "prepare", "{corpus}", "--tokenizer", "char", "--out", "{file}"],
    ["tokenizer", "train", "{corpus}", "--vocab-size", "370", "--out", "{file}"],
    ["pretrain", RECIPE, "--data", "{corpus}", "--out", "{file}"],
], ids=["data-prepare", "tokenizer-train", "pretrain"])  # fmt: skip
def test_output_path_that_is_a_file(capsys, tmp_path, argv):
    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be, that is the question. " * 20)
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    code, err = run(capsys, *[a.format(corpus=corpus, file=afile) for a in argv])
    assert code == 2 and str(afile) in one_sentence(err)
    assert afile.read_text() == "keep me"


def test_resume_without_a_checkpoint_says_so(capsys, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Now is the winter of our discontent. " * 50)
    code, err = run(capsys, "pretrain", RECIPE, "--data", str(corpus), "--out", str(tmp_path / "run"), "--resume")
    assert code == 2 and "holds no checkpoint" in one_sentence(err)
    assert not (tmp_path / "run").exists()


def test_a_config_error_found_after_preparing_data_leaves_no_directory(capsys, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Now is the winter of our discontent. " * 50)
    out = tmp_path / "run"
    code, err = run(capsys, "pretrain", RECIPE, "--data", str(corpus), "--out", str(out), "--n_embd=33")
    assert code == 2 and "n_embd=33 is not divisible" in err.splitlines()[-1]
    assert not out.exists()
