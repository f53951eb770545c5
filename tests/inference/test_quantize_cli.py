"""`--dtype` / `--quantize` on the command line: what `info` reports and `generate` runs."""

from __future__ import annotations

import pytest
import torch

from lmforge.cli import main


def test_info_reports_how_the_layers_are_loaded(tiny_chat, capsys):
    path, _ = tiny_chat
    assert main(["info", str(path)]) == 0
    assert "loaded as" not in capsys.readouterr().out  # describing alone loads nothing
    assert main(["info", str(path), "--quantize", "int4", "--dtype", "bf16"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "loaded as" in x)
    assert "int4 x8" in line and "int8 x1" in line and "bfloat16" in line


def test_generate_int4_on_unfit_shapes_says_so_and_runs_int8(tmp_path, smol_tokenizer, capsys):
    from lmforge import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("smollm2-135m", n_layer=1, n_embd=48, n_head=4, n_kv_head=2, d_ff=64, max_seq_len=64)
    build_model(cfg).save_pretrained(tmp_path, tokenizer=smol_tokenizer)
    with pytest.warns(UserWarning, match=r"^int4 needs in_features divisible by 32 .* fall back to int8\.$"):
        assert main(["generate", str(tmp_path), "-p", "Hi", "--max-new-tokens", "3", "--quantize", "int4"]) == 0
    assert capsys.readouterr().err.startswith("[3 tokens")
