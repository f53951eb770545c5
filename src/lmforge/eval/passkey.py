"""Long-context evaluation: passkey retrieval and loss by position, before and after a RoPE extension.

Passkey retrieval (Mohtashami & Jaggi 2023): a five-digit key is stated once at some depth of a
long text and asked for at its end; the model must copy it across the whole context.

    <filler> The pass key is 48213. Remember it. 48213 is the pass key. <filler>
    What is the pass key? The pass key is 48213.

The filler is real text (a slice of any corpus you give, e.g. Shakespeare), so the same generator
makes training data (``write_passkey_corpus``: samples of exactly ``length`` characters, which the
trainer's sequential loader reads one per window) and test prompts. A retrieval counts when the
model's argmax predicts all five digits given the prompt (teacher forcing, which is exactly greedy
decoding's success); chance is 10^-5.

Loss by position: the mean next-token NLL of plain filler text at each position of a window,
averaged over buckets of positions, shows where a model stops using its context (past its trained
window, an unextended RoPE model's loss rises).

    lmforge eval-passkey out/passkey-256 out/passkey-1024 --filler shakespeare.txt --lengths 256,512,1024
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmforge.errors import UserError
from lmforge.plots import save_figure

KEY_DIGITS = 5
CHANCE = 10.0**-KEY_DIGITS
_STATEMENT = " The pass key is {key}. Remember it. {key} is the pass key. "
_QUESTION = "\nWhat is the pass key? The pass key is "


# --- the generator --------------------------------------------------------------------------------
@dataclass
class PasskeySample:
    text: str  # the whole sample: prompt + key + ".\n" (exactly the requested length)
    prompt: str  # up to and including "The pass key is " of the question
    key: str
    depth: float  # where the statement starts, as a fraction of the filler


def filler_part(text: str, part: str) -> str:
    """The first 90% of ``text`` (``train``) or the last 10% (``test``): test prompts never reuse training filler."""
    cut = int(len(text) * 0.9)
    return text[:cut] if part == "train" else text[cut:]


def make_sample(filler: str, length: int, depth: float, rng: random.Random) -> PasskeySample:
    """One sample of exactly ``length`` characters with the statement at ``depth`` (0 = start, 1 = end)."""
    key = f"{rng.randrange(10**KEY_DIGITS):0{KEY_DIGITS}d}"
    statement = _STATEMENT.format(key=key)
    n_fill = length - len(statement) - len(_QUESTION) - KEY_DIGITS - 2
    if n_fill < 0:
        raise UserError(f"a passkey sample needs at least {length - n_fill} characters; ask for a longer length than {length}.")
    if len(filler) <= n_fill:
        raise UserError(f"the filler text has {len(filler)} characters, fewer than the {n_fill} one sample of {length} needs; give a longer text.")
    start = rng.randrange(len(filler) - n_fill)
    fill = filler[start : start + n_fill]
    at = round(depth * n_fill)
    prompt = fill[:at] + statement + fill[at:] + _QUESTION
    return PasskeySample(prompt + key + ".\n", prompt, key, depth)


def write_passkey_corpus(filler_path: str | Path, out: str | Path, *, length: int, samples: int, seed: int = 0) -> Path:
    """A training corpus: ``samples`` passkey samples of exactly ``length`` characters, back to back,
    depths uniform in [0, 1], filler from the first 90% of ``filler_path``. Written atomically."""
    text = filler_part(Path(filler_path).read_text(encoding="utf-8"), "train")
    rng = random.Random(seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for _ in range(samples):
            f.write(make_sample(text, length, rng.random(), rng).text)
    tmp.replace(out)
    return out


# --- the model at a longer context ----------------------------------------------------------------
def with_context(model, length: int):
    """``model`` able to run ``length`` positions: RoPE tables are rebuilt longer, keeping the model's
    own scaling (none for an unextended model: plain extrapolation). Learned positions cannot grow."""
    cfg = model.config
    if length <= cfg.max_seq_len:
        return model
    if cfg.position not in ("rope", "none", "alibi"):
        raise UserError(f"a model with {cfg.position} positions cannot run {length} tokens past its {cfg.max_seq_len}; evaluate lengths up to {cfg.max_seq_len}.")
    from lmforge.nn.positions import RotaryEmbedding

    longer = cfg.replace(max_seq_len=length)
    if cfg.position == "rope" and cfg.rope_scaling and cfg.rope_scaling.get("type") == "yarn":
        # YaRN's ramp is defined by the original window; keep it when only the table grows
        longer = cfg.replace(max_seq_len=length, rope_scaling={"original_max_position_embeddings": cfg.max_seq_len, **cfg.rope_scaling})
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.cfg = longer
            module.init_buffers()
            module.to(next(model.parameters()).device)
    model.config = longer
    return model


def _known_characters(text: str, tokenizer) -> str:
    """``text`` with characters a character-level vocabulary lacks replaced by spaces (other tokenizers: as is)."""
    from lmforge.tokenizer import CharTokenizer, TokenizerError

    if not isinstance(tokenizer, CharTokenizer):
        return text
    unknown = set()
    for c in set(text):
        try:
            tokenizer.encode(c, add_special_tokens=False)
        except TokenizerError:
            unknown.add(c)
    return "".join(" " if c in unknown else c for c in text) if unknown else text


# --- measurements ---------------------------------------------------------------------------------
@torch.inference_mode()
def passkey_accuracy(model, tokenizer, filler: str, length: int, depth: float, n: int, *, seed: int = 0,
                     batch_size: int = 8) -> float:  # fmt: skip
    """Fraction of ``n`` samples of ``length`` characters (statement at ``depth``) whose key the model retrieves."""
    rng = random.Random(seed * 1_000_003 + length * 1_009 + round(depth * 1000))  # one stream per cell
    samples = [make_sample(filler, length, depth, rng) for _ in range(n)]
    hits = 0
    device = next(model.parameters()).device
    for i in range(0, n, batch_size):
        chunk = samples[i : i + batch_size]
        ids = torch.tensor([tokenizer.encode(s.prompt + s.key, add_special_tokens=False) for s in chunk], device=device)
        logits = model(ids[:, :-1])[:, -KEY_DIGITS:]  # (B, 5, V): the predictions of the five digits
        hits += (logits.argmax(-1) == ids[:, -KEY_DIGITS:]).all(-1).sum().item()
    return hits / n


@torch.inference_mode()
def nll_by_position(model, ids: torch.Tensor, length: int, windows: int, *, seed: int = 0, batch_size: int = 4) -> torch.Tensor:
    """Mean next-token NLL (nats) at each position 1..length-1 of ``windows`` random windows of ``ids``: (length-1,)."""
    if ids.numel() <= length:
        raise UserError(f"the text has {ids.numel()} tokens, not more than one window of {length}; give a longer text.")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (windows,), generator=g)
    total = torch.zeros(length - 1, dtype=torch.float64)
    device = next(model.parameters()).device
    for i in range(0, windows, batch_size):
        batch = torch.stack([ids[s : s + length] for s in starts[i : i + batch_size].tolist()]).to(device)  # (B, L)
        logits = model(batch[:, :-1]).float()  # (B, L-1, V)
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # (B, L-1)
        total += nll.sum(0).double().cpu()
    return total / windows


def bucket_means(values: torch.Tensor, bucket: int) -> list[float]:
    """Means of consecutive groups of ``bucket`` values (the last group may be shorter)."""
    return [values[i : i + bucket].mean().item() for i in range(0, values.numel(), bucket)]


@dataclass
class PasskeyReport:
    model: str
    label: str
    lengths: list[int]
    depths: list[float]
    accuracy: dict[str, float]  # "length" -> accuracy over all depths
    by_depth: dict[str, list[float]]  # "length" -> accuracy at each depth
    bucket: int
    nll_buckets: list[float]  # mean NLL per bucket of positions, over windows of max(lengths)
    samples_per_cell: int
    chance: float = CHANCE
    trained_context: int | None = None
    rope_scaling: dict | None = None
    extra: dict = field(default_factory=dict)


def evaluate_passkey(model_path: str | Path, filler_path: str | Path, *, lengths: list[int], depths: list[float],
                     n: int = 20, bucket: int = 64, nll_windows: int = 16, seed: int = 0, label: str | None = None,
                     progress: bool = True) -> PasskeyReport:  # fmt: skip
    """Passkey accuracy at each length and depth, and NLL by position bucket, on the test part of the filler."""
    from lmforge.checkpoints import load_model
    from lmforge.tokenizer import load_tokenizer

    if not lengths or not depths:
        raise UserError("give at least one length and one depth to evaluate.")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise UserError(f"depths must lie between 0 and 1, got {depths}.")
    model = load_model(model_path)
    trained, scaling = model.config.max_seq_len, model.config.rope_scaling
    model = with_context(model, max(lengths))
    tokenizer = load_tokenizer(model_path)
    filler = _known_characters(filler_part(Path(filler_path).read_text(encoding="utf-8"), "test"), tokenizer)
    by_depth: dict[str, list[float]] = {}
    cells = [(L, d) for L in lengths for d in depths]
    bar = tqdm(cells, desc=f"passkey {label or Path(model_path).name}", unit="cell", disable=not progress)
    for L, d in bar:
        by_depth.setdefault(str(L), []).append(passkey_accuracy(model, tokenizer, filler, L, d, n, seed=seed))
    accuracy = {L: sum(v) / len(v) for L, v in by_depth.items()}
    ids = torch.tensor(tokenizer.encode(filler, add_special_tokens=False))
    nll = nll_by_position(model, ids, max(lengths), nll_windows, seed=seed)
    return PasskeyReport(
        model=str(model_path), label=label or Path(model_path).name, lengths=list(lengths), depths=list(depths),
        accuracy=accuracy, by_depth=by_depth, bucket=bucket, nll_buckets=bucket_means(nll, bucket),
        samples_per_cell=n, trained_context=trained, rope_scaling=scaling,
    )  # fmt: skip


def plot_passkey(reports: list[PasskeyReport], path: str | Path) -> Path:
    """Two panels: retrieval accuracy by length, and NLL by position bucket; one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in reports:
        left.plot(r.lengths, [r.accuracy[str(L)] for L in r.lengths], marker="o", label=r.label)
        x = [i * r.bucket + r.bucket / 2 for i in range(len(r.nll_buckets))]
        right.plot(x, r.nll_buckets, marker=".", label=r.label)
        if r.trained_context:
            right.axvline(r.trained_context, color="gray", linestyle=":", linewidth=1)
    left.axhline(CHANCE, color="gray", linestyle="--", linewidth=1, label="chance")
    left.set(xlabel="context length (tokens)", ylabel="passkey retrieval accuracy", ylim=(-0.03, 1.03), title="passkey retrieval")
    left.set_xscale("log", base=2)
    left.set_xticks(reports[0].lengths, [str(L) for L in reports[0].lengths])
    right.set(xlabel="position in window", ylabel="mean NLL (nats/token)", title="loss by position (dotted: trained window)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


# --- command line ---------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise UserError(f"{text!r} is not a comma-separated list of whole numbers (e.g. 256,512,1024).") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise UserError(f"{text!r} is not a comma-separated list of numbers (e.g. 0.1,0.5,0.9).") from None


def cmd_eval_passkey(args) -> None:
    reports = [
        evaluate_passkey(m, args.filler, lengths=_ints(args.lengths), depths=_floats(args.depths), n=args.n,
                         bucket=args.bucket, nll_windows=args.windows, seed=args.seed)  # fmt: skip
        for m in args.models
    ]
    for r in reports:
        cells = ", ".join(f"{L}: {r.accuracy[str(L)]:.0%}" for L in r.lengths)
        print(f"{r.label} (trained at {r.trained_context}, rope_scaling={r.rope_scaling}): passkey {cells}")
        print(f"  NLL by {r.bucket}-position bucket: " + " ".join(f"{v:.2f}" for v in r.nll_buckets))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in reports], indent=2))
    if args.png:
        print(f"plot: {plot_passkey(reports, args.png)}")


