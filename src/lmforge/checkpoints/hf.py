"""Hugging Face checkpoints: config.json translation and tensor-name maps for each family.

Each family has three small functions: ``*_config`` (HF config.json -> ModelConfig), ``*_hf_config``
(ModelConfig -> HF config.json) and ``*_names`` (our tensor name -> the HF tensor(s) it is made
of). A list of several HF tensors means they are concatenated along dim 0 (our fused QKV and
gate/up projections); ``transpose`` marks GPT-2's Conv1D matrices, stored (in, out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lmforge.config import PRESETS, ConfigError, ModelConfig


@dataclass
class Source:
    names: list[str]  # HF tensors, concatenated along dim 0 when several
    transpose: bool = False


# --- RoPE parameters (both the older rope_theta/rope_scaling and the newer rope_parameters) ------
_ROPE_FROM_HF = {"default": None, "linear": "linear", "yarn": "yarn", "llama3": "llama3"}


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict | None]:
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = params or legacy
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    if kind not in _ROPE_FROM_HF:
        raise ConfigError(f"RoPE scaling {kind!r} in config.json is not supported; supported: {', '.join(_ROPE_FROM_HF)}.")
    if _ROPE_FROM_HF[kind] is None:
        return theta, None
    return theta, {"type": kind, **scaling}


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        s = dict(cfg.rope_scaling)
        kind = s.pop("type")
        if kind not in _ROPE_FROM_HF:
            raise ConfigError(f"RoPE scaling {kind!r} has no Hugging Face equivalent.")
        params = {"rope_type": kind, "rope_theta": cfg.rope_theta, **s}
    return {"rope_parameters": params}


def _preset(preset: str, hf: dict, **values: Any) -> ModelConfig:
    """The family's switches from a preset, the sizes from config.json."""
    return ModelConfig.from_dict({**PRESETS[preset], "name": hf.get("_name_or_path") or None, **values})


def _eos(hf: dict, default=None):
    return hf.get("eos_token_id", default)


# --- GPT-2 ------------------------------------------------------------------------------------------
_GPT2_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def gpt2_config(hf: dict) -> ModelConfig:
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise ConfigError("GPT-2 variants with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are not supported.")
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTS:
        raise ConfigError(f"GPT-2 activation {act!r} is not supported; supported: {', '.join(_GPT2_ACTS)}.")
    return _preset(
        "gpt2", hf, vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_embd=hf["n_embd"], n_head=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * hf["n_embd"], max_seq_len=hf.get("n_positions", 1024),
        activation=_GPT2_ACTS[act], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
        dropout=hf.get("resid_pdrop", 0.0), attn_dropout=hf.get("attn_pdrop", 0.0),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=_eos(hf), tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def gpt2_fits(cfg: ModelConfig) -> str | None:
    want = dict(arch="decoder", position="learned", norm="layernorm", norm_placement="pre", ffn="mlp",
                qkv_bias=True, attn_out_bias=True, mlp_bias=True, lm_head_bias=False, embedding_norm=False,
                final_norm=True, type_vocab_size=0, embed_scale=None, sliding_window=None)
    return _mismatch(cfg, want) or (None if cfg.n_kv_head == cfg.n_head and cfg.head_dim * cfg.n_head == cfg.n_embd
                                     else "GPT-2 has no GQA and head_dim = n_embd / n_head")


def gpt2_hf_config(cfg: ModelConfig) -> dict:
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}[cfg.activation]
    return dict(
        architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len,
        n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_ff, activation_function=act,
        layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.attn_dropout,
        scale_attn_weights=cfg.attn_scale is None, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
    )


