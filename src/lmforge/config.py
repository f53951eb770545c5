"""One configuration for every transformer family.

A family (GPT-2, LLaMA, BERT, T5, the original Transformer, ...) is not a class here but a
preset of switches on :class:`ModelConfig`: where the positions come from, which norm and
where it sits, the feed-forward kind, how many KV heads, biases, tied embeddings.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from lmforge.errors import UserError

ARCHS = ("decoder", "encoder", "encoder-decoder")
POSITIONS = ("learned", "sinusoidal", "rope", "t5", "alibi", "none")
NORMS = ("layernorm", "rmsnorm")
PLACEMENTS = ("pre", "post")
FFNS = ("mlp", "glu")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
ROPE_TYPES = ("default", "linear", "ntk", "yarn", "llama3")
ATTN_IMPLS = ("sdpa", "reference", "chunked")
ATTENTIONS = ("softmax", "sparse", "linear")
HEADS = (None, "mlm", "seq_cls", "token_cls")


_FIELD_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "None": (type(None),)}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "dict": "an object", "None": "null"}


class ConfigError(UserError, ValueError):
    """A configuration that cannot describe a working model; the message says how to fix it."""


@dataclass
class ModelConfig:
    # --- what kind of model -------------------------------------------------------------
    arch: str = "decoder"  # decoder | encoder | encoder-decoder
    family: str = "gpt2"  # checkpoint family for export: gpt2, llama, mistral, qwen2, bert, t5, lmforge
    name: str | None = None

    # --- sizes -----------------------------------------------------------------------------
    vocab_size: int = 50257
    n_layer: int = 12  # encoder layers for encoder-decoder models
    n_decoder_layer: int | None = None  # decoder layers (encoder-decoder); None: same as n_layer
    n_embd: int = 768
    n_head: int = 12
    n_kv_head: int | None = None  # None: n_head (MHA); 1: MQA; else GQA
    head_dim: int | None = None  # None: n_embd // n_head
    d_ff: int | None = None  # None: 4 * n_embd
    max_seq_len: int = 1024  # context length (also the size of learned position tables)

    # --- blocks ----------------------------------------------------------------------------
    ffn: str = "mlp"  # mlp: act(x W1) W2 | glu: (act(x Wg) * x Wu) W2  (SwiGLU, GeGLU)
    activation: str = "gelu_tanh"
    norm: str = "layernorm"
    norm_placement: str = "pre"  # pre: x + f(norm(x)) | post: norm(x + f(x))
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm bias (ignored by RMSNorm)
    final_norm: bool = True  # norm after the last block (pre-norm models)
    embedding_norm: bool = False  # norm right after the embeddings (BERT)

    # --- positions -------------------------------------------------------------------------
    position: str = "learned"  # learned | sinusoidal | rope | t5 | alibi | none
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": linear|ntk|yarn|llama3, "factor": ..., ...}
    rotary_dim: int | None = None  # None: the whole head dim
    t5_num_buckets: int = 32
    t5_max_distance: int = 128
    type_vocab_size: int = 0  # BERT token-type embeddings (0: none)

    # --- attention -------------------------------------------------------------------------
    attn_impl: str = "sdpa"  # sdpa (fast) | reference (textbook formula) | chunked (online softmax, O(T) memory)
    attention: str = "softmax"  # softmax | sparse (block-sparse pattern) | linear (kernel feature maps)
    attention_options: dict[str, Any] | None = None  # sparse: pattern, window, ...; linear: feature_map, ...
    attn_scale: float | None = None  # None: 1/sqrt(head_dim); T5 uses 1.0
    sliding_window: int | None = None  # attend to at most this many past positions

    # --- biases, embeddings ----------------------------------------------------------------
    qkv_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    lm_head_bias: bool = False
    tie_embeddings: bool = True
    embed_scale: float | None = None  # multiply token embeddings (sqrt(d) in the 2017 Transformer)
    logit_scale: float | None = None  # multiply hidden before a tied head (T5: d**-0.5)

    # --- regularisation ----------------------------------------------------------------------
    dropout: float = 0.0
    attn_dropout: float = 0.0

    # --- encoder heads -----------------------------------------------------------------------
    head: str | None = None  # encoders: None | mlm | seq_cls | token_cls
    pooler: bool = False  # BERT pooler (dense + tanh on the first token)
    pooling: str = "mean"  # sentence embedding pooling: mean | cls
    num_labels: int = 2

    # --- special tokens --------------------------------------------------------------------
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None  # encoder-decoder generation starts here

    init_std: float = 0.02

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self._check_types()
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_head > 0 and self.n_embd % self.n_head != 0:
                raise ConfigError(
                    f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                    f"choose n_embd as a multiple of n_head, or set head_dim explicitly."
                )
            self.head_dim = self.n_embd // max(self.n_head, 1)
        if self.d_ff is None:
            self.d_ff = 4 * self.n_embd
        if self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        self.validate()

    def _check_types(self) -> None:
        """Every field holds a value of its declared type (a config.json may say "64" or null)."""
        for f in dataclasses.fields(self):
            names = [n.strip().split("[")[0] for n in str(f.type).split("|")]
            if not all(n in _FIELD_TYPES for n in names):
                continue
            value = getattr(self, f.name)
            allowed = tuple(t for n in names for t in _FIELD_TYPES[n])
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                kinds = " or ".join(_TYPE_WORDS[n] for n in names)
                raise ConfigError(f"{f.name} must be {kinds}, got {value!r} ({type(value).__name__}).")

    def validate(self) -> None:
        def one_of(name: str, allowed: tuple) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is not supported; choose one of {', '.join(map(str, allowed))}.")

        one_of("arch", ARCHS)
        one_of("position", POSITIONS)
        one_of("norm", NORMS)
        one_of("norm_placement", PLACEMENTS)
        one_of("ffn", FFNS)
        one_of("activation", ACTIVATIONS)
        one_of("attn_impl", ATTN_IMPLS)
        one_of("attention", ATTENTIONS)
        if self.attn_impl == "chunked" or self.attention != "softmax" or self.attention_options:
            from lmforge.nn.long_context import check_config

            check_config(self)
        one_of("head", HEADS)
        for name in ("vocab_size", "n_embd", "n_head", "n_kv_head", "head_dim", "d_ff", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.n_layer < 0 or self.n_decoder_layer < 0:
            raise ConfigError("n_layer and n_decoder_layer must not be negative.")
        if self.n_head % self.n_kv_head != 0:
            raise ConfigError(
                f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}: "
                "each KV head must serve the same number of query heads."
            )
        if self.position == "rope":
            rd = self.rotary_dim or self.head_dim
            if rd % 2 or rd > self.head_dim:
                raise ConfigError(f"rotary_dim={rd} must be even and at most head_dim={self.head_dim}.")
            if self.rope_scaling is not None:
                kind = self.rope_scaling.get("type", "default")
                if kind == "dynamic":
                    raise ConfigError(
                        "rope_scaling type 'dynamic' rescales the frequencies as the sequence grows, which keys already "
                        "in a KV cache cannot follow: use 'ntk' (the same NTK-aware scaling, fixed) or 'yarn'."
                    )
                if kind not in ROPE_TYPES:
                    raise ConfigError(f"rope_scaling type {kind!r} is not supported; choose one of {', '.join(ROPE_TYPES)}.")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.attn_dropout < 1.0:
            raise ConfigError("dropout and attn_dropout must lie in [0, 1).")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError("sliding_window must be a positive number of positions, or None.")
        if self.pooling not in ("mean", "cls"):
            raise ConfigError(f"pooling={self.pooling!r} is not supported; choose mean or cls.")

    # ------------------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else 1.0 / math.sqrt(self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig key(s): {', '.join(unknown)}. Known keys: {', '.join(sorted(known))}.")
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}.")
        return cls.from_dict({**PRESETS[name], "name": name, **overrides})


# ------------------------------------------------------------------------------------------------
# Family switches, then named presets (sizes from the published configs).

GPT2 = dict(
    arch="decoder", family="gpt2", position="learned", norm="layernorm", norm_placement="pre",
    ffn="mlp", activation="gelu_tanh", qkv_bias=True, attn_out_bias=True, mlp_bias=True,
    tie_embeddings=True, vocab_size=50257, max_seq_len=1024, bos_token_id=50256, eos_token_id=50256,
)
LLAMA = dict(
    arch="decoder", family="llama", position="rope", norm="rmsnorm", norm_placement="pre",
    ffn="glu", activation="silu", qkv_bias=False, attn_out_bias=False, mlp_bias=False, norm_bias=False,
)
BERT = dict(
    arch="encoder", family="bert", position="learned", norm="layernorm", norm_placement="post",
    final_norm=False, embedding_norm=True, ffn="mlp", activation="gelu", norm_eps=1e-12,
    type_vocab_size=2, pooler=True, vocab_size=30522, max_seq_len=512, pad_token_id=0,
)
T5 = dict(
    arch="encoder-decoder", family="t5", position="t5", norm="rmsnorm", norm_placement="pre",
    norm_eps=1e-6, ffn="mlp", activation="relu", qkv_bias=False, attn_out_bias=False,
    mlp_bias=False, norm_bias=False, attn_scale=1.0, tie_embeddings=True, vocab_size=32128,
    max_seq_len=512, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": {**GPT2, "n_layer": 12, "n_embd": 768, "n_head": 12},
    "gpt2-medium": {**GPT2, "n_layer": 24, "n_embd": 1024, "n_head": 16},
    "smollm2-135m": {
        **LLAMA, "vocab_size": 49152, "n_layer": 30, "n_embd": 576, "n_head": 9, "n_kv_head": 3,
        "d_ff": 1536, "max_seq_len": 8192, "rope_theta": 100000.0, "tie_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    },
    "llama-3.2-1b": {
        **LLAMA, "vocab_size": 128256, "n_layer": 16, "n_embd": 2048, "n_head": 32, "n_kv_head": 8,
        "d_ff": 8192, "max_seq_len": 131072, "rope_theta": 500000.0, "tie_embeddings": True,
        "rope_scaling": {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "qwen2-0.5b": {
        **LLAMA, "family": "qwen2", "qkv_bias": True, "vocab_size": 151936, "n_layer": 24, "n_embd": 896,
        "n_head": 14, "n_kv_head": 2, "d_ff": 4864, "max_seq_len": 32768, "rope_theta": 1000000.0,
        "norm_eps": 1e-6, "tie_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151643,
    },
    "mistral-7b": {
        **LLAMA, "family": "mistral", "vocab_size": 32000, "n_layer": 32, "n_embd": 4096, "n_head": 32,
        "n_kv_head": 8, "d_ff": 14336, "max_seq_len": 32768, "rope_theta": 10000.0,
        "sliding_window": 4096, "tie_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    },
    "bert-base": {**BERT, "n_layer": 12, "n_embd": 768, "n_head": 12, "d_ff": 3072},
    "minilm-l6": {**BERT, "n_layer": 6, "n_embd": 384, "n_head": 12, "d_ff": 1536},
    "t5-small": {**T5, "n_layer": 6, "n_embd": 512, "n_head": 8, "head_dim": 64, "d_ff": 2048},
    # Vaswani et al. 2017, "base": post-norm, sinusoidal positions, ReLU, shared embeddings x sqrt(d).
    "transformer-base": {
        "arch": "encoder-decoder", "family": "lmforge", "position": "sinusoidal", "norm": "layernorm",
        "norm_placement": "post", "final_norm": False, "ffn": "mlp", "activation": "relu",
        "n_layer": 6, "n_embd": 512, "n_head": 8, "d_ff": 2048, "vocab_size": 37000,
        "max_seq_len": 1024, "dropout": 0.1, "tie_embeddings": True, "embed_scale": math.sqrt(512),
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
    },
    # nanoGPT's Shakespeare-char model (GPT-2 switches, a character vocabulary).
    "nanogpt-char": {**GPT2, "vocab_size": 65, "n_layer": 6, "n_embd": 384, "n_head": 6,
                     "max_seq_len": 256, "dropout": 0.2, "bos_token_id": None, "eos_token_id": None},
}
