"""GGUF files (llama.cpp / Ollama): LLaMA-family and Qwen2 models.

Weights are dequantized to float, or (``keep_quantized=True``) the linear layers' Q4_0, Q4_1 and
Q8_0 blocks are kept as ``Blocks`` (integer values with a scale, and a zero, per block of 32) for
the int4/int8 kernels of ``lmforge.inference.quantize``; other types are always dequantized.

llama.cpp's converter permutes the rows of LLaMA's Q and K projections so that its RoPE kernel
can rotate adjacent pairs; we undo that to get back the half-split layout used everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")
BLOCK = 32  # weights per block in Q4_0, Q4_1 and Q8_0
BLOCK_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # kept as blocks by keep_quantized=True


@dataclass
class Blocks:
    """The rows of a block-quantized matrix, unpacked (a block is 32 consecutive inputs of a row):

        4 bits (Q4_0, Q4_1):  w[n, k] = scale[n, b] * (q[n, k] - 8) + zero[n, b]    q in [0, 15]
        8 bits (Q8_0):        w[n, k] = scale[n, b] * q[n, k]                        q in [-127, 127]

    with b = k // 32. Q4_1 stores w = d * q + m, i.e. zero = m + 8 d; Q4_0 stores w = d * (q - 8),
    zero = 0. Scales and zeros are float32 (GGUF stores float16, so they are exact)."""

    bits: int
    q: torch.Tensor  # (N, K) uint8 (4 bits) or int8 (8 bits)
    scale: torch.Tensor  # (N, K/32) float32
    zero: torch.Tensor | None  # (N, K/32) float32, 4 bits only

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (N, K)."""
        N, K = self.q.shape
        scale = self.scale.repeat_interleave(BLOCK, dim=1)
        if self.bits == 8:
            return self.q.float() * scale
        return (self.q.float() - 8) * scale + self.zero.repeat_interleave(BLOCK, dim=1)

    def rows(self, index: torch.Tensor) -> Blocks:
        return Blocks(self.bits, self.q[index], self.scale[index], None if self.zero is None else self.zero[index])

    @staticmethod
    def cat(parts: list[Blocks]) -> Blocks:
        """Matrices stacked by rows (fused QKV, gate/up), all of the same bit width."""
        zeros = [p.zero for p in parts]
        return Blocks(parts[0].bits, torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                      None if zeros[0] is None else torch.cat(zeros))  # fmt: skip


def unpack_blocks(raw: np.ndarray, type_name: str) -> Blocks:
    """``Blocks`` of a Q4_0 / Q4_1 / Q8_0 tensor's data (rows, bytes per row), as llama.cpp lays
    them out: per block a float16 scale d (Q4_1: then a float16 minimum m), then the values; 4-bit
    blocks hold inputs 0-15 in the low nibbles of their 16 bytes and 16-31 in the high ones."""
    N = raw.shape[0]
    header = 4 if type_name == "Q4_1" else 2
    size = header + (BLOCK if type_name == "Q8_0" else BLOCK // 2)
    blk = np.ascontiguousarray(raw).reshape(N, -1, size)  # (N, K/32, bytes per block)
    d = torch.from_numpy(blk[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))  # (N, K/32)
    body = blk[..., header:]
    if type_name == "Q8_0":
        q = torch.from_numpy(body.copy().view(np.int8).reshape(N, -1))
        return Blocks(8, q, d, None)
    q = torch.from_numpy(np.concatenate([body & 0x0F, body >> 4], axis=-1).reshape(N, -1))  # (N, K) in [0, 15]
    if type_name == "Q4_1":
        m = torch.from_numpy(blk[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        return Blocks(4, q, d, m + 8 * d)
    return Blocks(4, q, d, torch.zeros_like(d))


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


def read_gguf(path: Path, keep_quantized: bool = False) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """(config, state dict in lmforge names, metadata) of a GGUF file, weights as float32.

    ``keep_quantized``: linear weights whose parts are all Q4_0/Q4_1 (or all Q8_0) come as
    ``Blocks`` instead; a tied output head gets its own entry ``lm_head.weight`` (the token
    embedding's blocks) beside the float embedding."""
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

    def bits(name: str) -> int | None:
        kind = tensors[name].tensor_type.name if name in tensors else None
        return None if kind not in BLOCK_TYPES else 8 if kind == "Q8_0" else 4

    def take(*names: str, unpermute_heads: tuple[int | None, ...] | None = None, blocks: bool = False):
        if blocks and keep_quantized and len({bits(n) for n in names}) == 1 and bits(names[0]) is not None:
            parts = []
            for j, name in enumerate(names):
                used.add(name)
                b = unpack_blocks(tensors[name].data, tensors[name].tensor_type.name)
                if unpermute_heads and unpermute_heads[j]:
                    b = b.rows(torch.from_numpy(_unpermute(np.arange(b.shape[0])[:, None], unpermute_heads[j])[:, 0]))
                parts.append(b)
            return Blocks.cat(parts)
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
    if not cfg.tie_embeddings or keep_quantized:
        head = take("token_embd.weight" if cfg.tie_embeddings else "output.weight", blocks=True)
        if not cfg.tie_embeddings or isinstance(head, Blocks):
            sd["lm_head.weight"] = head
    for i in range(cfg.n_layer):
        b, o = f"blk.{i}.", f"stack.layers.{i}."
        sd[o + "attn_norm.weight"] = take(b + "attn_norm.weight")
        qkv = (b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight")
        sd[o + "attn.qkv.weight"] = take(*qkv, unpermute_heads=qk_heads, blocks=True)
        if cfg.qkv_bias:
            sd[o + "attn.qkv.bias"] = take(b + "attn_q.bias", b + "attn_k.bias", b + "attn_v.bias", unpermute_heads=qk_heads)
        sd[o + "attn.o.weight"] = take(b + "attn_output.weight", blocks=True)
        if cfg.attn_out_bias:
            sd[o + "attn.o.bias"] = take(b + "attn_output.bias")
        sd[o + "mlp_norm.weight"] = take(b + "ffn_norm.weight")
        sd[o + "mlp.up.weight"] = take(b + "ffn_gate.weight", b + "ffn_up.weight", blocks=True)
        sd[o + "mlp.down.weight"] = take(b + "ffn_down.weight", blocks=True)
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(f"{path} has tensors this loader does not understand: {', '.join(extra[:8])}.")
    return cfg, sd, meta
