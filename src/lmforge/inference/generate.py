"""Text generation: prefill the prompt in one pass, then one token per step from the KV cache.

    text = generate(model, tokenizer, "Once upon a time", max_new_tokens=64, temperature=0)
    for piece in stream(model, tokenizer, [{"role": "user", "content": "Hi!"}]):
        print(piece, end="", flush=True)

The pieces are layered so that each idea has one place:

* a *runner* owns a model and its caches for one batch: ``prefill()`` the prompts, then
  ``extend(tokens)`` feeds new tokens and returns the next logits (``rewind`` / ``reorder`` serve
  speculative decoding and beam search). ``DecoderRunner`` and ``Seq2SeqRunner`` cover the two
  generating families, with the KV cache on or off;
* ``sample_tokens`` runs the sampling loop over a runner (``sampling.py`` picks the tokens);
  ``beam_search`` and ``speculative.speculative_tokens`` are the other two loops;
* ``Generator`` prepares a model once (quantised copy, compiled decode step) and turns prompts
  (text, chat messages or token ids) into ``Completion`` objects or streamed text;
  ``generate`` / ``stream`` / ``complete`` are that, for a model, in one call.

Batches are left-padded: the attention mask covers the cache slots and positions count only real
tokens (``cumsum(mask) - 1``), so a prompt gets the same tokens alone or in a batch.
"""

from __future__ import annotations

import copy
import itertools
import time
import types
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields

import torch

from lmforge.errors import UserError
from lmforge.inference.sampling import (
    IncrementalDetokenizer,
    SamplingBatch,
    SamplingError,
    SamplingParams,
    add_tokens,
    apply_penalties,
    count_tokens,
    make_generator,
    sample,
)

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


class PromptError(UserError, ValueError):
    """A prompt that cannot be generated from (empty, too long, wrong type); the message says why."""


class StaleWeightsError(UserError, RuntimeError):
    """The model's weights changed after a Generator quantised or compiled (froze) them."""


def weights_version(model) -> int:
    """A number that grows whenever any parameter is modified in place (optimizer steps,
    load_state_dict, ...): the sum of the tensors' version counters."""
    return sum(p._version for p in model.parameters())


@dataclass
class Completion:
    """One generated sequence."""

    text: str
    token_ids: list[int]  # generated ids; the eos / stop token that ended it included
    finish_reason: str  # "stop" (eos, stop token or stop string) | "length" (max_new_tokens or the context)
    prompt_tokens: int
    logprobs: list[float] = field(default_factory=list)  # of each generated token, under the model
    top_logprobs: list[dict[int, float]] | None = None  # the `logprobs` most likely ids per position
    score: float | None = None  # beam search: length-normalised log-probability


# --- runners: a model and its caches for one batch -----------------------------------------------
def _decode_step(model, ids, position_ids, input_pos, mask):
    """Next-token logits (B, V) for one new token per row, through the KV cache."""
    h = model.hidden(ids, attention_mask=mask, position_ids=position_ids, input_pos=input_pos)
    return model.lm_head(h[:, -1])


def compile_decode_step(**compile_kwargs):
    """``torch.compile`` of a decode step function with its own code object.

    Dynamo keeps compiled graphs on the code object, and inductor's freezing bakes the weights into
    them as constants; with a shared code object, a second model of the same shapes would pass the
    guards and run on the first model's weights. A copy of the code per compiled model keeps
    each graph to its own model.
    """
    code = _decode_step.__code__.replace(co_name=f"_decode_step_{next(_compile_ids)}")
    fn = types.FunctionType(code, _decode_step.__globals__, code.co_name)
    return torch.compile(fn, **compile_kwargs)


_compile_ids = iter(range(1 << 62))
CACHE_BUCKET = 256  # compiled decoding rounds cache sizes up to a multiple of this


