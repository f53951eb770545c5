"""LoRA on lmforge's fused projections: PEFT-format adapters that peft + transformers load with the
same logits as our merged model, merging, the int8 (QLoRA-style) base, and bad target names."""

import json
import subprocess
import sys

import pytest
import torch

from lmforge import build_model, load_model
from lmforge.align.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
)
from lmforge.config import ConfigError
from sft_helpers import REPO, make_tiny_chat_model, tiny_config


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model")


def randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for B in layer.lora_B:
                B.copy_(torch.randn(B.shape, generator=g) * 0.2)


def ids(vocab, T=12, B=2, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_pieces_touch_only_their_rows():
    torch.manual_seed(0)
    cfg = tiny_config(64)
    model = build_model(cfg)
    apply_lora(model, ["k_proj", "up_proj"], r=2)
    qkv = model.stack.layers[0].attn.qkv
    assert isinstance(qkv, LoRALinear) and [p.name for p in qkv.pieces] == ["model.layers.0.self_attn.k_proj"]
    q_dim, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    assert (qkv.pieces[0].start, qkv.pieces[0].end) == (q_dim, q_dim + kv)
    randomize_adapters(model)
    delta = qkv.delta()
    assert delta[:q_dim].abs().sum() == 0 and delta[q_dim + kv :].abs().sum() == 0 and delta[q_dim : q_dim + kv].abs().sum() > 0
    up = model.stack.layers[0].mlp.up
    assert [p.name.rsplit(".", 1)[-1] for p in up.pieces] == ["up_proj"] and up.pieces[0].start == cfg.d_ff
    # only adapters train
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_starts_as_the_base_and_merges_exactly():
    torch.manual_seed(0)
    model = build_model(tiny_config(64)).eval()
    x = ids(64)
    base_logits = model(x)
    apply_lora(model, ["all-linear"], r=4, alpha=8)
    torch.testing.assert_close(model(x), base_logits, rtol=0, atol=0)  # B = 0
    randomize_adapters(model)
    adapted = model(x)
    assert (adapted - base_logits).abs().max() > 1e-2
    merged = merge_lora(model)
    assert not lora_layers(merged) and all(type(m.attn.qkv) is torch.nn.Linear for m in merged.stack.layers)
    torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ALL])
def test_peft_loads_our_adapter_with_our_merged_logits(tiny_dir, tmp_path, targets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = apply_lora(load_model(tiny_dir), targets, r=4, alpha=16)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model=str(tiny_dir))
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(targets)
    x = ids(model.config.vocab_size)
    ours = merge_lora(model)(x)

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=x).logits
    torch.testing.assert_close(theirs, ours.detach(), rtol=0, atol=1e-4)
    # every tensor we wrote was taken (a misnamed key would load as nothing and leave B = 0)
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_" in n)
    from safetensors.torch import load_file

    assert n_lora == len(load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS))


def test_we_load_an_adapter_peft_saved(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "peft")
    x = ids(hf.config.vocab_size)
    with torch.no_grad():
        theirs = peft_model.eval()(input_ids=x).logits
    ours = load_adapter(load_model(tiny_dir), tmp_path / "peft")
    torch.testing.assert_close(ours(x), theirs, rtol=0, atol=1e-4)


def test_int8_base_trains_and_merges(tiny_dir):
    from lmforge.inference.quantize import Int8Linear

    model = apply_lora(load_model(tiny_dir).train(), ["q_proj", "v_proj"], r=4, alpha=8, quantize_base="int8")
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert all(isinstance(m.base, Int8Linear) for m in layers)  # every projection, adapted or not
    assert sum(1 for m in layers if m.pieces) == model.config.n_layer
    x = ids(model.config.vocab_size, T=16, B=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    model.eval()
    adapted = model(x)
    merged = merge_lora(model)  # dequantized base + B A
    torch.testing.assert_close(merged(x), adapted, rtol=0, atol=5e-2)  # the int8 kernel rounds activations to bf16


def test_target_that_names_no_module(tiny_dir):
    model = load_model(tiny_dir)
    with pytest.raises(ConfigError, match=r"lora_targets: 'q_projection' names no module of this llama model; choose from .*q_proj"):
        apply_lora(model, ["q_projection"])
    assert not lora_layers(model)


def test_merge_cli(tiny_dir, tmp_path, capsys):
    model = apply_lora(load_model(tiny_dir), ["q_proj", "gate_proj"], r=2)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model=str(tiny_dir))
    x = ids(model.config.vocab_size)
    expected = merge_lora(model)(x)
    cmd = [sys.executable, "-m", "lmforge.cli", "lora", "merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    torch.testing.assert_close(load_model(tmp_path / "merged")(x), expected, rtol=0, atol=1e-5)
    from lmforge.cli import main

    code = main(["lora", "merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "again"), "--base", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lmforge lora: error: ") and "nowhere does not exist" in err and err.count("\n") == 1
    assert not (tmp_path / "again").exists()


def test_gpt2_conv1d_adapter_loads_in_peft(tmp_path):
    """GPT-2 keeps c_attn as one fused (in, out) Conv1D: one piece, saved with fan_in_fan_out."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmforge import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("gpt2", n_layer=2, n_embd=32, n_head=4, vocab_size=64, max_seq_len=32)
    build_model(cfg).save_pretrained(tmp_path / "gpt2")
    model = apply_lora(load_model(tmp_path / "gpt2"), ["c_attn", "c_fc"], r=2, alpha=4)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["fan_in_fan_out"] is True
    x = ids(64)
    ours = merge_lora(model)(x)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(input_ids=x).logits
    torch.testing.assert_close(theirs, ours.detach(), rtol=0, atol=1e-4)
