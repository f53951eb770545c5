"""GGUF: tiny LLaMA and Qwen2 models written the way llama.cpp's converter writes them
(Q/K rows permuted for LLaMA, not for Qwen2), read back by lmforge, compared with the original."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from lmforge import load_model  # noqa: E402


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What convert_hf_to_gguf.py does to LLaMA's q_proj/k_proj rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(hf_model, path, arch: str, quant: str | None = None):
    c = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, value in sd.items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if key in names:
            name = names[key]
        else:
            _, _, i, *rest = key.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            name = f"blk.{i}.{per_layer[module]}.{kind}"
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = c.num_attention_heads if module.endswith("q_proj") else c.num_key_value_heads
                value = _llama_cpp_permute(value, heads)
        if quant and value.ndim == 2 and value.shape[1] % 32 == 0:
            qtype = getattr(gguf.GGMLQuantizationType, quant)
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny(kind: str):
    T = transformers
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    if kind == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(**common, tie_word_embeddings=False))
    else:
        model = T.Qwen2ForCausalLM(T.Qwen2Config(**common, tie_word_embeddings=True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_f32_matches_the_original_model(arch, tmp_path):
    hf = _tiny(arch)
    path = tmp_path / f"{arch}.gguf"
    _write_gguf(hf, path, arch)
    ours = load_model(path)
    assert ours.config.family == arch and ours.config.qkv_bias == (arch == "qwen2")
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_quantized_gguf_is_close_to_the_original(tmp_path):
    hf = _tiny("llama")
    path = tmp_path / "q8.gguf"
    _write_gguf(hf, path, "llama", quant="Q8_0")
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        ref = hf(ids).logits
        err = (load_model(path, quantize="none")(ids) - ref).abs().max() / ref.abs().max()  # dequantized: the reference path
    assert err < 0.02, f"Q8_0 relative error {err:.4f}"
