"""Pictures: attention maps (PNG grid and a standalone HTML viewer) and a training dashboard.

Attention weights are read without touching the model's code: a forward hook on every
self-attention module recomputes ``softmax(Q Kᵀ · scale + bias, masked)`` from the same input the
module saw (its own projections, RoPE, mask, bias), and checks that these weights times V, through
the output projection, give the module's actual output (``AttentionMaps.max_error``). The model
runs its usual fast path (SDPA) meanwhile.

    maps = attention_maps(model, tokenizer, "The cat sat on the mat")
    maps.weights[layer]          # (H, T, T), each row sums to 1
    save_attention_png(maps, "attn.png"); save_attention_html(maps, "attn.html")
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import UserError
from lmforge.nn.attention import Attention, causal_mask
from lmforge.nn.positions import apply_rope
from lmforge.plots import save_figure


@dataclass
class AttentionMaps:
    tokens: list[str]  # the prompt's tokens as text
    weights: list[torch.Tensor]  # per layer: (H, T, T) attention probabilities of batch row 0
    max_error: float  # largest |recomputed output - module output| over all layers


def _recompute(module: Attention, x: torch.Tensor, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention weights (B, H, T, Tk), the output they give) for one self-attention call."""
    B, T, _ = x.shape
    q_dim, kv_dim = module.n_head * module.head_dim, module.n_kv_head * module.head_dim
    q, k, v = module.qkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
    q, k, v = module._heads(q, module.n_head), module._heads(k, module.n_kv_head), module._heads(v, module.n_kv_head)
    if kw.get("rope") is not None:
        q, k = apply_rope(q, *kw["rope"]), apply_rope(k, *kw["rope"])
    groups = module.n_head // module.n_kv_head
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, T, D)
    scale = module.scale if module.scale is not None else module.head_dim**-0.5
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, H, T, T)
    if kw.get("bias") is not None:
        scores = scores + kw["bias"].float()
    mask = kw.get("mask")
    if kw.get("is_causal"):
        mask = causal_mask(T, T, x.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    y = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(B, T, q_dim)
    return weights, module.o(y)


@torch.inference_mode()
def attention_maps(model, tokenizer, prompt: str) -> AttentionMaps:
    """Attention probabilities of every layer and head of a decoder (or encoder) for ``prompt``."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UserError("the prompt is empty once tokenized; give some text")
    if len(ids) > model.config.max_seq_len:
        raise UserError(f"the prompt has {len(ids)} tokens, more than the model's {model.config.max_seq_len}; shorten it")
    modules = [m for m in model.modules() if isinstance(m, Attention) and not m.cross]
    weights: list[torch.Tensor] = []
    errors: list[float] = []

    def hook(module, args, kwargs, output):
        if kwargs.get("cache") is not None:
            raise UserError("attention maps are read from a forward pass without a KV cache")
        w, y = _recompute(module, args[0], kwargs)
        weights.append(w[0].cpu())
        errors.append((y - output).abs().max().item())

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    try:
        model(torch.tensor([ids], device=model.device))
    finally:
        for h in handles:
            h.remove()
    tokens = [tokenizer.decode([i]) for i in ids]
    return AttentionMaps(tokens=tokens, weights=weights, max_error=max(errors))


def _label(t: str) -> str:
    return t.replace("\n", "\\n").replace(" ", "·") or "∅"


def save_attention_png(maps: AttentionMaps, path: str | os.PathLike, *, max_heads: int | None = None) -> Path:
    """A grid of heatmaps: one row per layer, one column per head (query down, key across)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = len(maps.weights)
    H = maps.weights[0].shape[0] if max_heads is None else min(max_heads, maps.weights[0].shape[0])
    T = len(maps.tokens)
    cell = 1.6 if T <= 16 else 2.2
    fig, axes = plt.subplots(L, H, figsize=(cell * H + 1, cell * L + 0.6), dpi=110, squeeze=False)
    labels = [_label(t) for t in maps.tokens]
    for l in range(L):
        for h in range(H):
            ax = axes[l][h]
            ax.imshow(maps.weights[l][h].numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if l == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"layer {l}", fontsize=8)
            if T <= 24 and l == L - 1:
                ax.set_xticks(range(T), labels, rotation=90, fontsize=5)
            if T <= 24 and h == 0:
                ax.set_yticks(range(T), labels, fontsize=5)
    fig.suptitle("attention (rows: queries, columns: keys)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_size_inches()[1]))  # room for the title
    return save_figure(fig, path)


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>attention: __TITLE__</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; }
#controls { margin-bottom: 10px; } select { margin-right: 12px; }
#tokens span { display: inline-block; padding: 2px 3px; margin: 1px; border-radius: 3px; cursor: pointer;
               white-space: pre; font-family: monospace; border: 1px solid #ddd; }
#tokens span.sel { outline: 2px solid #c00; }
canvas { border: 1px solid #ccc; image-rendering: pixelated; margin-top: 10px; }
#note { color: #666; font-size: 12px; }
</style></head><body>
<h3>Attention: __TITLE__</h3>
<div id="controls">layer <select id="layer"></select> head <select id="head"></select>
<span id="note">click a token: its row (what it attends to) shades the tokens</span></div>
<div id="tokens"></div>
<canvas id="map" width="480" height="480"></canvas>
<script>
const DATA = __DATA__;
const L = DATA.weights.length, H = DATA.weights[0].length, T = DATA.tokens.length;
const layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
for (let l = 0; l < L; l++) layerSel.add(new Option(String(l), l));
for (let h = 0; h < H; h++) headSel.add(new Option(String(h), h));
let query = T - 1;
function color(w) { const c = Math.round(255 * (1 - w)); return `rgb(${c},${c},255)`; }
function draw() {
  const W = DATA.weights[layerSel.value][headSel.value];
  const cv = document.getElementById("map"), ctx = cv.getContext("2d"), s = cv.width / T;
  for (let i = 0; i < T; i++) for (let j = 0; j < T; j++) {
    ctx.fillStyle = color(W[i][j]); ctx.fillRect(j * s, i * s, Math.ceil(s), Math.ceil(s));
  }
  ctx.strokeStyle = "#c00"; ctx.strokeRect(0, query * s, cv.width, s);
  const box = document.getElementById("tokens"); box.innerHTML = "";
  DATA.tokens.forEach((t, j) => {
    const span = document.createElement("span");
    span.textContent = t; span.title = `attention ${W[query][j].toFixed(3)}`;
    span.style.background = color(W[query][j]);
    if (j === query) span.className = "sel";
    span.onclick = () => { query = j; draw(); };
    box.appendChild(span);
  });
}
layerSel.onchange = headSel.onchange = draw;
draw();
</script></body></html>
"""


def save_attention_html(maps: AttentionMaps, path: str | os.PathLike, title: str = "") -> Path:
    """One self-contained HTML file (inline script and data, nothing fetched): pick a layer and head,
    see the map, click a token to shade the tokens by how much it attends to each."""
    data = {"tokens": maps.tokens, "weights": [[[[round(x, 4) for x in row] for row in head] for head in w.tolist()] for w in maps.weights]}
    text = _HTML.replace("__TITLE__", html.escape(title or "".join(maps.tokens)[:80]))
    text = text.replace("__DATA__", json.dumps(data).replace("</", "<\\/"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def attention_report(model_path, prompt: str, out_dir: str | os.PathLike) -> dict:
    """``lmforge viz attention``: PNG grid and HTML viewer of a prompt's attention into ``out_dir``."""
    from lmforge.checkpoints import load_model
    from lmforge.tokenizer import load_tokenizer

    model = load_model(model_path, dtype=torch.float32, quantize="none")
    maps = attention_maps(model, load_tokenizer(model_path), prompt)
    out = Path(out_dir)
    png, page = save_attention_png(maps, out / "attention.png"), save_attention_html(maps, out / "attention.html", prompt)
    return {"png": str(png), "html": str(page), "layers": len(maps.weights), "heads": maps.weights[0].shape[0],
            "tokens": len(maps.tokens), "max_error": maps.max_error}  # fmt: skip


# --- training dashboard -----------------------------------------------------------------------------------
def training_dashboard(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """``run_dir/dashboard.png`` from ``metrics.jsonl``: loss (train and validation), learning rate,
    throughput and validation perplexity against the step."""
    from lmforge.train.metrics import read_metrics

    records = read_metrics(run_dir)
    if not records:
        raise UserError(f"{run_dir} has no metrics.jsonl records; point at a run directory of `lmforge pretrain`")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        return [(r["step"], r[key]) for r in records if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]

    panels = [("loss", ["loss", "val_loss", "train_loss_eval"], "cross-entropy (nats/token)"), ("learning rate", ["lr"], "lr"),
              ("throughput", ["tok_s"], "tokens/s"), ("validation perplexity", ["val_ppl"], "perplexity")]  # fmt: skip
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=110)
    for ax, (title, keys, ylabel) in zip(axes.ravel(), panels):
        drawn = False
        for key in keys:
            pts = series(key)
            if pts:
                ax.plot(*zip(*pts), marker="o" if key.startswith("val") or key.endswith("eval") else None, markersize=3, label=key)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if drawn and len(keys) > 1:
            ax.legend(fontsize=8)
    val = series("val_loss")
    best = f", best val loss {min(v for _, v in val):.4f}" if val else ""
    fig.suptitle(f"{Path(run_dir).resolve().name}: {records[-1]['step']} steps{best}")
    fig.tight_layout()
    return save_figure(fig, Path(out) if out is not None else Path(run_dir) / "dashboard.png")