def gpt2_names(cfg: ModelConfig) -> dict[str, Source]:
    m = {"embed.tok.weight": Source(["transformer.wte.weight"]), "embed.pos.weight": Source(["transformer.wpe.weight"]),
         "stack.norm.weight": Source(["transformer.ln_f.weight"]), "stack.norm.bias": Source(["transformer.ln_f.bias"]),
         "lm_head.weight": Source(["lm_head.weight"])}
    for i in range(cfg.n_layer):
        o, t = f"stack.layers.{i}.", f"transformer.h.{i}."
        for ours, theirs, tr in [("attn_norm", "ln_1", False), ("attn.qkv", "attn.c_attn", True), ("attn.o", "attn.c_proj", True),
                                 ("mlp_norm", "ln_2", False), ("mlp.up", "mlp.c_fc", True), ("mlp.down", "mlp.c_proj", True)]:
            m[o + ours + ".weight"] = Source([t + theirs + ".weight"], transpose=tr)
            m[o + ours + ".bias"] = Source([t + theirs + ".bias"])
    return m


# --- LLaMA / Mistral / Qwen2 (SmolLM) ------------------------------------------------------------
_LLAMA_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def llama_config(hf: dict) -> ModelConfig:
    family = hf.get("model_type", "llama")
    theta, scaling = _rope_from_hf(hf)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{family} with hidden_act={act!r} is not supported (silu only).")
    window = hf.get("sliding_window") if family == "mistral" else None
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise ConfigError("Qwen2 with use_sliding_window=true (per-layer windows) is not supported.")
    n_head = hf["num_attention_heads"]
    return _preset(
        "smollm2-135m", hf, family=family, vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"],
        n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head, d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, sliding_window=window,
        qkv_bias=hf.get("attention_bias", family == "qwen2"), attn_out_bias=hf.get("attention_bias", False) and family != "qwen2",
        mlp_bias=hf.get("mlp_bias", False), tie_embeddings=hf.get("tie_word_embeddings", False),
        attn_dropout=hf.get("attention_dropout", 0.0),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=_eos(hf), pad_token_id=hf.get("pad_token_id"),
    )


def llama_fits(cfg: ModelConfig) -> str | None:
    want = dict(arch="decoder", position="rope", norm="rmsnorm", norm_placement="pre", ffn="glu", activation="silu",
                lm_head_bias=False, embedding_norm=False, final_norm=True, type_vocab_size=0, embed_scale=None,
                rotary_dim=None)
    reason = _mismatch(cfg, want)
    if reason:
        return reason
    if cfg.rope_scaling and cfg.rope_scaling.get("type") not in _ROPE_FROM_HF:
        return f"RoPE scaling {cfg.rope_scaling.get('type')!r} has no Hugging Face equivalent"
    if cfg.family == "qwen2" and (not cfg.qkv_bias or cfg.attn_out_bias or cfg.sliding_window):
        return "Qwen2 has biases on Q, K, V only and no sliding window"
    if cfg.family in ("llama", "mistral") and cfg.qkv_bias != cfg.attn_out_bias:
        return "LLaMA/Mistral use one attention_bias switch for Q, K, V and O"
    if cfg.family == "llama" and cfg.sliding_window:
        return "LLaMA has no sliding window (use family mistral)"
    return None


def llama_hf_config(cfg: ModelConfig) -> dict:
    d = dict(
        architectures=[_LLAMA_TYPES[cfg.family]], model_type=cfg.family, vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=cfg.attn_dropout, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, **_rope_to_hf(cfg),
    )
    if cfg.family == "mistral":
        d["sliding_window"] = cfg.sliding_window
    elif cfg.family == "llama":
        d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    return d


def llama_names(cfg: ModelConfig) -> dict[str, Source]:
    m = {"embed.tok.weight": Source(["model.embed_tokens.weight"]), "stack.norm.weight": Source(["model.norm.weight"]),
         "lm_head.weight": Source(["lm_head.weight"])}
    for i in range(cfg.n_layer):
        o, t = f"stack.layers.{i}.", f"model.layers.{i}."
        m[o + "attn_norm.weight"] = Source([t + "input_layernorm.weight"])
        m[o + "mlp_norm.weight"] = Source([t + "post_attention_layernorm.weight"])
        for kind in ("weight", "bias"):
            m[o + f"attn.qkv.{kind}"] = Source([t + f"self_attn.{p}_proj.{kind}" for p in "qkv"])
            m[o + f"attn.o.{kind}"] = Source([t + f"self_attn.o_proj.{kind}"])
            m[o + f"mlp.up.{kind}"] = Source([t + f"mlp.{p}_proj.{kind}" for p in ("gate", "up")])
            m[o + f"mlp.down.{kind}"] = Source([t + f"mlp.down_proj.{kind}"])
    return m


