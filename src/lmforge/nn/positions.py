"""Position information: absolute (sinusoidal, learned), rotary (RoPE and its scalings),
relative (T5 bucketed bias) and ALiBi (linear distance penalty).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import ConfigError, ModelConfig


# --- absolute ------------------------------------------------------------------------------------
def sinusoidal_table(n_pos: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Vaswani et al. 2017: PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d))."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n_pos, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.float()


# --- rotary --------------------------------------------------------------------------------------
def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rotary_dim/2,) and the attention factor for cfg's RoPE scaling.

    default  theta^(-2i/d)
    linear   positions divided by `factor` (position interpolation)
    ntk      NTK-aware: theta * factor^(d/(d-2)), high frequencies kept, low ones stretched
    yarn     per-frequency blend of interpolation and extrapolation + attention temperature
    llama3   Llama-3.1: long wavelengths divided by factor, short kept, smooth in between
    """
    dim = cfg.rotary_dim or cfg.head_dim
    theta = cfg.rope_theta
    s = dict(cfg.rope_scaling or {})
    kind = s.get("type", "default")
    factor = float(s.get("factor", 1.0))
    exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / theta**exps
    attention_factor = 1.0
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind == "ntk":
        inv_freq = 1.0 / (theta * factor ** (dim / (dim - 2))) ** exps
    elif kind == "yarn":
        original = s.get("original_max_position_embeddings") or cfg.max_seq_len
        beta_fast, beta_slow = float(s.get("beta_fast", 32.0)), float(s.get("beta_slow", 1.0))

        def correction_dim(n_rot: float) -> float:  # the dim whose wavelength spans n_rot turns of the context
            return dim * math.log(original / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if s.get("truncate", True):  # whole dims (the paper); gpt-oss keeps the fractional range
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1.0 - ramp  # 1: keep the frequency, 0: interpolate it
        inv_freq = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate

        def mscale(m: float = 1.0) -> float:  # the paper's sqrt(1/t) = 0.1 ln(s) + 1
            return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0

        attention_factor = s.get("attention_factor")
        if attention_factor is None:  # DeepSeek's mscale / mscale_all_dim give a ratio of two such factors
            m, m_all = s.get("mscale"), s.get("mscale_all_dim")
            attention_factor = mscale(m) / mscale(m_all) if m and m_all else mscale()
    elif kind == "llama3":
        original = s["original_max_position_embeddings"]
        low_ff, high_ff = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low_ff, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high_ff) & (wavelen <= original / low_ff)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ConfigError(f"RoPE scaling {kind!r} is not supported (linear, ntk, yarn, llama3).")
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables; ``forward(position_ids)`` returns the rows for those positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.init_buffers()

    def init_buffers(self) -> None:
        cfg = self.cfg
        inv_freq, attention_factor = rope_frequencies(cfg)
        t = torch.arange(cfg.max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (T, rd/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (T, rd): half-split layout (HF / LLaMA)
        self.register_buffer("cos", emb.cos() * attention_factor, persistent=False)
        self.register_buffer("sin", emb.sin() * attention_factor, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, T) -> two (B, 1, T, rd) tables that broadcast over heads
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+d/2}) pair by position * frequency_i. x: (B, H, T, D)."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return (x * cos + rotate_half(x) * sin).to(x.dtype)
    x_rot, x_pass = x[..., :rd], x[..., rd:]  # partial rotary (rotary_dim < head_dim)
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1).to(x.dtype)


# --- relative: T5 --------------------------------------------------------------------------------
def t5_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Map key-minus-query offsets to buckets: exact for small offsets, log-spaced up to max_distance."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).long() * num_buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    large = max_exact + (
        torch.log(relative.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative, large)


class T5RelativeBias(nn.Module):
    """A learned scalar per (bucket, head), added to the attention scores."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.t5_num_buckets, cfg.t5_max_distance
        self.embedding = nn.Embedding(cfg.t5_num_buckets, cfg.n_head)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        # q_pos (Tq,), k_pos (Tk,) -> (1, H, Tq, Tk)
        buckets = t5_bucket(k_pos[None, :] - q_pos[:, None], self.bidirectional, self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


# --- ALiBi ---------------------------------------------------------------------------------------
def alibi_slopes(n_head: int) -> torch.Tensor:
    """Press et al. 2022: geometric slopes 2^(-8/n), 2^(-16/n), ...; interleaved for non-powers of 2."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        return torch.tensor(power_of_2(n_head))
    closest = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(power_of_2(closest) + power_of_2(2 * closest)[0::2][: n_head - closest])


class ALiBi(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.init_buffers()

    def init_buffers(self) -> None:
        self.register_buffer("slopes", alibi_slopes(self.n_head), persistent=False)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        # bias = -slope * |i - j|  -> (1, H, Tq, Tk)
        dist = (q_pos[:, None] - k_pos[None, :]).abs().float()
        return -(self.slopes[:, None, None] * dist).unsqueeze(0)
