"""lmforge <-> transformers, both directions, for every family: tiny random HF models (fp32)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge import load_model  # noqa: E402
from lmforge.config import PRESETS, ModelConfig  # noqa: E402
from lmforge.models import build_model  # noqa: E402

torch.manual_seed(0)
TOL = dict(atol=1e-4, rtol=1e-4)


def _tiny_hf(kind: str):
    T = transformers
    if kind == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4))
    if kind == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                                tie_word_embeddings=False))
    if kind == "llama-rope-llama3":
        return T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}))
    if kind == "llama-rope-yarn":
        return T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}))
    if kind == "llama-legacy-rope":  # older config.json keys: rope_theta + rope_scaling
        return T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=128, rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}))
    if kind == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                                    sliding_window=4))
    if kind == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                                tie_word_embeddings=True))
    if kind == "bert":
        return T.BertModel(T.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=64))
    if kind == "bert-mlm":
        return T.BertForMaskedLM(T.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=64, max_position_embeddings=64))
    if kind == "bert-cls":
        return T.BertForSequenceClassification(T.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                                            num_attention_heads=4, intermediate_size=64,
                                                            max_position_embeddings=64, num_labels=3))
    if kind == "bert-tok":
        return T.BertForTokenClassification(T.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=4, intermediate_size=64,
                                                         max_position_embeddings=64, num_labels=5))
    if kind == "t5":
        return T.T5ForConditionalGeneration(T.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                       num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=8,
                                                       relative_attention_max_distance=20))
    if kind == "t5-gated":  # v1.1 / flan: gated-gelu, untied head
        return T.T5ForConditionalGeneration(T.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                       feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                                       relative_attention_num_buckets=8, relative_attention_max_distance=20))
    raise KeyError(kind)


def _randomize(model):
    """Random init leaves norms at 1 and biases at 0; perturb everything so a swapped tensor shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _hf_out(hf, kind, ids, mask):
    with torch.no_grad():
        if kind.startswith("t5"):
            return hf(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5]).logits
        out = hf(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state if kind == "bert" else out.logits


def _our_out(model, kind, ids, mask):
    with torch.no_grad():
        if kind.startswith("t5"):
            return model(ids, attention_mask=mask, decoder_input_ids=ids[:, :5])
        return model(ids, attention_mask=mask)


KINDS = ["gpt2", "llama", "llama-rope-llama3", "llama-rope-yarn", "llama-legacy-rope", "mistral", "qwen2",
         "bert", "bert-mlm", "bert-cls", "bert-tok", "t5", "t5-gated"]


@pytest.mark.parametrize("kind", KINDS)
def test_roundtrip_with_transformers(kind, tmp_path):
    hf = _randomize(_tiny_hf(kind)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 97, (2, 12))
    mask = torch.ones_like(ids)
    if not kind.startswith(("gpt2", "llama", "mistral", "qwen2")):
        mask[1, 9:] = 0  # right padding for encoders (HF decoders want left padding; tested elsewhere)
    ref = _hf_out(hf, kind, ids, mask)

    ours = load_model(tmp_path / "hf")
    got = _our_out(ours, kind, ids, mask)
    if kind.startswith("bert") and kind != "bert-cls":
        keep = mask.bool()
        torch.testing.assert_close(got[keep], ref[keep], **TOL)  # padded positions are don't-care
    else:
        torch.testing.assert_close(got, ref, **TOL)

    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] != "lmforge", "a config with a HF twin must be saved in the HF format"
    back = type(hf).from_pretrained(tmp_path / "ours").eval()
    again = _hf_out(back, kind, ids, mask)
    torch.testing.assert_close(again, ref, **TOL)


def test_mistral_sliding_window_matters(tmp_path):
    """With a window of 4 over 12 tokens the window must change the logits (else the test above proves nothing)."""
    hf = _randomize(_tiny_hf("mistral")).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.sliding_window == 4
    ids = torch.randint(0, 97, (1, 12))
    windowed = ours(ids)
    ours.stack.window = None
    assert not torch.allclose(windowed[:, 6:], ours(ids)[:, 6:], atol=1e-4)


def test_pytorch_model_bin_loads_with_weights_only(tmp_path):
    hf = _randomize(_tiny_hf("gpt2")).eval()
    hf.save_pretrained(tmp_path, safe_serialization=False) if "safe_serialization" in hf.save_pretrained.__code__.co_varnames else None
    if not (tmp_path / "pytorch_model.bin").exists():  # transformers v5 writes safetensors only: make a .bin ourselves
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
        for f in tmp_path.glob("*.safetensors"):
            f.unlink()
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(ids), hf(ids).logits, **TOL)


def test_bare_base_model_checkpoints_load(tmp_path):
    """GPT2Model / LlamaModel checkpoints have no 'transformer.'/'model.' prefix and no head."""
    T = transformers
    base = _randomize(T.GPT2Model(T.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=1, n_head=4))).eval()
    base.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    ours = load_model(tmp_path)
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours.hidden(ids), base(ids).last_hidden_state, **TOL)
    assert cfg["model_type"] == "gpt2"


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium", "smollm2-135m", "llama-3.2-1b", "qwen2-0.5b", "mistral-7b",
                                  "bert-base", "minilm-l6", "t5-small"])
def test_parameter_counts_equal_transformers(name):
    from lmforge.checkpoints.hf import FAMILIES

    cfg = ModelConfig.from_name(name)
    hf_cfg = FAMILIES[cfg.family].hf_config(cfg)
    hf_cls = getattr(transformers, hf_cfg["architectures"][0])
    config_cls = transformers.AutoConfig.for_model(hf_cfg["model_type"]).__class__
    hf_config = config_cls(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        ours = build_model(cfg).num_parameters()
        theirs = hf_cls(hf_config).num_parameters()
    assert ours == theirs, f"{name}: lmforge {ours:,} vs transformers {theirs:,}"


def test_presets_cover_the_issue():
    wanted = {"gpt2", "gpt2-medium", "smollm2-135m", "llama-3.2-1b", "qwen2-0.5b", "mistral-7b", "bert-base",
              "minilm-l6", "t5-small", "transformer-base", "nanogpt-char"}
    assert wanted <= set(PRESETS)