def cmd_passkey_corpus(args) -> None:
    out = write_passkey_corpus(args.filler, args.out, length=args.length, samples=args.samples, seed=args.seed)
    print(f"{args.samples} samples of {args.length} characters: {out}")


def add_parser(sub) -> None:
    s = sub.add_parser("eval-passkey", help="passkey retrieval by length and loss by position, for one or more models")
    s.add_argument("models", nargs="+", help="model directories (e.g. before and after a RoPE extension)")
    s.add_argument("--filler", required=True, help="a text file; its last 10%% fills the test prompts")
    s.add_argument("--lengths", default="256,512,1024", help="comma-separated sample lengths in tokens")
    s.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="comma-separated depths of the statement (0..1)")
    s.add_argument("-n", type=int, default=20, help="samples per length and depth")
    s.add_argument("--bucket", type=int, default=64, help="positions per NLL bucket")
    s.add_argument("--windows", type=int, default=16, help="windows of filler text for the NLL by position")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", help="write the reports as JSON here")
    s.add_argument("--png", help="write the plot (accuracy by length, NLL by position) here")
    s.set_defaults(func=cmd_eval_passkey)
    s = sub.add_parser("passkey-corpus", help="write a passkey training corpus (samples of exactly --length characters)")
    s.add_argument("--filler", required=True, help="a text file; its first 90%% fills the samples")
    s.add_argument("--length", type=int, required=True, help="characters per sample: the training block size")
    s.add_argument("--samples", type=int, default=4000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--out", required=True, help="the corpus file to write")
    s.set_defaults(func=cmd_passkey_corpus)
