"""How ``ModelConfig`` selects the long-context attentions, and what ``Attention`` calls for them.

    attn_impl="chunked"    exact softmax attention in tiles (nn/chunked.py): same model, O(T) memory
    attention="sparse"     a block-sparse pattern (nn/sparse.py): local / strided / fixed (+ global tokens)
    attention="linear"     kernel feature maps (nn/linear_attention.py): a constant-size decoding state

``attention_options`` carries the kind's settings, e.g. ``{"pattern": "local", "window": 512}`` or
``{"feature_map": "favor", "n_features": 64}``. Cross-attention always stays softmax.
"""

from __future__ import annotations

import torch

from lmforge.nn.linear_attention import FeatureMap, LinearAttentionCache, check_options
from lmforge.nn.linear_attention import layer_attention as linear_layer_attention
from lmforge.nn.sparse import SparsePattern, sparse_attention, sparse_mask


def check_config(cfg) -> None:
    """Raise ConfigError (one sentence) for switches the chosen attention cannot honour."""
    from lmforge.config import ConfigError

    def refuse(message: str):
        raise ConfigError(message)

    special = cfg.attention != "softmax"
    what = f"attention={cfg.attention!r}" if special else "attn_impl='chunked'"
    if cfg.attention == "softmax" and cfg.attention_options:
        refuse("attention_options apply to attention='sparse' or 'linear'; remove them or choose one of those.")
    if cfg.position in ("t5", "alibi") and (special or cfg.attn_impl == "chunked"):
        refuse(f"{what} cannot add the {cfg.position} position bias to its scores; use rope, learned, sinusoidal or none.")
    if cfg.attn_dropout > 0 and (special or cfg.attn_impl == "chunked"):
        refuse(f"{what} has no attention-weight dropout; set attn_dropout=0.")
    if not special:
        return
    if cfg.arch != "decoder":
        refuse(f"{what} is built for causal decoder models; use arch='decoder' or attention='softmax'.")
    if cfg.sliding_window is not None:
        refuse(f"{what} replaces sliding_window; remove sliding_window (the sparse 'local' pattern has a window).")
    try:
        if cfg.attention == "sparse":
            SparsePattern.from_options(cfg.attention_options)
        else:
            check_options(cfg.attention_options)
    except ValueError as e:
        refuse(str(e))


def setup(attn, cfg) -> None:
    """Give an ``Attention`` module what its kind needs (a feature map, a pattern)."""
    options = dict(cfg.attention_options or {})
    if attn.kind == "linear":
        options = check_options(options)
        attn.linear_chunk = options.get("chunk", 64)
        attn.feature_map = FeatureMap(options["feature_map"], cfg.head_dim, options.get("n_features"), options.get("seed", 0))
    elif attn.kind == "sparse":
        attn.pattern = SparsePattern.from_options(options)


def new_cache(attn, batch: int, max_len: int, dtype, device):
    """The decoding memory of one layer: a KV cache, or linear attention's constant-size state."""
    if attn.kind == "linear":
        fm = attn.feature_map
        return LinearAttentionCache(batch, attn.n_kv_head, fm.n_features, attn.head_dim, dtype=dtype, device=device)
    from lmforge.nn.kv_cache import KVCache

    return KVCache(batch, attn.n_kv_head, max_len, attn.head_dim, dtype=dtype, device=device)


def attend_kind(attn, q, k, v, *, mask, is_causal, cache, input_pos) -> torch.Tensor:
    """Self-attention of a sparse or linear layer, (B, H, T, D). q, k, v already carry RoPE."""
    if attn.kind == "linear":
        return linear_layer_attention(attn, q, k, v, mask=mask, cache=cache, input_pos=input_pos)
    from lmforge.nn.attention import attend

    pat: SparsePattern = attn.pattern
    T = q.shape[2]
    if cache is None and mask is None and is_causal and T > _dense_below(pat):
        return sparse_attention(q, k, v, pat, scale=attn.scale)  # training: the block-sparse path
    # decoding, padding, or a sequence the pattern does not thin out: the same pattern as a dense mask
    if cache is not None:
        k, v = cache.update(input_pos, k, v, None if mask is None else mask.shape[-1])
    q_pos = input_pos if input_pos is not None else torch.arange(T, device=q.device)
    allowed = sparse_mask(pat, k.shape[2], device=q.device)[:, :, q_pos]  # (1, 1, T, Tk)
    if mask is not None:
        allowed = allowed & mask
    elif not is_causal:
        raise ValueError("a sparse layer needs a causal mask")
    return attend(q, k, v, mask=allowed, scale=attn.scale, impl=attn.impl)


def _dense_below(pat: SparsePattern) -> int:
    """Sequences up to this length see (almost) everything through the pattern: dense is cheaper."""
    return pat.window if pat.pattern == "local" else pat.stride
