"""Reward model: a scalar head on a decoder or encoder, trained with the Bradley–Terry loss.

Decoder (GPT-2, LLaMA/SmolLM, Qwen2, Mistral): ``score`` is a bias-free linear map of the hidden
state at the last token that is not padding — transformers' ``*ForSequenceClassification`` rule,
so the saved directory (``config.json`` with ``LlamaForSequenceClassification`` / ... and
``num_labels: 1``, the base model's tensors plus ``score.weight``) loads there with equal scores.
Encoder (BERT/MiniLM): the model's own sequence-classification head (pooler + classifier) with
one label, saved as ``BertForSequenceClassification``.

    lmforge rm configs/rm-vader-smollm2.yaml --data pairs.jsonl --out runs/rm
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.align import losses as L
from lmforge.align.logprobs import pack
from lmforge.align.pairs import EncodedPair, encode_pairs, encode_prompt, encode_response, fit, read_pairs
from lmforge.align.rl_common import (AlignConfig, DataParallel, Run, batch_indices, clip_gradients, freeze_lower_layers, load_policy, lr_factor,
                                     make_optimizer, micro_batches, progress_bar, seed_everything, split_eval)  # fmt: skip
from lmforge.errors import CheckpointError, UserError

SEQ_CLS = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
           "qwen2": "Qwen2ForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}  # fmt: skip


class RewardModel(nn.Module):
    """A transformer and a scalar score per sequence: ``forward(ids) -> (B,)``."""

    def __init__(self, backbone: nn.Module, pad_id: int, score: nn.Linear | None = None):
        super().__init__()
        cfg = backbone.config
        if cfg.arch == "encoder-decoder":
            raise UserError("a reward model needs a decoder-only or encoder-only model, not an encoder-decoder.")
        if cfg.arch == "encoder" and (cfg.head != "seq_cls" or cfg.num_labels != 1):
            raise UserError("an encoder reward model needs head=seq_cls with num_labels=1; build it with reward_model_from().")
        self.backbone, self.pad_id = backbone, int(pad_id)
        self.score = None
        if cfg.arch == "decoder":
            self.score = score if score is not None else nn.Linear(cfg.n_embd, 1, bias=False)
            if score is None:
                nn.init.normal_(self.score.weight, std=cfg.n_embd**-0.5 * 0.1)
            self.score.to(device=backbone.device, dtype=backbone.dtype)

    @property
    def config(self):
        return self.backbone.config

    def last_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the rightmost token that is not padding (B,), as transformers picks it."""
        T = input_ids.shape[1]
        return ((input_ids != self.pad_id).long() * torch.arange(T, device=input_ids.device)).argmax(-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (B,) of right-padded sequences (B, T)."""
        if self.score is None:  # encoder: [CLS] pooled -> classifier
            if attention_mask is None:
                attention_mask = (input_ids != self.pad_id).long()
            return self.backbone(input_ids, attention_mask=attention_mask).squeeze(-1)
        h = self.backbone.hidden(input_ids)  # (B, T, D)
        last = h[torch.arange(len(h), device=h.device), self.last_index(input_ids)]  # (B, D)
        return self.score(last).squeeze(-1).float()

    @torch.no_grad()
    def score_sequences(self, sequences: list[list[int]], batch_size: int = 16) -> torch.Tensor:
        """Scores (N,) of token sequences, batched."""
        was = self.training
        self.eval()
        out = []
        for i in range(0, len(sequences), batch_size):
            chunk = sequences[i : i + batch_size]
            T = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), T), self.pad_id, dtype=torch.long, device=self.backbone.device)
            mask = torch.zeros_like(ids)
            for j, s in enumerate(chunk):
                ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            out.append(self(ids, mask).float())
        self.train(was)
        return torch.cat(out)

    def score_texts(self, tokenizer, prompts: list, responses: list[str], chat: bool | None = None,
                    max_length: int | None = None) -> torch.Tensor:  # fmt: skip
        """Scores (N,) of (prompt, response) texts, rendered as in training."""
        max_length = max_length or self.config.max_seq_len
        seqs = []
        for p, r in zip(prompts, responses):
            a, b = fit(encode_prompt(tokenizer, p, chat), encode_response(tokenizer, p, r, chat), max_length)
            seqs.append(a + b)
        return self.score_sequences(seqs)

    # --- Hugging Face sequence-classification checkpoints ---------------------------------------
    def save_pretrained(self, out_dir: str | os.PathLike, tokenizer=None) -> Path:
        from safetensors.torch import save_file

        from lmforge.checkpoints import _atomic_write, convert_to_hf, save_pretrained
        from lmforge.checkpoints.hf import FAMILIES

        out = Path(out_dir)
        cfg = self.config
        if self.score is None:  # encoder: its seq_cls head is BertForSequenceClassification already
            save_pretrained(self.backbone, out, tokenizer=tokenizer)
            hf = json.loads((out / "config.json").read_text())
            hf["pad_token_id"] = self.pad_id
            _atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(hf, indent=2) + "\n"))
            return out
        fam = FAMILIES.get(cfg.family)
        reason = fam.fits(cfg) if fam is not None and cfg.family in SEQ_CLS else f"family {cfg.family!r}"
        if reason is not None:
            raise CheckpointError(f"this reward model has no Hugging Face sequence-classification twin ({reason}); "
                                  "use a GPT-2, LLaMA/SmolLM, Qwen2 or Mistral backbone.")  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        hf = fam.hf_config(cfg)
        hf.update(architectures=[SEQ_CLS[cfg.family]], num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                  pad_token_id=self.pad_id, dtype=str(self.backbone.dtype).removeprefix("torch."))  # fmt: skip
        state = {k: v for k, v in convert_to_hf(self.backbone).items() if k != "lm_head.weight"}
        state["score.weight"] = self.score.weight.detach().contiguous().clone()
        _atomic_write(out / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        _atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(hf, indent=2) + "\n"))
        if tokenizer is not None:
            tokenizer.save(out)
        return out


def reward_model_from(model: nn.Module, pad_id: int) -> RewardModel:
    """A reward model on a loaded decoder (new score head) or encoder (its classifier, one label)."""
    if model.config.arch == "encoder" and (model.config.head != "seq_cls" or model.config.num_labels != 1):
        from lmforge.models import build_model

        cfg = dataclasses.replace(model.config, head="seq_cls", num_labels=1, pooler=True)
        with torch.device("meta"):
            enc = build_model(cfg)
        enc.to_empty(device=model.device)
        enc.init_weights()
        missing, _ = enc.load_state_dict(model.state_dict(), strict=False)
        assert all(k.startswith(("pooler", "classifier")) for k in missing), missing
        for m in enc.modules():
            if hasattr(m, "init_buffers"):
                m.init_buffers()
        model = enc.to(model.dtype)
    return RewardModel(model, pad_id)


def load_reward_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> RewardModel:
    """A reward model saved by ``RewardModel.save_pretrained`` (or any HF ``*ForSequenceClassification``
    of a supported family with one label)."""
    from lmforge.checkpoints import convert_from_hf, load_into, load_model, read_hf_config, read_state
    from lmforge.checkpoints.hf import FAMILIES, family_of
    from lmforge.models import build_model

    p = Path(path)
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p} is not a reward model directory (no config.json); train one with `lmforge rm`.")
    hf = read_hf_config(p)
    arch = (hf.get("architectures") or [""])[0]
    if not arch.endswith("ForSequenceClassification") or hf.get("num_labels", len(hf.get("id2label") or {0: 0})) != 1:
        raise CheckpointError(f"{p} is not a one-label sequence-classification model (architectures: {arch or 'none'}).")
    family = family_of(hf)
    pad = hf.get("pad_token_id")
    if pad is None:
        raise CheckpointError(f"{p}/config.json has no pad_token_id; a reward model needs it to find each sequence's last token.")
    if family == "bert":
        return RewardModel(load_model(p, dtype=dtype, quantize="none"), pad)
    cfg = FAMILIES[family].config(hf)
    raw = read_state(p)
    score = raw.pop("score.weight", None)
    if score is None:
        raise CheckpointError(f"{p} has no score.weight tensor.")
    names = FAMILIES[family].names(cfg)
    if not cfg.tie_embeddings and "lm_head.weight" not in raw:  # unused by the reward model: borrow the embedding
        raw["lm_head.weight"] = raw[names["embed.tok.weight"].names[0]]
    with torch.device("meta"):
        model = build_model(cfg)
    load_into(model, convert_from_hf(model, raw))
    model = model.to(dtype=dtype).eval()
    head = nn.Linear(cfg.n_embd, 1, bias=False)
    head.weight.data.copy_(score)
    return RewardModel(model, pad, score=head).eval()


# --- training --------------------------------------------------------------------------------------
@dataclass
class RMConfig(AlignConfig):
    learning_rate: float = 5e-5
    center_coef: float | None = None  # pulls (r_chosen + r_rejected) towards 0, so scores stay centred


@dataclass
class RMResult:
    run_dir: Path
    model_dir: Path
    eval_accuracy: float | None
    eval_loss: float | None
    steps: int


def _pad_id(tokenizer, model) -> int:
    for v in (model.config.pad_token_id, tokenizer.pad_id, tokenizer.eos_id, 0):
        if v is not None:
            return v
    return 0


def _scores(rm: RewardModel, pairs: list[EncodedPair], micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of chosen and rejected (B,) each; chosen and rejected go through one forward per micro-batch."""
    chosen, rejected = [], []
    for i in range(0, len(pairs), micro):
        chunk = pairs[i : i + micro]
        batch = pack([p.prompt for p in chunk] * 2, [p.chosen for p in chunk] + [p.rejected for p in chunk], rm.pad_id,
                     rm.backbone.device)  # fmt: skip
        mask = (torch.arange(batch.input_ids.shape[1])[None] <= batch.last[:, None]).long()
        s = rm(batch.input_ids, mask)
        chosen.append(s[: len(chunk)])
        rejected.append(s[len(chunk):])
    return torch.cat(chosen), torch.cat(rejected)


@torch.no_grad()
def evaluate_reward_model(rm: RewardModel, pairs: list[EncodedPair], micro: int = 16, dp: DataParallel | None = None) -> dict[str, float]:
    """Held-out accuracy (share of pairs scored chosen > rejected), loss and mean margin; under
    torchrun each process scores its share of the pairs."""
    was = rm.training
    rm.eval()
    chunks = micro_batches(pairs, micro, dp)
    scored = [_scores(rm, chunk, micro) for chunk, _ in chunks]  # every chunk: under FSDP the processes run in step
    mine = [s for s, (_, counted) in zip(scored, chunks) if counted]
    sums = [0.0, 0.0, 0.0]
    if mine:
        c, r = torch.cat([s[0] for s in mine]), torch.cat([s[1] for s in mine])
        sums = [(c > r).sum().item(), L.reward_model_loss(c, r).item() * len(c), (c - r).sum().item()]
    rm.train(was)
    if dp is not None:
        sums = dp.sum(sums)
    correct, loss, margin = (v / len(pairs) for v in sums)
    return {"eval_accuracy": correct, "eval_loss": loss, "eval_margin": margin}


def train_reward_model(cfg: RMConfig, data: str | os.PathLike, out: str | os.PathLike, resume: bool = False) -> RMResult:
    """Train a reward model on the pairs of ``data``; the final model is ``out/final`` (HF format).
    Under ``torchrun`` the processes share each batch (``DataParallel``, ``cfg.strategy``: ddp or fsdp)
    and rank 0 writes ``out``."""
    with DataParallel(cfg.strategy) as dp:
        return _train_reward_model(cfg, data, out, resume, dp)


def _train_reward_model(cfg: RMConfig, data, out, resume: bool, dp: DataParallel) -> RMResult:
    seed_everything(cfg.seed)
    pairs = read_pairs(data)
    model, tok = load_policy(cfg)
    rm = reward_model_from(model, _pad_id(tok, model))
    freeze_lower_layers(rm.backbone, cfg.train_layers)
    if rm.score is None and cfg.train_layers is not None:  # the encoder's head lives in the backbone
        for m in (rm.backbone.pooler, rm.backbone.classifier):
            if m is not None:
                m.requires_grad_(True)
    rm.train()
    rm = dp.prepare(rm)  # FSDP: sharded in place; the parameters below are its shards
    trainable = [p for p in rm.parameters() if p.requires_grad]
    encoded = encode_pairs(tok, pairs, min(cfg.max_length, rm.config.max_seq_len), cfg.chat)
    train, held = split_eval(encoded, cfg.eval_fraction, cfg.seed)
    opt = make_optimizer([rm], cfg)
    run = Run(out, cfg, "rm", resume, main=dp.main)
    step = run.start({"rm": rm}, opt)
    last_eval: dict = {}
    bar = progress_bar(cfg.max_steps, step, cfg.progress and dp.main, "reward model")
    while step < cfg.max_steps:
        for g in opt.param_groups:
            g["lr"] = cfg.learning_rate * lr_factor(step, cfg)
        batch = [train[i] for i in batch_indices(step, cfg.batch_size, len(train), cfg.seed)]
        chunks = micro_batches(batch, cfg.micro, dp)
        opt.zero_grad(set_to_none=True)
        sums = [0.0, 0.0, 0.0]  # loss, correct, margin (sums over the batch)
        for i, (chunk, counted) in enumerate(chunks):
            with dp.accumulate(rm, last=i == len(chunks) - 1):
                c, r = _scores(rm, chunk, cfg.micro)
                loss = L.reward_model_loss(c, r, center_coef=cfg.center_coef)
                (loss * len(chunk) / len(batch) if counted else loss * 0.0).backward()
            if not counted:
                continue
            sums[0] += loss.item() * len(chunk)
            sums[1] += (c > r).sum().item()
            sums[2] += (c - r).sum().item()
        dp.sync_grads(trainable)
        clip_gradients(trainable, cfg.grad_clip)
        opt.step()
        step += 1
        loss, correct, margin = (v / len(batch) for v in dp.sum(sums))
        record = {"step": step, "loss": loss, "accuracy": correct, "margin": margin, "lr": opt.param_groups[0]["lr"]}
        if held and ((cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.max_steps):
            last_eval = evaluate_reward_model(rm, held, cfg.micro, dp)
            record.update(last_eval)
        if step % cfg.log_interval == 0 or "eval_accuracy" in record:
            run.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", **({"eval_acc": f"{last_eval['eval_accuracy']:.3f}"} if last_eval else {}))
        if (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0) or step == cfg.max_steps:
            run.save(step, {"rm": rm}, opt, rm, tok)
    bar.close()
    if held and not last_eval:
        last_eval = evaluate_reward_model(rm, held, cfg.micro, dp)
    final = run.finish(rm, tok, f"reward model ({Path(data).name})")
    return RMResult(Path(out), final, last_eval.get("eval_accuracy"), last_eval.get("eval_loss"), step)
