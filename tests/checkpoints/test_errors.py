"""Bad checkpoints and configs get one clear sentence, never a traceback from deep inside torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge import ModelConfig, build_model, load_model
from lmforge.checkpoints import default_model_path
from lmforge.errors import CheckpointError, UserError


@pytest.fixture()
def tiny_llama_dir(tmp_path):
    cfg = ModelConfig.from_name("smollm2-135m", vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, d_ff=48, max_seq_len=32)
    model = build_model(cfg)
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt", model


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_unknown_architecture_names_the_supported_ones(tiny_llama_dir):
    d, _ = tiny_llama_dir
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gptj", architectures=["GPTJForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"'gptj'.*supported: .*llama.*t5"):
        load_model(d)


def test_missing_and_unexpected_tensors_are_listed(tiny_llama_dir):
    d, _ = tiny_llama_dir
    state = load_file(d / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: model.layers.1.mlp.up_proj.weight; unexpected tensors: model.layers.1.mlp.extra.weight"):
        load_model(d)


def test_shape_mismatch_names_tensor_and_shapes(tiny_llama_dir):
    d, _ = tiny_llama_dir
    state = load_file(d / "model.safetensors")
    state["model.layers.0.mlp.down_proj.weight"] = torch.zeros(32, 40)
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.down_proj.weight has shape \(32, 40\).*expects \(32, 48\)"):
        load_model(d)


def test_truncated_safetensors(tiny_llama_dir):
    d, _ = tiny_llama_dir
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"could not read .*model.safetensors: it is truncated"):
        load_model(d)


def test_truncated_gguf(tmp_path):
    src = default_model_path()
    if not src.exists():
        pytest.skip("bundled model not installed")
    bad = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    with pytest.raises(CheckpointError, match="cut.gguf"):
        load_model(bad)


def test_saved_checkpoint_round_trips(tiny_llama_dir):
    d, model = tiny_llama_dir
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_model(d)(ids), model.eval()(ids))
    assert not list(d.glob(".*tmp*")), "no temporary files are left behind"


@pytest.mark.parametrize("preset", ["transformer-base", "nanogpt-char"])
def test_models_without_or_with_a_twin_round_trip(preset, tmp_path):
    cfg = ModelConfig.from_name(preset, n_layer=2, n_embd=32, n_head=4, d_ff=64, vocab_size=50, max_seq_len=32, dropout=0.0)
    if preset == "transformer-base":
        cfg = cfg.replace(embed_scale=32**0.5)
    model = build_model(cfg).eval()
    model.save_pretrained(tmp_path)
    kind = json.loads((tmp_path / "config.json").read_text())["model_type"]
    assert kind == ("lmforge" if preset == "transformer-base" else "gpt2")
    back = load_model(tmp_path)
    ids = torch.randint(0, 50, (2, 7))
    kw = {"decoder_input_ids": ids[:, :4]} if cfg.arch == "encoder-decoder" else {}
    with torch.no_grad():
        torch.testing.assert_close(back(ids, **kw), model(ids, **kw))


def test_alibi_model_saves_in_lmforge_format(tmp_path):
    cfg = ModelConfig(vocab_size=50, n_layer=1, n_embd=32, n_head=4, position="alibi", max_seq_len=32)
    model = build_model(cfg).eval()
    with pytest.warns(UserWarning, match="lmforge's own format"):
        model.save_pretrained(tmp_path)
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(ids), model(ids))


def test_config_errors_are_one_sentence():
    from lmforge.config import ConfigError

    with pytest.raises(ConfigError, match="n_embd=100 is not divisible by n_head=3"):
        ModelConfig(n_embd=100, n_head=3)
    with pytest.raises(ConfigError, match="n_head=6 is not a multiple of n_kv_head=4"):
        ModelConfig(n_embd=48, n_head=6, n_kv_head=4)
    with pytest.raises(ConfigError, match="unknown ModelConfig key"):
        ModelConfig.from_dict({"n_embed": 3})
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.from_name("gpt5")


def test_cli_info_prints_facts_and_errors_cleanly(tiny_llama_dir, tmp_path):
    d, _ = tiny_llama_dir
    ok = subprocess.run([sys.executable, "-m", "lmforge.cli", "info", str(d)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "llama (decoder)" in ok.stdout and "heads: 4 (KV heads 2, GQA)" in ok.stdout and "context length: 32" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "lmforge.cli", "info", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "does not exist" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
