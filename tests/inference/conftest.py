"""Tiny random models saved as Hugging Face directories, loaded by transformers and by lmforge."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    """Every test here runs single-threaded (tests/conftest.py: one_thread)."""


@pytest.fixture(autouse=True)
def eager_cli(monkeypatch):
    """The CLI compiles in the background by default; these tests check its eager output and
    timing lines, so they run with LMFORGE_COMPILE=off (the background path: tests/engine)."""
    monkeypatch.setenv("LMFORGE_COMPILE", "off")


def _perturb(model, std: float) -> None:
    """Random init leaves norms at 1 and biases at 0 and gives flat distributions; spread the
    logits so greedy decoding walks through many different tokens."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)


def _save(hf, path):
    hf.eval().save_pretrained(path)
    from lmforge import load_model

    return hf, load_model(path)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """(transformers model, lmforge model): GPT-2, 2 layers, 97 tokens, eos 96."""
    torch.manual_seed(0)
    T = transformers
    cfg = T.GPT2Config(vocab_size=97, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=96, eos_token_id=96)
    hf = T.GPT2LMHeadModel(cfg)
    _perturb(hf, 0.3)
    return _save(hf, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def tiny_gpt2_draft(tmp_path_factory):
    """Another GPT-2 with the same vocabulary, for speculative decoding."""
    torch.manual_seed(1)
    T = transformers
    cfg = T.GPT2Config(vocab_size=97, n_positions=128, n_embd=16, n_layer=1, n_head=2, bos_token_id=96, eos_token_id=96)
    hf = T.GPT2LMHeadModel(cfg)
    _perturb(hf, 0.3)
    return _save(hf, tmp_path_factory.mktemp("gpt2-draft"))[1]


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    torch.manual_seed(2)
    T = transformers
    cfg = T.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=20,
                     eos_token_id=1, pad_token_id=0, decoder_start_token_id=0)  # fmt: skip
    hf = T.T5ForConditionalGeneration(cfg)
    _perturb(hf, 2.0)
    return _save(hf, tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="session")
def smol_tokenizer():
    from lmforge.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory, smol_tokenizer):
    """A tiny random LLaMA-shaped model with SmolLM2's tokenizer and chat template, saved with it."""
    from lmforge import ModelConfig, load_model
    from lmforge.models import build_model

    torch.manual_seed(3)
    cfg = ModelConfig.from_name("smollm2-135m", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, d_ff=128, max_seq_len=512)
    model = build_model(cfg)
    _perturb(model, 0.2)
    path = tmp_path_factory.mktemp("chat")
    model.save_pretrained(path, tokenizer=smol_tokenizer)
    return path, load_model(path)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory):
    """Mistral with a sliding window of 8 positions (prompts + generations run far past it)."""
    torch.manual_seed(4)
    T = transformers
    cfg = T.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, sliding_window=8, eos_token_id=96,
                          bos_token_id=95)  # fmt: skip
    hf = T.MistralForCausalLM(cfg)
    _perturb(hf, 0.3)
    return _save(hf, tmp_path_factory.mktemp("mistral"))
