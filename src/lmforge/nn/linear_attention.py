"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Softmax attention weighs value j by exp(q·k_j). Replacing that kernel by a product of feature maps
φ(q)·φ(k) lets the sum over keys be taken once and shared by every query:

    y_i = φ(q_i)ᵀ S_i / φ(q_i)ᵀ z_i,     S_i = Σ_{j≤i} φ(k_j) v_jᵀ  (F, Dv),   z_i = Σ_{j≤i} φ(k_j)  (F,)

Two equal ways to compute it:

* **parallel** (training, prefill): the sequence is cut into chunks of C tokens; inside a chunk the
  masked product (φQ φKᵀ ⊙ tril) V is a small quadratic attention, and what all earlier chunks
  contribute is one state read from an exclusive prefix sum of per-chunk states. O(T·C + T·F·Dv/C)
  memory, no (T, T) matrix, no per-token state tensor.
* **recurrent** (decoding): S and z are the whole memory of the layer: one token updates them by a
  rank-1 outer product and reads them. ``LinearAttentionCache`` holds them in place of a KV cache;
  its size does not grow with the sequence.

Feature maps: ``elu`` φ(x) = elu(x) + 1 (the paper's), and ``favor`` — FAVOR+ positive orthogonal random
features (Choromanski et al. 2021, Performer) φ(x) = exp(ωᵀx − |x|²/2)/√m with x scaled by d^−¼,
whose products approximate the softmax kernel exp(q·k/√d); ω is drawn from a fixed seed, so a saved
model rebuilds the same features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.nn.chunked import AttentionInputError

FEATURE_MAPS = ("elu", "favor")
OPTIONS = {"feature_map", "n_features", "seed", "chunk"}


class FeatureMap(nn.Module):
    """φ: (…, D) -> (…, F), positive everywhere so that the normaliser φ(q)ᵀz never vanishes."""

    def __init__(self, kind: str = "elu", head_dim: int = 64, n_features: int | None = None, seed: int = 0):
        super().__init__()
        if kind not in FEATURE_MAPS:
            raise AttentionInputError(f"unknown linear-attention feature map {kind!r}; choose one of {', '.join(FEATURE_MAPS)}.")
        self.kind, self.head_dim, self.seed = kind, head_dim, seed
        self.n_features = head_dim if kind == "elu" else (n_features or head_dim)
        self.init_buffers()

    def init_buffers(self) -> None:
        """The random projection is derived from the seed, never saved (rebuilt after loading)."""
        omega = None
        if self.kind == "favor":
            g = torch.Generator().manual_seed(self.seed)
            blocks, rows = [], 0
            while rows < self.n_features:  # orthogonal blocks of Gaussian rows, norms resampled (chi)
                qmat, _ = torch.linalg.qr(torch.randn(self.head_dim, self.head_dim, generator=g, device="cpu"))
                blocks.append(qmat.T)
                rows += self.head_dim
            norms = torch.randn(self.n_features, self.head_dim, generator=g, device="cpu").norm(dim=1)
            omega = torch.cat(blocks)[: self.n_features] * norms[:, None]  # (F, D)
        self.register_buffer("omega", omega, persistent=False)

    def forward(self, x: torch.Tensor, is_query: bool = False) -> torch.Tensor:
        if self.kind == "elu":
            return F.elu(x) + 1
        x = x * self.head_dim**-0.25
        proj = x @ self.omega.to(x.dtype).T - (x * x).sum(-1, keepdim=True) / 2  # (…, F)
        if is_query:  # a per-query constant cancels between numerator and normaliser: subtract the row max
            proj = proj - proj.amax(-1, keepdim=True).detach()
        return torch.exp(proj) / math.sqrt(self.n_features)


# --- the two forms --------------------------------------------------------------------------------
def linear_attention(
    q: torch.Tensor,  # (B, H, T, D)
    k: torch.Tensor,  # (B, Hkv, T, D)
    v: torch.Tensor,  # (B, Hkv, T, Dv)
    feature_map: FeatureMap,
    *,
    causal: bool = True,
    key_valid: torch.Tensor | None = None,  # (B, T) False at padding: such keys add nothing
    state: tuple[torch.Tensor, torch.Tensor] | None = None,  # (S (B, Hkv, F, Dv), z (B, Hkv, F)) before
    chunk: int = 64,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Parallel (chunked prefix-sum) form. Returns the outputs (B, H, T, Dv) and the state after the
    last token, which ``linear_attention_step`` continues from."""
    B, H, T, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    if H % Hkv:
        raise AttentionInputError(f"{H} query heads cannot share {Hkv} key/value heads: H must be a multiple of Hkv.")
    if chunk < 1:
        raise AttentionInputError(f"chunk={chunk} must be a positive number of tokens.")
    G = H // Hkv
    fq = feature_map(q, is_query=True).view(B, Hkv, G, T, -1)  # (B, Hkv, G, T, F)
    fk = feature_map(k)  # (B, Hkv, T, F)
    if key_valid is not None:
        fk = fk * key_valid[:, None, :, None].to(fk.dtype)
    Fd = fk.shape[-1]
    if state is None:
        state = (fk.new_zeros(B, Hkv, Fd, Dv), fk.new_zeros(B, Hkv, Fd))
    S0, z0 = state
    if not causal:
        S, z = S0 + fk.transpose(-2, -1) @ v, z0 + fk.sum(2)
        num = fq @ S[:, :, None]  # (B, Hkv, G, T, Dv)
        den = fq @ z[:, :, None, :, None]  # (B, Hkv, G, T, 1)
        return (num / (den + eps)).view(B, H, T, Dv), (S, z)
    C = min(chunk, T)
    n = math.ceil(T / C)
    P = n * C - T  # padded keys have φ = 0 (they add nothing), padded queries are cut off
    fq = F.pad(fq, (0, 0, 0, P)).view(B, Hkv, G, n, C, Fd)
    fk = F.pad(fk, (0, 0, 0, P)).view(B, Hkv, n, C, Fd)
    vc = F.pad(v, (0, 0, 0, P)).view(B, Hkv, n, C, Dv)
    Sc = fk.transpose(-2, -1) @ vc  # (B, Hkv, n, F, Dv): what each chunk adds to the state
    zc = fk.sum(3)  # (B, Hkv, n, F)
    S_before = S0[:, :, None] + torch.cat([torch.zeros_like(Sc[:, :, :1]), Sc[:, :, :-1].cumsum(2)], dim=2)
    z_before = z0[:, :, None] + torch.cat([torch.zeros_like(zc[:, :, :1]), zc[:, :, :-1].cumsum(2)], dim=2)
    A = (fq @ fk[:, :, None].transpose(-2, -1)).tril()  # (B, Hkv, G, n, C, C): within the chunk, j ≤ i
    num = fq @ S_before[:, :, None] + A @ vc[:, :, None]  # (B, Hkv, G, n, C, Dv)
    den = (fq @ z_before[:, :, None, :, :, None])[..., 0] + A.sum(-1)  # (B, Hkv, G, n, C)
    y = (num / (den + eps)[..., None]).view(B, Hkv, G, n * C, Dv)[:, :, :, :T]
    return y.reshape(B, H, T, Dv), (S_before[:, :, -1] + Sc[:, :, -1], z_before[:, :, -1] + zc[:, :, -1])


def linear_attention_step(
    q: torch.Tensor,  # (B, H, 1, D)
    k: torch.Tensor,  # (B, Hkv, 1, D)
    v: torch.Tensor,  # (B, Hkv, 1, Dv)
    feature_map: FeatureMap,
    state: tuple[torch.Tensor, torch.Tensor],  # (S (B, Hkv, F, Dv), z (B, Hkv, F))
    *,
    key_valid: torch.Tensor | None = None,  # (B, 1)
    eps: float = 1e-6,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Recurrent form, one token: S += φ(k) vᵀ, z += φ(k); y = φ(q)ᵀS / φ(q)ᵀz. O(1) in the length."""
    B, H, _, _ = q.shape
    Hkv = k.shape[1]
    fq = feature_map(q[:, :, 0], is_query=True).view(B, Hkv, H // Hkv, -1)  # (B, Hkv, G, F)
    fk = feature_map(k[:, :, 0])  # (B, Hkv, F)
    if key_valid is not None:
        fk = fk * key_valid[:, :1, None].to(fk.dtype)  # (B, 1, 1)
    S, z = state
    S = S + fk[..., :, None] * v[:, :, 0, None, :]  # rank-1 update (B, Hkv, F, Dv)
    z = z + fk
    y = (fq @ S) / ((fq @ z[..., None]) + eps)  # (B, Hkv, G, Dv)
    return y.reshape(B, H, 1, -1), (S, z)


# --- the decoding state (in place of a KV cache) ---------------------------------------------------
class LinearAttentionCache(nn.Module):
    """S (B, Hkv, F, Dv) and z (B, Hkv, F) of one layer: a constant size, whatever the length.

    It has no slots, so it cannot forget a token: a call starting at position 0 starts from an
    empty state (a new prompt), every other call continues from the stored one. Beam search's
    ``reorder`` works; rewinding (speculative decoding) cannot.
    """

    def __init__(self, batch: int, n_kv_head: int, n_features: int, head_dim: int, dtype=torch.float32, device=None):
        super().__init__()
        self.register_buffer("s", torch.zeros(batch, n_kv_head, n_features, head_dim, dtype=dtype, device=device), persistent=False)
        self.register_buffer("z", torch.zeros(batch, n_kv_head, n_features, dtype=dtype, device=device), persistent=False)
        self.register_buffer("next_pos", torch.zeros((), dtype=torch.long, device=device), persistent=False)

    def reorder(self, index: torch.Tensor) -> None:
        self.s.copy_(self.s[index])
        self.z.copy_(self.z[index])

    def attend(self, q, k, v, feature_map: FeatureMap, input_pos: torch.Tensor, key_valid=None, chunk: int = 64):
        """Outputs for the new tokens (B, H, t, Dv); the state moves past them."""
        if not torch.compiler.is_compiling():  # (a compiled decode step only ever continues)
            start, expected = int(input_pos[0]), int(self.next_pos)
            if start not in (0, expected):
                raise AttentionInputError(f"linear attention's state already holds positions up to {expected - 1} and cannot "
                                          f"go back to {start} (speculative decoding rewinds): decode without a draft model.")  # fmt: skip
        self.next_pos.copy_(input_pos[-1] + 1)
        fresh = (input_pos[0] == 0).to(self.s.dtype)  # a new prompt: forget the previous one (no sync)
        state = (self.s * (1 - fresh), self.z * (1 - fresh))
        if q.shape[2] == 1:
            y, (s, z) = linear_attention_step(q, k, v, feature_map, state, key_valid=key_valid)
        else:
            y, (s, z) = linear_attention(q, k, v, feature_map, key_valid=key_valid, state=state, chunk=chunk)
        self.s.copy_(s)
        self.z.copy_(z)
        return y


def layer_attention(attn, q, k, v, *, mask, cache, input_pos) -> torch.Tensor:
    """What ``Attention`` runs for ``attention="linear"`` (causal self-attention).

    The model's boolean mask is read for key padding only: the last query's row says which keys
    are real (a left-padded prompt's last token is real; with right padding, padded keys reach only
    padded queries, whose outputs are ignored)."""
    key_valid = None
    if mask is not None:
        last = mask[:, 0, -1]  # (B|1, Tk)
        key_valid = last[:, input_pos] if cache is not None else last
        key_valid = key_valid.expand(q.shape[0], -1)
    if cache is not None:
        return cache.attend(q, k, v, attn.feature_map, input_pos, key_valid, chunk=attn.linear_chunk)
    y, _ = linear_attention(q, k, v, attn.feature_map, key_valid=key_valid, chunk=attn.linear_chunk)
    return y


def check_options(options: dict | None) -> dict:
    """``ModelConfig.attention_options`` for linear attention, with defaults filled in."""
    options = dict(options or {})
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise AttentionInputError(f"unknown linear attention option(s) {', '.join(unknown)}; known: {', '.join(sorted(OPTIONS))}.")
    options.setdefault("feature_map", "elu")
    for name in ("n_features", "chunk"):
        value = options.get(name, 1)
        if not isinstance(value, int) or value < 1:
            raise AttentionInputError(f"linear attention's {name}={value!r} must be a positive whole number.")
    if options["feature_map"] not in FEATURE_MAPS:
        raise AttentionInputError(f"unknown linear-attention feature map {options['feature_map']!r}; choose one of {', '.join(FEATURE_MAPS)}.")
    return options
