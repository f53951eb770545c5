"""Training configuration: the ``TrainConfig`` dataclass and YAML recipes with overrides.

A recipe is a YAML file whose top-level keys are ``TrainConfig`` fields (nanoGPT's names where
nanoGPT has one) plus a ``model:`` section — a ``preset`` name and/or ``ModelConfig`` fields:

    model: {preset: nanogpt-char, n_layer: 4, n_head: 4, n_embd: 128}
    tokenizer: char
    max_iters: 2000
    learning_rate: 1e-3

Overrides (``--key=value`` or ``--key value``) reach any key of either kind; model keys go to the
model section. Values are converted to the field's type; an unknown key is an error that names
the closest known keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.config import ConfigError, ModelConfig
from lmforge.data.objectives import OBJECTIVES

DTYPES = ("auto", "float32", "bfloat16", "float16")
STRATEGIES = ("ddp", "fsdp")
LOADERS = ("random", "sequential")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class TrainConfig:
    # --- data and objective ------------------------------------------------------------------
    objective: str = "causal"  # causal | mlm | prefix | span
    tokenizer: str | None = None  # for a raw corpus: char | bpe:N | a tokenizer path
    val_fraction: float = 0.1  # raw corpus: the last 10% of the token stream is validation data
    field: str = "text"  # raw .jsonl corpus: the text field
    loader: str = "random"  # random windows (nanoGPT) | sequential windows (epochs)
    mlm_probability: float = 0.15
    noise_density: float = 0.15  # span corruption
    mean_noise_span_length: float = 3.0
    # causal / prefix objective: per-token loss weights from the corpus format (lmforge.data.objectives.answer_spans):
    answer_prefix: str | None = None  # text that introduces an answer, e.g. "What is the pass key? The pass key is "
    answer_end: str = "\n"  # the answer runs up to and including the next occurrence of this text
    answer_weight: float = 1.0  # loss weight of the answer tokens
    context_weight: float = 1.0  # loss weight of every other token (0: loss on the answers only)

    # --- batch ---------------------------------------------------------------------------------
    batch_size: int = 12  # sequences per micro-batch, per process
    block_size: int | None = None  # tokens per sequence; None: the model's max_seq_len
    gradient_accumulation_steps: int = 1  # micro-batches per update, over all processes together

    # --- optimisation --------------------------------------------------------------------------
    max_iters: int = 5000
    learning_rate: float = 6e-4
    weight_decay: float = 0.1  # decoupled (AdamW); never on norms, biases or embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping
    decay_lr: bool = True
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None: max_iters
    min_lr: float | None = None  # None: learning_rate / 10

    # --- evaluation, logging, checkpoints ------------------------------------------------------------
    eval_interval: int = 250  # 0: evaluate only at the end
    eval_iters: int = 200  # batches per evaluation
    log_interval: int = 10
    checkpoint_interval: int | None = None  # None: eval_interval (0 there: only at the end)
    keep_last: int = 2  # checkpoints kept
    progress: bool = True
    tensorboard: bool = True  # when tensorboard is installed

    # --- hardware and speed --------------------------------------------------------------------
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto: bfloat16 (or float16) autocast on CUDA, float32 elsewhere
    compile: bool = False
    activation_checkpointing: bool = False
    strategy: str = "ddp"  # under torchrun: ddp | fsdp
    context_parallel: int = 1  # under torchrun: N ranks share each sequence (ring attention, lmforge.parallel)
    init_from: str | None = None  # a model directory whose weights start a new run (e.g. a context extension)
    seed: int = 1337

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def one_of(name: str, allowed: tuple) -> None:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not supported; choose one of {', '.join(allowed)}.")

        one_of("objective", OBJECTIVES)
        one_of("loader", LOADERS)
        one_of("dtype", DTYPES)
        one_of("strategy", STRATEGIES)
        one_of("device", DEVICES)
        for name in ("batch_size", "gradient_accumulation_steps", "log_interval", "keep_last", "context_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("max_iters", "eval_interval", "eval_iters", "warmup_iters"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}.")
        if self.block_size is not None and self.block_size < 2:
            raise ConfigError(f"block_size must be at least 2, got {self.block_size}.")
        if self.checkpoint_interval is not None and self.checkpoint_interval < 0:
            raise ConfigError(f"checkpoint_interval must not be negative, got {self.checkpoint_interval}.")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}.")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.learning_rate:
            raise ConfigError(f"min_lr={self.min_lr} must lie between 0 and learning_rate={self.learning_rate}.")
        if self.lr_decay_iters is not None and self.lr_decay_iters < self.warmup_iters:
            raise ConfigError(f"lr_decay_iters={self.lr_decay_iters} must not be below warmup_iters={self.warmup_iters}.")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise ConfigError("weight_decay and grad_clip must not be negative, and eps must be positive.")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"beta1={self.beta1} and beta2={self.beta2} must lie in [0, 1).")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction} must lie strictly between 0 and 1.")
        if self.answer_weight <= 0 or self.context_weight < 0:
            raise ConfigError(f"answer_weight={self.answer_weight} must be positive and context_weight={self.context_weight} not negative.")
        if self.answer_prefix is None and (self.answer_weight != 1 or self.context_weight != 1):
            raise ConfigError("answer_weight and context_weight weigh the tokens after answer_prefix; set answer_prefix too.")
        if self.answer_prefix is not None:
            if not self.answer_prefix or not self.answer_end:
                raise ConfigError("answer_prefix and answer_end must not be empty texts.")
            if self.objective not in ("causal", "prefix"):
                raise ConfigError(f"answer_prefix weighs next-token labels: use objective causal or prefix, not {self.objective}.")
        if not 0 < self.mlm_probability < 1 or not 0 < self.noise_density < 1 or self.mean_noise_span_length < 1:
            raise ConfigError("mlm_probability and noise_density must lie in (0, 1), mean_noise_span_length at least 1.")

    # --- derived values ----------------------------------------------------------------------------
    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.max_iters

    @property
    def final_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else self.learning_rate / 10

    @property
    def save_interval(self) -> int:
        return self.checkpoint_interval if self.checkpoint_interval is not None else self.eval_interval

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in known:
                raise unknown_key(key, known)
        return cls(**{k: coerce(cls, k, v) for k, v in d.items()})

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig)) + ("preset",)
assert not set(TRAIN_KEYS) & set(MODEL_KEYS), "a key must belong to the training or the model config, not both"


def unknown_key(key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else "see `lmforge pretrain --help` for the known keys."
    return ConfigError(f"unknown config key {key!r}; {hint}")


# --- values --------------------------------------------------------------------------------------
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _parse_scalar(kind: str, value: Any, key: str) -> Any:
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE:
            return True
        if str(value).lower() in _FALSE:
            return False
        raise ValueError
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        return int(str(value).replace("_", ""))
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    if kind == "str":
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    if kind.startswith(("dict", "list")):
        value = yaml.safe_load(value) if isinstance(value, str) else value
        if not isinstance(value, (dict, list)):
            raise ValueError
        return value
    return value


def coerce(cls, key: str, value: Any) -> Any:
    """``value`` (from YAML or the command line) converted to the type of ``cls.key``."""
    annotation = {f.name: f.type for f in dataclasses.fields(cls)}[key]
    kinds = [k.strip() for k in str(annotation).split("|")]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
        if "None" in kinds:
            return None
        raise ConfigError(f"{key} cannot be empty; give it a value of type {annotation}.")
    for kind in (k for k in kinds if k != "None"):
        try:
            return _parse_scalar(kind, value, key)
        except (ValueError, TypeError, yaml.YAMLError):
            continue
    raise ConfigError(f"{key}={value!r} is not a valid {annotation}.")


# --- recipes -------------------------------------------------------------------------------------
@dataclass
class Recipe:
    """A training config plus the model section: a preset name and explicit ModelConfig values."""

    train: TrainConfig
    model: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["--max_iters=100", "--dropout", "0.1"]`` -> {"max_iters": "100", "dropout": "0.1"}."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; config overrides look like --key=value.")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value: write --{key}=VALUE.")
            value, i = args[i + 1], i + 1
        out[key.replace("-", "_")] = value
        i += 1
    return out


def split_keys(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training keys, model keys) of a flat dict; an unknown key is an error with close matches."""
    train, model = {}, {}
    for key, value in values.items():
        if key in TRAIN_KEYS:
            train[key] = value
        elif key in MODEL_KEYS:
            model[key] = value
        else:
            raise unknown_key(key, TRAIN_KEYS + MODEL_KEYS)
    return train, model