# --- BERT (MiniLM) -----------------------------------------------------------------------------------
_BERT_HEADS = {"BertModel": None, "BertForMaskedLM": "mlm", "BertForSequenceClassification": "seq_cls",
               "BertForTokenClassification": "token_cls"}


def bert_config(hf: dict) -> ModelConfig:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"BERT with position_embedding_type={hf['position_embedding_type']!r} is not supported (absolute only).")
    arch = (hf.get("architectures") or ["BertModel"])[0]
    if arch not in _BERT_HEADS:
        raise ConfigError(f"BERT architecture {arch!r} is not supported; supported: {', '.join(_BERT_HEADS)}.")
    act = hf.get("hidden_act", "gelu")
    return _preset(
        "bert-base", hf,
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"],
        n_head=hf["num_attention_heads"], d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 512),
        activation=_GPT2_ACTS.get(act, act), norm_eps=hf.get("layer_norm_eps", 1e-12),
        type_vocab_size=hf.get("type_vocab_size", 2), dropout=hf.get("hidden_dropout_prob", 0.0),
        attn_dropout=hf.get("attention_probs_dropout_prob", 0.0), pad_token_id=hf.get("pad_token_id", 0),
        head=_BERT_HEADS[arch], pooler=_BERT_HEADS[arch] in (None, "seq_cls"),
        num_labels=len(hf.get("id2label") or {0: 0, 1: 1}),
    )


def bert_fits(cfg: ModelConfig) -> str | None:
    want = dict(arch="encoder", position="learned", norm="layernorm", norm_placement="post", ffn="mlp",
                qkv_bias=True, attn_out_bias=True, mlp_bias=True, embedding_norm=True, final_norm=False,
                embed_scale=None, sliding_window=None, tie_embeddings=True, pooler=cfg.head in (None, "seq_cls"))
    return _mismatch(cfg, want)