class DecoderRunner:
    """A decoder-only model and its KV cache for a batch of left-padded prompts.

    Cache slot s holds padded position s; ``slot_mask`` (B, max_len) is False on padding. With
    ``use_cache=False`` every step runs the model over the whole sequence again (the baseline the
    cache is measured against, and the reference it is tested against).
    """

    def __init__(self, model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, use_cache: bool = True,
                 step=None, extra_slots: int = 0):  # fmt: skip
        self.model, self.use_cache, self.step = model, use_cache, step or _decode_step
        device = model.device
        lens = torch.tensor([len(p) for p in prompts], device=device)
        B, T = len(prompts), int(lens.max())
        self.batch_size, self.prompt_len = B, T
        self.max_len = T + max_new_tokens + extra_slots
        if isinstance(step, CompiledStep):  # compiled: a few cache sizes, so a few graphs serve every call
            self.max_len = max(self.max_len, min(-(-self.max_len // CACHE_BUCKET) * CACHE_BUCKET, model.config.max_seq_len))
        ids = torch.zeros(B, T, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        slots = torch.arange(self.max_len, device=device)
        self.slot_mask = slots[None] >= (T - lens)[:, None]  # (B, max_len)
        self.prompt_ids = ids
        self.next_pos = lens.clone()  # (B,) position of the next token of each row
        self.cur = 0  # next cache slot
        if use_cache and isinstance(step, CompiledStep):
            step.attach_cache(model, B, self.max_len)
        elif use_cache:
            model.setup_cache(B, self.max_len)
        else:
            self.seq = ids  # (B, t) everything so far

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """Logits (B, V) of the token after each prompt."""
        T = self.prompt_len
        mask = self.slot_mask[:, :T]
        position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)  # padding does not count
        if self.use_cache:
            input_pos = torch.arange(T, device=mask.device)
            h = self.model.hidden(self.prompt_ids, attention_mask=mask, position_ids=position_ids, input_pos=input_pos)
            logits = self.model.lm_head(h[:, -1])
        else:
            logits = self.model(self.prompt_ids, attention_mask=mask, position_ids=position_ids)[:, -1]
        self.cur = T
        return logits

    @torch.inference_mode()
    def extend(self, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Feed tokens (B, t); logits of the next token (B, V), or after each fed token (B, t, V)."""
        t = tokens.shape[1]
        if self.cur + t > self.max_len:
            raise RuntimeError(f"the runner was sized for {self.max_len} cache slots; {self.cur + t} were asked for")
        position_ids = self.next_pos[:, None] + torch.arange(t, device=tokens.device)  # (B, t)
        if self.use_cache:
            input_pos = torch.arange(self.cur, self.cur + t, device=tokens.device)
            mask = self.slot_mask[:, : self.cur + t]  # attention reads the slots written so far
            if t == 1 and not all_logits:
                logits = self.step(self.model, tokens, position_ids, input_pos, mask)
            else:
                h = self.model.hidden(tokens, attention_mask=mask, position_ids=position_ids, input_pos=input_pos)
                logits = self.model.lm_head(h if all_logits else h[:, -1])
        else:
            self.seq = torch.cat([self.seq, tokens], dim=1)
            mask = self.slot_mask[:, : self.seq.shape[1]]
            out = self.model(self.seq, attention_mask=mask, position_ids=(mask.long().cumsum(1) - 1).clamp(min=0))
            logits = out[:, -t:] if all_logits else out[:, -1]
        self.cur += t
        self.next_pos = self.next_pos + t
        return logits

    def rewind(self, n: int) -> None:
        """Forget the last n fed tokens (speculative decoding); their slots are rewritten later."""
        self.cur -= n
        self.next_pos = self.next_pos - n
        if not self.use_cache:
            self.seq = self.seq[:, : self.seq.shape[1] - n]

    def reorder(self, index: torch.Tensor) -> None:
        """Rows become rows ``index`` of before (beam search)."""
        self.slot_mask, self.next_pos = self.slot_mask[index], self.next_pos[index]
        if self.use_cache:
            for cache in self.model.stack.caches:
                cache.reorder(index)
        else:
            self.seq = self.seq[index]

    def close(self) -> None:
        if self.use_cache:
            self.model.clear_cache()


class Seq2SeqRunner:
    """An encoder-decoder model: the encoder runs once, its keys and values are cached for the
    cross-attention, and the decoder starts from ``decoder_start_token_id``."""

    def __init__(self, model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, use_cache: bool = True,
                 step=None, extra_slots: int = 0):  # fmt: skip
        cfg = model.config
        self.model, self.use_cache = model, use_cache
        device = model.device
        B, S = len(prompts), max(len(p) for p in prompts)
        self.batch_size = B
        src = torch.full((B, S), cfg.pad_token_id or 0, dtype=torch.long, device=device)
        self.src_mask = torch.zeros(B, S, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):  # right padding, as T5's tokenizer does
            src[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long, device=device)
            self.src_mask[i, : len(p)] = True
        self.src = src
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id or 0
        self.seq = torch.full((B, 1), start, dtype=torch.long, device=device)
        self.prompt_len = 1
        self.max_len = 1 + max_new_tokens + extra_slots
        self.slot_mask = torch.ones(B, self.max_len, dtype=torch.bool, device=device)  # no padding in the target
        self.cur = 0
        if use_cache:
            model.setup_cache(B, memory_len=S, max_len=self.max_len)

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        self.memory = self.model.encode(self.src, self.src_mask)
        if self.use_cache:
            logits = self.model.decode(self.seq, self.memory, self.src_mask, self.slot_mask[:, :1],
                                       input_pos=torch.arange(1, device=self.seq.device))  # fmt: skip
        else:
            logits = self.model.decode(self.seq, self.memory, self.src_mask)
        self.cur = 1
        return logits[:, -1]

    @torch.inference_mode()
    def extend(self, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        t = tokens.shape[1]
        if self.use_cache:
            input_pos = torch.arange(self.cur, self.cur + t, device=tokens.device)
            out = self.model.decode(tokens, None, self.src_mask, self.slot_mask[:, : self.cur + t], input_pos=input_pos)
        else:
            self.seq = torch.cat([self.seq, tokens], dim=1)
            out = self.model.decode(self.seq, self.memory, self.src_mask)[:, -t:]
        self.cur += t
        return out if all_logits else out[:, -1]

    def rewind(self, n: int) -> None:
        self.cur -= n
        if not self.use_cache:
            self.seq = self.seq[:, : self.seq.shape[1] - n]

    def reorder(self, index: torch.Tensor) -> None:
        self.src_mask, self.memory = self.src_mask[index], self.memory[index]
        if self.use_cache:
            # self-attention, and cross-attention: the memory of the source each row now belongs to
            for cache in [*self.model.decoder.caches, *self.model.decoder.cross_caches]:
                cache.reorder(index)
        else:
            self.seq = self.seq[index]

    def close(self) -> None:
        if self.use_cache:
            self.model.clear_cache()


def make_runner(model, prompts, max_new_tokens, **kw):
    cls = Seq2SeqRunner if model.config.arch == "encoder-decoder" else DecoderRunner
    return cls(model, prompts, max_new_tokens, **kw)


# --- the sampling loop ---------------------------------------------------------------------------
@dataclass
class _Row:
    """One sequence being generated: its parameters, random stream, text and tokens so far."""

    params: SamplingParams
    prompt: list[int]
    max_new: int
    stop_ids: set[int]
    generator: torch.Generator | None
    detok: IncrementalDetokenizer | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None

    def completion(self) -> Completion:
        text = self.detok.text if self.detok is not None else ""
        return Completion(text, self.tokens, self.finish_reason or "length", len(self.prompt), self.logprobs,
                          self.top if self.params.logprobs else None)  # fmt: skip

    def accept(self, token: int) -> str:
        """Record a generated token; return the text it completes. Sets finish_reason when done."""
        self.tokens.append(token)
        piece = ""
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif self.detok is not None:
            piece = self.detok.push(token)
            if self.detok.stopped:
                self.finish_reason = "stop"
        if self.finish_reason is None and len(self.tokens) >= self.max_new:
            self.finish_reason = "length"
        if self.finish_reason is not None and self.detok is not None:
            piece += self.detok.flush()
        return piece


def sample_tokens(runner, rows: list[_Row], timing: dict | None = None) -> Iterator[tuple[int, str]]:
    """Generate until every row is finished; yields (row index, text piece) as text becomes certain.
    ``timing`` (if given) receives prefill_s (prompt to first token), decode_s and decode_steps
    (the tokens after the first), and first_step_s (the first of those steps, compilation included)."""
    params = [r.params for r in rows]
    device = runner.model.device
    batch = SamplingBatch.from_params(params, device)
    generators = [r.generator for r in rows]
    counts = prompt_mask = None
    if batch.any_penalty:
        V = runner.model.config.vocab_size
        counts = torch.zeros(len(rows), V, dtype=torch.int32, device=device)
        prompt_mask = count_tokens([r.prompt for r in rows], V, device) > 0
    start = time.perf_counter()
    logits = runner.prefill()
    steps = 0
    while True:
        raw = logits
        if counts is not None:
            logits = apply_penalties(logits, batch, counts, prompt_mask)
        out = sample(logits, batch, generators, raw_logits=raw)
        ids, logps = out.token_ids.tolist(), out.logprobs.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        for i, row in enumerate(rows):
            if row.finish_reason is not None:
                continue
            row.logprobs.append(logps[i])
            if row.params.logprobs:
                n = row.params.logprobs
                row.top.append(dict(zip(top_ids[i][:n], top_lps[i][:n])))
            piece = row.accept(ids[i])
            if piece:
                yield i, piece
        if steps == 0:
            first = time.perf_counter()
        if all(r.finish_reason is not None for r in rows):
            break
        if counts is not None:
            add_tokens(counts, out.token_ids)
        logits = runner.extend(out.token_ids[:, None])
        steps += 1
        if steps == 1:
            first_step = time.perf_counter() - first
    if timing is not None:
        timing.update(prefill_s=first - start, decode_s=time.perf_counter() - first, decode_steps=steps)
        if steps:
            timing["first_step_s"] = first_step  # where a compiled step compiles


# --- beam search ---------------------------------------------------------------------------------
@torch.inference_mode()
def beam_search(runner, num_beams: int, max_new_tokens: int, eos_ids: set[int], length_penalty: float = 1.0,
                early_stopping: bool = False, num_return: int = 1) -> list[list[tuple[list[int], float]]]:  # fmt: skip
    """Beam search over a runner built with each prompt repeated ``num_beams`` times.

    Keeps the ``num_beams`` best running sequences by summed log-probability; a sequence that
    ends (eos, or the length limit) joins the finished pool with score sum / length**length_penalty.
    Stops when no running beam can beat the worst finished one (transformers' heuristic, so the
    results match its ``generate(num_beams=...)``). Returns, per prompt, the best ``num_return``
    (tokens, score) pairs, best first.
    """
    K = num_beams
    B = runner.batch_size // K
    device = runner.model.device
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    keep = max(2, 1 + len(eos)) * K  # enough candidates that K stay running when some end
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = -1e9  # all beams start equal: take the first step from beam 0 only
    running = torch.zeros(B, K, 0, dtype=torch.long, device=device)
    fin_seqs = torch.zeros(B, K, max_new_tokens, dtype=torch.long, device=device)
    fin_lens = torch.zeros(B, K, dtype=torch.long, device=device)
    fin_scores = torch.full((B, K), -1e9, device=device)
    fin_full = torch.zeros(B, K, dtype=torch.bool, device=device)
    open_ = torch.ones(B, 1, dtype=torch.bool, device=device)  # can a running beam still improve the pool?
    logits = runner.prefill()
    for step in range(max_new_tokens):
        V = logits.shape[-1]
        scores = logits.float().log_softmax(-1).view(B, K, V) + running_scores[:, :, None]
        top_scores, top_idx = scores.view(B, K * V).topk(keep)  # (B, keep)
        beam, tok = top_idx // V, top_idx % V
        seqs = torch.cat([running.gather(1, beam[:, :, None].expand(-1, -1, step)), tok[:, :, None]], dim=2)
        ended = torch.isin(tok, eos) | (step + 1 >= max_new_tokens)  # (B, keep)
        # finished pool: candidates among the K best that ended, normalised by length
        normed = top_scores / ((step + 1) ** length_penalty)
        can_join = ended & (torch.arange(keep, device=device) < K)[None] & open_
        if early_stopping:
            can_join &= ~fin_full.all(1, keepdim=True)
        normed = torch.where(can_join, normed, -1e9)
        pad = torch.zeros(B, keep, max_new_tokens - step - 1, dtype=torch.long, device=device)
        all_seqs = torch.cat([fin_seqs, torch.cat([seqs, pad], 2)], 1)
        all_scores = torch.cat([fin_scores, normed], 1)
        all_lens = torch.cat([fin_lens, torch.full((B, keep), step + 1, device=device)], 1)
        all_full = torch.cat([fin_full, can_join], 1)
        best = all_scores.topk(K).indices
        fin_seqs = all_seqs.gather(1, best[:, :, None].expand(-1, -1, max_new_tokens))
        fin_scores, fin_lens, fin_full = all_scores.gather(1, best), all_lens.gather(1, best), all_full.gather(1, best)
        # running beams: the K best candidates that did not end
        cont = (top_scores + ended.float() * -1e9).topk(K).indices
        running_scores = top_scores.gather(1, cont) + ended.gather(1, cont).float() * -1e9
        running = seqs.gather(1, cont[:, :, None].expand(-1, -1, step + 1))
        # stop when no running beam can beat the worst finished one, or nothing can continue
        best_possible = running_scores[:, :1] / ((step + 1) ** length_penalty)
        worst = torch.where(fin_full, fin_scores.min(1, keepdim=True).values, -1e9)
        open_ = open_ & (best_possible > worst).any(1, keepdim=True)
        if not bool(open_.any()) or bool(ended.all()) or (early_stopping and bool(fin_full.all())):
            break
        src_beam = beam.gather(1, cont) + torch.arange(B, device=device)[:, None] * K  # (B, K) flat rows
        runner.reorder(src_beam.view(-1))
        logits = runner.extend(running[:, :, -1].reshape(-1, 1))
    out = []
    for b in range(B):
        out.append([(fin_seqs[b, j, : int(fin_lens[b, j])].tolist(), float(fin_scores[b, j])) for j in range(num_return)])
    return out


# --- prompts -------------------------------------------------------------------------------------
def _is_messages(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def _is_ids(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def split_batch(prompt) -> tuple[list, bool]:
    """(list of single prompts, whether the input was a batch). A single prompt is text, a chat
    (list of {"role", "content"} dicts) or token ids (list of ints); a batch is a list of those."""
    if isinstance(prompt, str) or _is_messages(prompt) or _is_ids(prompt):
        return [prompt], False
    if isinstance(prompt, (list, tuple)) and prompt:
        return list(prompt), True
    raise PromptError(
        "the prompt is empty or of an unknown kind: pass text, a list of chat messages, token ids, or a list of these."
    )


# --- the user-facing object ----------------------------------------------------------------------
class Generator:
    """A model prepared for generation, with its tokenizer.

    compile=True   compiles the one-token decode step (inductor, weights frozen as constants);
                   the first call pays for compilation, later calls of the same shapes do not
    quantize="int8" generates with a copy whose linear layers are weight-only int8
    draft_model    a smaller model of the same vocabulary for speculative decoding (greedy only)
    """

    def __init__(self, model, tokenizer=None, *, compile: bool = False, quantize: str | None = None,
                 draft_model=None, num_draft_tokens: int = 4):  # fmt: skip
        if model.config.arch == "encoder":
            raise PromptError("an encoder-only model cannot generate text: use a decoder or encoder-decoder checkpoint.")
        # quantising copies the weights and compiling freezes them: remember which weights those were
        self._source = (model, weights_version(model)) if compile or quantize is not None else None
        if quantize is not None:
            from lmforge.inference.quantize import quantize_model

            model = quantize_model(model, quantize)
        self.model, self.tokenizer = model, tokenizer
        self.draft_model, self.num_draft_tokens = draft_model, num_draft_tokens
        if draft_model is not None:
            if model.config.arch != "decoder" or draft_model.config.arch != "decoder":
                raise PromptError("speculative decoding needs a decoder-only target and draft model.")
            if draft_model.config.vocab_size != model.config.vocab_size:
                raise PromptError(
                    f"the draft model's vocabulary ({draft_model.config.vocab_size}) differs from the target's "
                    f"({model.config.vocab_size}): use a draft model with the same tokenizer."
                )
        self.step = None
        if compile:
            if model.config.arch != "decoder":
                raise PromptError("compile=True compiles the decoder-only decode step; encoder-decoder models run eagerly.")
            self.step = CompiledStep(model)

    @property
    def context(self) -> int:
        return self.model.config.max_seq_len

    # --- prompts -> ids -------------------------------------------------------------------------
    def encode(self, prompt, chat: bool = False) -> list[int]:
        """Token ids of one prompt (text, chat messages or ids)."""
        if _is_ids(prompt):
            return list(prompt)
        tok = self.tokenizer
        if isinstance(prompt, str) and chat:
            prompt = [{"role": "user", "content": prompt}]
        if _is_messages(prompt):
            if tok is None or tok.chat_template is None:
                raise PromptError("chat messages need a tokenizer with a chat template; pass plain text instead.")
            return tok.encode(tok.apply_chat_template(list(prompt), add_generation_prompt=True), add_special_tokens=False)
        if isinstance(prompt, str):
            if not prompt:
                raise PromptError("the prompt is empty: give at least one character of text.")
            if tok is None:
                raise PromptError("a text prompt needs a tokenizer: pass one, or pass token ids.")
            return tok.encode(prompt)
        raise PromptError(f"a prompt must be text, chat messages or token ids, not {type(prompt).__name__}.")

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise PromptError("the prompt is empty: give at least one token.")
        V = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= V:
            raise PromptError(f"the prompt has token id {max(ids) if max(ids) >= V else min(ids)} outside the vocabulary (0..{V - 1}).")
        if self.model.config.arch == "decoder" and len(ids) >= self.context:
            raise PromptError(
                f"the prompt has {len(ids)} tokens but the model's context is {self.context}: "
                f"shorten it to at most {self.context - 1} tokens so there is room to generate."
            )
        if self.model.config.arch == "encoder-decoder" and len(ids) > self.context and self.model.config.position == "learned":
            raise PromptError(f"the prompt has {len(ids)} tokens but the encoder's context is {self.context}.")

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            eos = self.model.config.eos_token_id
            ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
            if self.tokenizer is not None:
                ids |= self.tokenizer.eos_ids
        return ids

    def _max_new(self, prompt_len: int, params: SamplingParams) -> int:
        if self.model.config.arch == "decoder":
            return min(params.max_new_tokens, self.context - prompt_len)
        room = self.context if self.model.config.position == "learned" else params.max_new_tokens
        return min(params.max_new_tokens, room)

    # --- generation -----------------------------------------------------------------------------
    def _rows(self, prompts: list[list[int]], params: SamplingParams) -> list[_Row]:
        if params.stop and self.tokenizer is None:
            raise SamplingError("stop strings need a tokenizer to turn tokens into text; pass one or use stop_token_ids.")
        device = self.model.device
        stop_ids = self._stop_ids(params)
        rows = []
        for ids in prompts:
            for j in range(params.n):
                detok = None
                if self.tokenizer is not None:
                    detok = IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens, prefix_ids=ids)
                rows.append(_Row(params, ids, self._max_new(len(ids), params), stop_ids,
                                 make_generator(params, device, j), detok))  # fmt: skip
        return rows

    def _check_weights(self) -> None:
        if self._source is not None and weights_version(self._source[0]) != self._source[1]:
            raise StaleWeightsError(
                "the model's weights changed after this Generator quantised or compiled them: make a new Generator "
                "(lmforge.generate does so by itself)."
            )

    def run(self, prompts: list[list[int]], params: SamplingParams, use_cache: bool = True) -> Iterator[tuple[int, str]]:
        """Low level: generate for token-id prompts; yields (row, piece), row = prompt * n + sample.
        The rows' completions are then in ``self.last_rows``."""
        self._check_weights()
        for p in prompts:
            self._check_prompt(p)
        rows = self._rows(prompts, params)
        self.last_rows, self.last_timing = rows, {}
        if self.draft_model is not None:
            from lmforge.inference.speculative import speculative_tokens

            if len(rows) != 1 or not params.greedy or params.uses_penalties:
                raise SamplingError(
                    "speculative decoding serves one prompt, n=1, greedy (temperature=0) without penalties; "
                    "drop the draft model for batches or sampling."
                )
            yield from speculative_tokens(self, rows[0], use_cache=use_cache)
            return
        max_new = max(r.max_new for r in rows)
        runner = make_runner(self.model, [r.prompt for r in rows], max_new, use_cache=use_cache, step=self.step)
        try:
            yield from sample_tokens(runner, rows, self.last_timing)
        finally:
            runner.close()

    @property
    def last_completions(self) -> list[Completion]:
        """The completions of the latest ``run`` / ``stream`` (to read token counts after streaming)."""
        return [r.completion() for r in self.last_rows]

    def complete(self, prompt, *, chat: bool = False, use_cache: bool = True, num_beams: int = 1,
                 length_penalty: float = 1.0, early_stopping: bool = False, **params):  # fmt: skip
        """Completion objects: one per prompt, or a list of ``n`` per prompt when n > 1."""
        sp = make_params(**params)
        items, batched = split_batch(prompt)
        prompts = [self.encode(p, chat) for p in items]
        if num_beams > 1:
            results = self._beam(prompts, sp, num_beams, length_penalty, early_stopping, use_cache)
        else:
            for _ in self.run(prompts, sp, use_cache):
                pass
            results = self.last_completions
        grouped = [results[i * sp.n : (i + 1) * sp.n] for i in range(len(prompts))]
        out = [g if sp.n > 1 else g[0] for g in grouped]
        return out if batched else out[0]

    def generate(self, prompt, **kwargs):
        """Text: a string per prompt (a list of n strings when n > 1); a list for a list of prompts."""
        done = self.complete(prompt, **kwargs)

        def text(c):
            return [x.text for x in c] if isinstance(c, list) else c.text

        _, batched = split_batch(prompt)
        return [text(c) for c in done] if batched else text(done)

    def stream(self, prompt, *, chat: bool = False, use_cache: bool = True, **params) -> Iterator[str]:
        """Text pieces of one completion as they are generated; each is whole UTF-8 characters,
        and together they are exactly ``generate``'s text. Bad input raises here, not mid-stream."""
        sp = make_params(**params)
        items, batched = split_batch(prompt)
        if batched or sp.n != 1:
            raise PromptError("stream() follows one prompt with n=1; use generate() for batches and several samples.")
        if self.tokenizer is None:
            raise PromptError("stream() yields text and needs a tokenizer.")
        ids = self.encode(items[0], chat)
        self._check_prompt(ids)
        return (piece for _, piece in self.run([ids], sp, use_cache))

    def _beam(self, prompts, sp: SamplingParams, num_beams, length_penalty, early_stopping, use_cache):
        if sp.top_k or sp.top_p < 1 or sp.min_p or sp.uses_penalties or sp.logprobs:
            raise SamplingError("beam search ranks by log-probability: drop top_k, top_p, min_p, penalties and logprobs.")
        if sp.n > num_beams:
            raise SamplingError(f"n={sp.n} exceeds num_beams={num_beams}: beam search returns at most num_beams sequences.")
        self._check_weights()
        for p in prompts:
            self._check_prompt(p)
        max_new = min(self._max_new(len(p), sp) for p in prompts)
        expanded = [p for p in prompts for _ in range(num_beams)]
        runner = make_runner(self.model, expanded, max_new, use_cache=use_cache, step=self.step)
        try:
            best = beam_search(runner, num_beams, max_new, self._stop_ids(sp), length_penalty, early_stopping, sp.n)
        finally:
            runner.close()
        results = []
        for p, hyps in zip(prompts, best):
            for tokens, score in hyps:
                text = ""
                if self.tokenizer is not None:
                    det = IncrementalDetokenizer(self.tokenizer, sp.stop, sp.skip_special_tokens, prefix_ids=p)
                    for t in tokens:
                        if t in self._stop_ids(sp):
                            break
                        det.push(t)
                        if det.stopped:
                            break
                    det.flush()
                    text = det.text
                ended = bool(tokens) and (tokens[-1] in self._stop_ids(sp))
                results.append(Completion(text, tokens, "stop" if ended else "length", len(p), score=score))
        return results


class CompiledStep:
    """The one-token decode step of one model, compiled by inductor (C++ wrapper, so the graph
    runs without Python between its kernels). Compilation happens on the first call of each
    shape (batch, cache buffer size); the number of slots attention reads is a dynamic size in
    the graph, so one graph serves every step. The guards dynamo would check on every later call
    are skipped once a shape has run (the runner keeps its inputs' shapes and the cache buffers
    fixed per shape, which is all they would check).

    A step streams every weight once, and how fast a matrix streams depends on the batch and the
    weights' type (measured on SmolLM2 with 2 cores; benchmarks/decode.py):
    * fp32 at batch 1, matrix-vector products: MKL's ``x @ Wt`` with the weight stored
      input-major (``W.t()`` contiguous) streams near the machine's bandwidth, where F.linear's
      transposed path and inductor's packed weights are 5-10% slower. Batch 1 runs a twin of
      the model that shares every tensor but holds input-major copies of the linear weights
      (made on the first batch-1 call; as much memory as packed weights take), not frozen, so
      not packed;
    * fp32 at batch > 1, matrix-matrix products: inductor freezes the weights and packs them for
      MKL (``cpp.weight_prepack``), ~15% faster than ``x @ Wt`` at batch 8. (The packing pass is
      set up once per process, so the batch-1 graph avoids it by not freezing, rather than by
      turning packing off.) Default mode: max-autotune's hot-cache timings pick a GEMM template
      that is ~20% slower once weights stream from memory;
    * int8 (``quantize="int8"``), every batch: frozen weights and max-autotune, whose
      weight-only-int8 GEMM template beats aten's ``_weight_int8pack_mm`` ~1.6x at batch 1 and
      ~2.5x at batch 8.
    """

    def __init__(self, model):
        from lmforge.inference.quantize import Int8Linear

        self.int8 = any(isinstance(m, Int8Linear) for m in model.modules())
        kw = dict(mode="max-autotune-no-cudagraphs" if self.int8 else "default", fullgraph=True, dynamic=False)
        self.vector_fn, self.matrix_fn = compile_decode_step(**kw), compile_decode_step(**kw)
        self.twin = None
        self.caches: dict[tuple[int, int], torch.nn.ModuleList] = {}
        self.warm: set[tuple] = set()

    def attach_cache(self, model, batch: int, max_len: int) -> None:
        """Give the model this step's cache of that shape. Compiled graphs guard on the identity of
        the buffers they write, so each shape keeps one cache for good (a new one would recompile)."""
        key = (batch, max_len)
        if key not in self.caches:
            model.setup_cache(batch, max_len)
            self.caches[key] = model.stack.caches
        model.stack.caches = self.caches[key]

    def __call__(self, model, ids, position_ids, input_pos, mask):
        import torch._inductor.config as inductor_config

        fn = self.matrix_fn
        if ids.shape[0] == 1 and not self.int8:
            if self.twin is None:
                self.twin = input_major_twin(model)
            fn, self.twin.stack.caches, model = self.vector_fn, model.stack.caches, self.twin
        args = (model, ids, position_ids, input_pos, mask)
        torch._dynamo.mark_dynamic(mask, 1)  # the slots read grow each step: one graph for every count
        key = (tuple(ids.shape), id(model.stack.caches))
        if key in self.warm:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return fn(*args)
        with inductor_config.patch(freezing=fn is self.matrix_fn, cpp_wrapper=True):
            logits = fn(*args)
        self.warm.add(key)
        return logits


def input_major_twin(model):
    """A model that shares every tensor of ``model`` except its linear layers' weights, which are
    copies stored input-major (``W.t()`` contiguous; same values and shapes, another layout)."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    twin = copy.deepcopy(model, shared)
    for m in twin.modules():
        if type(m) is torch.nn.Linear:
            m.weight = torch.nn.Parameter(m.weight.detach().t().contiguous().t(), requires_grad=False)
    return twin


def make_params(**params) -> SamplingParams:
    unknown = sorted(set(params) - SAMPLING_FIELDS)
    if unknown:
        raise SamplingError(f"unknown generation parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(SAMPLING_FIELDS))}.")
    return SamplingParams(**params)


# --- one-call API --------------------------------------------------------------------------------
_prepared: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _generator(model, tokenizer, compile, quantize, draft_model, num_draft_tokens) -> Generator:
    """A Generator for the call. What is costly to prepare (the quantised copy, the compiled step)
    is kept per model and options, so it happens once per version of the weights (it is redone
    after training steps); neither refers back to the model, so the entry goes when the model does."""
    prepared, step = None, None
    if compile or quantize is not None:
        per_model = _prepared.setdefault(model, {})
        key, version = (compile, quantize), weights_version(model)
        if key not in per_model or per_model[key][0] != version:
            g = Generator(model, compile=compile, quantize=quantize)
            per_model[key] = (version, g.model if quantize is not None else None, g.step)
        _, prepared, step = per_model[key]
    g = Generator(prepared if prepared is not None else model, tokenizer, draft_model=draft_model, num_draft_tokens=num_draft_tokens)
    g.step = step
    return g


def complete(model, tokenizer, prompt, *, compile: bool = False, quantize: str | None = None, draft_model=None,
             num_draft_tokens: int = 4, **kwargs):  # fmt: skip
    """``Completion`` objects (text, token ids, logprobs, finish reason) for a prompt or a list."""
    return _generator(model, tokenizer, compile, quantize, draft_model, num_draft_tokens).complete(prompt, **kwargs)


def generate(model, tokenizer, prompt, *, compile: bool = False, quantize: str | None = None, draft_model=None,
             num_draft_tokens: int = 4, **kwargs):  # fmt: skip
    """Generated text for a prompt (str), or a list for a list of prompts.

    prompt      text, chat messages [{"role": "user", "content": ...}], token ids, or a list of these
    chat=True   wrap a text prompt as one user message through the chat template
    params      max_new_tokens, temperature (0: greedy), top_k, top_p, min_p, repetition_penalty,
                presence_penalty, frequency_penalty, seed, stop, stop_token_ids, ignore_eos,
                logprobs, n (see ``SamplingParams``); num_beams, length_penalty for beam search;
                use_cache=False recomputes everything each step
    speed       compile=True, quantize="int8", draft_model=<small model> (speculative, greedy)
    """
    return _generator(model, tokenizer, compile, quantize, draft_model, num_draft_tokens).generate(prompt, **kwargs)


def stream(model, tokenizer, prompt, *, compile: bool = False, quantize: str | None = None, draft_model=None,
           num_draft_tokens: int = 4, **kwargs) -> Iterator[str]:  # fmt: skip
    """Text pieces of one completion as they are generated (whole UTF-8 characters, exact stops)."""
    return _generator(model, tokenizer, compile, quantize, draft_model, num_draft_tokens).stream(prompt, **kwargs)