def coerce_model(values: dict[str, Any]) -> dict[str, Any]:
    """Model-section values converted to ModelConfig's field types (``preset`` stays a string)."""
    out = {}
    for key, value in values.items():
        if key == "preset":
            out[key] = str(value)
        elif key in MODEL_KEYS:
            out[key] = coerce(ModelConfig, key, value)
        else:
            raise unknown_key(key, MODEL_KEYS)
    return out


def read_yaml_recipe(path: str | os.PathLike | None, what: str = "recipe") -> dict[str, Any]:
    """A YAML file's mapping (empty without a file); a missing file or bad YAML is one sentence
    naming the line. Every verb's recipe (pretrain, sft, dpo, ...) and the CAI constitution are read
    here; ``what`` names the file in those sentences."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what} {path} is not valid YAML{where}.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path} must be a mapping of keys to values.")
    return raw


def load_recipe(path: str | os.PathLike | None = None, overrides: dict[str, Any] | list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or start from defaults when ``path`` is None) and apply overrides."""
    raw = read_yaml_recipe(path)
    model = raw.pop("model", None) or {}
    if not isinstance(model, dict):
        raise ConfigError("the recipe's model section must be a mapping (preset: ..., n_layer: ..., ...).")
    train, stray_model = split_keys(raw)  # model keys may also sit at the top level
    model = {**model, **stray_model}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    o_train, o_model = split_keys(overrides or {})
    return Recipe(train=TrainConfig.from_dict({**train, **o_train}), model=coerce_model({**model, **o_model}), path=path)
