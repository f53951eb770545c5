"""GGUF files (llama.cpp / Ollama): LLaMA-family and Qwen2 models, dequantized to float.

llama.cpp's converter permutes the rows of LLaMA's Q and K projections so that its RoPE kernel
can rotate adjacent pairs; we undo that to get back the half-split layout used everywhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")


def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # truncated or not a GGUF file: numpy/struct errors from deep inside
        raise CheckpointError(f"could not read {path}: it is truncated or not a valid GGUF file ({type(e).__name__}: {e}).") from None


def metadata(reader) -> dict[str, Any]:
    """Scalar and string fields (token lists are left out: they are large and read separately)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in (
            "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
        ):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # exotic field types we do not need
            continue
    return out


def gguf_config(meta: dict[str, Any], tensors: dict[str, Any]) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}.")
    g = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    n_embd, n_head = int(g("embedding_length")), int(g("attention.head_count"))
    head_dim = int(g("attention.key_length") or g("rope.dimension_count") or n_embd // n_head)
    scaling = None
    kind = g("rope.scaling.type")
    if kind and kind != "none":
        scaling = {"type": {"linear": "linear", "yarn": "yarn"}.get(kind, kind), "factor": float(g("rope.scaling.factor", 1.0))}
        if g("rope.scaling.original_context_length"):
            scaling["original_max_position_embeddings"] = int(g("rope.scaling.original_context_length"))
    if "rope_freqs.weight" in tensors:
        raise CheckpointError("GGUF files with per-frequency RoPE factors (rope_freqs, Llama 3.1+) are not supported yet.")
    tensor_names = set(tensors)
    vocab = g("vocab_size") or int(tensors["token_embd.weight"].shape[-1])
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        arch="decoder", family="qwen2" if arch == "qwen2" else "llama", name=meta.get("general.name"),
        position="rope", norm="rmsnorm", norm_placement="pre", ffn="glu", activation="silu",
        qkv_bias="blk.0.attn_q.bias" in tensor_names, attn_out_bias="blk.0.attn_output.bias" in tensor_names,
        mlp_bias=False, norm_bias=False, vocab_size=int(vocab), n_layer=int(g("block_count")), n_embd=n_embd,
        n_head=n_head, n_kv_head=int(g("attention.head_count_kv", n_head)), head_dim=head_dim,
        d_ff=int(g("feed_forward_length")), max_seq_len=int(g("context_length", 2048)),
        norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)), rope_theta=float(g("rope.freq_base", 10000.0)),
        rope_scaling=scaling, tie_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=eos,
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation (pairs interleaved -> halves split)."""
    rows, dim = w.shape if w.ndim == 2 else (w.shape[0], 1)
    return w.reshape(n_head, rows // n_head // 2, 2, dim).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, state dict in lmforge names, metadata) of a GGUF file, weights as float32."""
    import gguf

    reader = open_gguf(path)
    meta = metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = gguf_config(meta, tensors)
    permute = meta.get("general.architecture") != "qwen2"  # llama.cpp permutes Q/K for LLaMA-style models only

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise CheckpointError(f"{path} lacks tensor {name!r}; the file is incomplete or not a {cfg.family} model.")
        t = tensors[name]
        try:
            return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise CheckpointError(f"could not dequantize {name!r} ({t.tensor_type.name}) in {path}: {e}.") from None

    used: set[str] = set()

    def take(*names: str, unpermute_heads: tuple[int | None, ...] | None = None) -> torch.Tensor:
        parts = []
        for j, name in enumerate(names):
            a = get(name)
            used.add(name)
            if unpermute_heads and unpermute_heads[j]:
                a = _unpermute(a, unpermute_heads[j])
            parts.append(torch.from_numpy(a.copy()))
        return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]

    qk_heads = (cfg.n_head, cfg.n_kv_head, None) if permute else None
    sd = {"embed.tok.weight": take("token_embd.weight"), "stack.norm.weight": take("output_norm.weight")}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = take("output.weight")
    for i in range(cfg.n_layer):
        b, o = f"blk.{i}.", f"stack.layers.{i}."
        sd[o + "attn_norm.weight"] = take(b + "attn_norm.weight")
        sd[o + "attn.qkv.weight"] = take(b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight", unpermute_heads=qk_heads)
        if cfg.qkv_bias:
            sd[o + "attn.qkv.bias"] = take(b + "attn_q.bias", b + "attn_k.bias", b + "attn_v.bias", unpermute_heads=qk_heads)
        sd[o + "attn.o.weight"] = take(b + "attn_output.weight")
        if cfg.attn_out_bias:
            sd[o + "attn.o.bias"] = take(b + "attn_output.bias")
        sd[o + "mlp_norm.weight"] = take(b + "ffn_norm.weight")
        sd[o + "mlp.up.weight"] = take(b + "ffn_gate.weight", b + "ffn_up.weight")
        sd[o + "mlp.down.weight"] = take(b + "ffn_down.weight")
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(f"{path} has tensors this loader does not understand: {', '.join(extra[:8])}.")
    return cfg, sd, meta