def bert_hf_config(cfg: ModelConfig) -> dict:
    arch = {v: k for k, v in _BERT_HEADS.items()}[cfg.head]
    return dict(
        architectures=[arch], model_type="bert", vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff,
        hidden_act={"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation), hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attn_dropout, max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps, pad_token_id=cfg.pad_token_id,
        position_embedding_type="absolute", id2label={str(i): f"LABEL_{i}" for i in range(cfg.num_labels)},
    )


def bert_names(cfg: ModelConfig) -> dict[str, Source]:
    b = "bert."
    m = {"embed.tok.weight": Source([b + "embeddings.word_embeddings.weight"]),
         "embed.pos.weight": Source([b + "embeddings.position_embeddings.weight"]),
         "embed.token_type.weight": Source([b + "embeddings.token_type_embeddings.weight"]),
         "embed.norm.weight": Source([b + "embeddings.LayerNorm.weight"]),
         "embed.norm.bias": Source([b + "embeddings.LayerNorm.bias"]),
         "pooler.weight": Source([b + "pooler.dense.weight"]), "pooler.bias": Source([b + "pooler.dense.bias"]),
         "mlm.dense.weight": Source(["cls.predictions.transform.dense.weight"]),
         "mlm.dense.bias": Source(["cls.predictions.transform.dense.bias"]),
         "mlm.norm.weight": Source(["cls.predictions.transform.LayerNorm.weight"]),
         "mlm.norm.bias": Source(["cls.predictions.transform.LayerNorm.bias"]),
         "mlm.decoder.weight": Source(["cls.predictions.decoder.weight"]),
         "mlm.decoder.bias": Source(["cls.predictions.bias"]),
         "classifier.weight": Source(["classifier.weight"]), "classifier.bias": Source(["classifier.bias"])}
    for i in range(cfg.n_layer):
        o, t = f"stack.layers.{i}.", f"{b}encoder.layer.{i}."
        for kind in ("weight", "bias"):
            m[o + f"attn.qkv.{kind}"] = Source([t + f"attention.self.{p}.{kind}" for p in ("query", "key", "value")])
            m[o + f"attn.o.{kind}"] = Source([t + f"attention.output.dense.{kind}"])
            m[o + f"attn_norm.{kind}"] = Source([t + f"attention.output.LayerNorm.{kind}"])
            m[o + f"mlp.up.{kind}"] = Source([t + f"intermediate.dense.{kind}"])
            m[o + f"mlp.down.{kind}"] = Source([t + f"output.dense.{kind}"])
            m[o + f"mlp_norm.{kind}"] = Source([t + f"output.LayerNorm.{kind}"])
    return m


# --- T5 (v1.0 and v1.1 / flan gated) ---------------------------------------------------------------
def t5_config(hf: dict) -> ModelConfig:
    proj = hf.get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    act = proj.split("-")[-1]
    act = {"gelu": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu", "silu": "silu"}.get(act)
    if act is None:
        raise ConfigError(f"T5 feed_forward_proj={proj!r} is not supported (relu, gated-gelu, gated-silu).")
    # v1.0 ties the head and scales the decoder output by d**-0.5; v1.1/flan has its own head and no
    # scale. transformers v5 always ties and records the scale separately (scale_decoder_outputs).
    tied = hf.get("tie_word_embeddings", True)
    d = hf["d_model"]
    return _preset(
        "t5-small", hf,
        vocab_size=hf["vocab_size"], n_layer=hf["num_layers"], n_decoder_layer=hf.get("num_decoder_layers") or hf["num_layers"],
        n_embd=d, n_head=hf["num_heads"], head_dim=hf["d_kv"], d_ff=hf["d_ff"], ffn="glu" if gated else "mlp",
        activation=act, norm_eps=hf.get("layer_norm_epsilon", 1e-6), dropout=hf.get("dropout_rate", 0.0),
        t5_num_buckets=hf.get("relative_attention_num_buckets", 32), t5_max_distance=hf.get("relative_attention_max_distance", 128),
        tie_embeddings=tied, logit_scale=d**-0.5 if hf.get("scale_decoder_outputs", tied) else None, pad_token_id=hf.get("pad_token_id", 0),
        eos_token_id=_eos(hf, 1), decoder_start_token_id=hf.get("decoder_start_token_id", 0),
    )


def t5_fits(cfg: ModelConfig) -> str | None:
    want = dict(arch="encoder-decoder", position="t5", norm="rmsnorm", norm_placement="pre", qkv_bias=False,
                attn_out_bias=False, mlp_bias=False, lm_head_bias=False, attn_scale=1.0, embed_scale=None,
                final_norm=True, embedding_norm=False, type_vocab_size=0, sliding_window=None)
    if cfg.logit_scale not in (None, cfg.n_embd**-0.5) or (cfg.logit_scale and not cfg.tie_embeddings):
        return "T5 scales decoder outputs by d_model**-0.5 only, and only with a tied head"
    return _mismatch(cfg, want) or (None if cfg.n_kv_head == cfg.n_head else "T5 has no GQA")


def t5_hf_config(cfg: ModelConfig) -> dict:
    act = {"gelu_tanh": "gelu", "relu": "relu", "silu": "silu", "gelu": "gelu"}[cfg.activation]
    return dict(
        architectures=["T5ForConditionalGeneration"], model_type="t5", vocab_size=cfg.vocab_size, d_model=cfg.n_embd,
        d_kv=cfg.head_dim, d_ff=cfg.d_ff, num_layers=cfg.n_layer, num_decoder_layers=cfg.n_decoder_layer,
        num_heads=cfg.n_head, relative_attention_num_buckets=cfg.t5_num_buckets,
        relative_attention_max_distance=cfg.t5_max_distance, dropout_rate=cfg.dropout, layer_norm_epsilon=cfg.norm_eps,
        feed_forward_proj=("gated-" if cfg.ffn == "glu" else "") + act, tie_word_embeddings=cfg.tie_embeddings,
        scale_decoder_outputs=cfg.logit_scale is not None,
        is_encoder_decoder=True, pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id,
        decoder_start_token_id=cfg.decoder_start_token_id,
    )


def t5_names(cfg: ModelConfig) -> dict[str, Source]:
    m = {"embed.tok.weight": Source(["shared.weight"]), "lm_head.weight": Source(["lm_head.weight"]),
         "encoder.norm.weight": Source(["encoder.final_layer_norm.weight"]),
         "decoder.norm.weight": Source(["decoder.final_layer_norm.weight"]),
         "encoder.rel_bias.embedding.weight": Source(["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]),
         "decoder.rel_bias.embedding.weight": Source(["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"])}
    ff = lambda t: [t + "DenseReluDense.wi_0.weight", t + "DenseReluDense.wi_1.weight"] if cfg.ffn == "glu" else [t + "DenseReluDense.wi.weight"]  # noqa: E731
    for stack, n in (("encoder", cfg.n_layer), ("decoder", cfg.n_decoder_layer)):
        for i in range(n):
            o, t = f"{stack}.layers.{i}.", f"{stack}.block.{i}.layer."
            last = 2 if stack == "decoder" else 1
            m[o + "attn_norm.weight"] = Source([t + "0.layer_norm.weight"])
            m[o + "attn.qkv.weight"] = Source([t + f"0.SelfAttention.{p}.weight" for p in "qkv"])
            m[o + "attn.o.weight"] = Source([t + "0.SelfAttention.o.weight"])
            if stack == "decoder":
                m[o + "cross_norm.weight"] = Source([t + "1.layer_norm.weight"])
                m[o + "cross_attn.q.weight"] = Source([t + "1.EncDecAttention.q.weight"])
                m[o + "cross_attn.kv.weight"] = Source([t + f"1.EncDecAttention.{p}.weight" for p in "kv"])
                m[o + "cross_attn.o.weight"] = Source([t + "1.EncDecAttention.o.weight"])
            m[o + "mlp_norm.weight"] = Source([t + f"{last}.layer_norm.weight"])
            m[o + "mlp.up.weight"] = Source(ff(f"{t}{last}."))
            m[o + "mlp.down.weight"] = Source([t + f"{last}.DenseReluDense.wo.weight"])
    return m


# --- registry -----------------------------------------------------------------------------------------
@dataclass
class Family:
    config: Callable[[dict], ModelConfig]
    hf_config: Callable[[ModelConfig], dict]
    names: Callable[[ModelConfig], dict[str, Source]]
    fits: Callable[[ModelConfig], str | None]
    prefix: str  # the base-model prefix that bare checkpoints (GPT2Model, BertModel) leave out
    ignore: tuple[str, ...] = ()  # HF tensors that carry nothing we need (buffers, tied copies)


FAMILIES = {
    "gpt2": Family(gpt2_config, gpt2_hf_config, gpt2_names, gpt2_fits, "transformer.", (".attn.bias", ".attn.masked_bias")),
    "llama": Family(llama_config, llama_hf_config, llama_names, llama_fits, "model.", ("rotary_emb.inv_freq",)),
    "bert": Family(bert_config, bert_hf_config, bert_names, bert_fits, "bert.", ("position_ids", "cls.predictions.decoder.bias")),
    "t5": Family(t5_config, t5_hf_config, t5_names, t5_fits, "",
                 ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")),
}
FAMILIES["mistral"] = FAMILIES["qwen2"] = FAMILIES["llama"]


def family_of(hf: dict) -> str:
    model_type = hf.get("model_type")
    if model_type == "lmforge":
        return "lmforge"
    if model_type not in FAMILIES:
        archs = ", ".join(hf.get("architectures") or []) or "none given"
        raise ConfigError(
            f"model_type {model_type!r} (architectures: {archs}) is not supported; supported: "
            f"{', '.join(sorted(FAMILIES))} (GPT-2, LLaMA/SmolLM, Mistral, Qwen2, BERT/MiniLM, T5)."
        )
    return model_type


def _mismatch(cfg: ModelConfig, want: dict) -> str | None:
    bad = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in want.items() if getattr(cfg, k) != v]
    return ", ".join(bad) if bad else None
