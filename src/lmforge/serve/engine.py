"""The continuous-batching engine: paged KV cache, block manager, scheduler, one stepping thread.

    engine = Engine(model, tokenizer, EngineConfig(kv_cache_gb=1.0))
    engine.start()                                   # a background thread steps the model
    async for out in engine.stream(prompt_ids, SamplingParams(max_new_tokens=64)):
        print(out.text, end="")                      # text deltas, then one output with finish_reason
    engine.generate([ids1, ids2], params)            # blocking helper (steps inline without the thread)

Every step the scheduler rebuilds the batch (continuous batching): requests that finished or were
cancelled leave and their blocks are freed; then, under a token budget per step,

1. every running sequence that is decoding gets its one token (oldest first); if no block is free
   for it, the newest running sequence is preempted: its blocks are freed and it goes back to the
   head of the queue, to be recomputed (prompt + what it generated so far) when blocks free up;
2. sequences still in their prompt get a chunk of it (chunked prefill), so a long prompt costs each
   step at most the budget and never stalls the decodes running beside it;
3. waiting requests are admitted, first taking whatever full blocks of their prompt are already
   in the prefix cache.

One forward (``paged_forward``) then runs over all of it, and the sequences whose prompt is done
sample their next token with their own parameters (``lmforge.inference.sampling``). Text is
detokenized incrementally and stop strings are checked here, so a finished sequence frees its
blocks in the very step it finishes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence as Seq
from dataclasses import dataclass, field

import torch

from lmforge.config import ConfigError
from lmforge.errors import UserError
from lmforge.inference.sampling import (
    IncrementalDetokenizer,
    SamplingBatch,
    SamplingError,
    SamplingParams,
    apply_penalties,
    count_tokens,
    make_generator,
    sample,
)
from lmforge.serve.blocks import BlockManager
from lmforge.serve.paged import PagedKVCache, build_step, check_servable, kv_bytes_per_token, paged_forward

log = logging.getLogger("lmforge.serve")


class QueueFullError(UserError):
    """The engine's queue of waiting requests is full (HTTP 429)."""


class ContextLengthError(SamplingError):
    """A prompt (plus the tokens asked for) longer than the model's context (HTTP 400)."""


@dataclass
class EngineConfig:
    kv_cache_gb: float = 1.0  # memory for the paged KV cache
    block_size: int = 16  # token slots per KV block
    max_num_seqs: int = 64  # sequences in one batch
    max_num_batched_tokens: int = 512  # tokens in one step (decodes + prefill chunks)
    max_model_len: int | None = None  # context per sequence; None: the model's
    max_queue: int = 1024  # waiting sequences before add_request refuses (QueueFullError)
    enable_prefix_caching: bool = True
    num_blocks: int | None = None  # exact pool size, overriding kv_cache_gb (tests)

    def validate(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_queue"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if not self.kv_cache_gb > 0:
            raise ConfigError(f"--kv-cache-gb must be positive, got {self.kv_cache_gb}.")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives, best first


@dataclass
class SequenceOutput:
    """What a request's sink receives whenever a step advanced one of its sequences."""

    request_id: str
    index: int  # which of the request's n samples
    text: str  # new text since the previous output
    token_ids: list[int]  # new tokens since the previous output
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # None while running; stop | length | abort | error
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None


@dataclass
class SeqResult:
    """A finished sequence, accumulated from its outputs (``add``)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    error: str | None = None

    def add(self, out: SequenceOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + out.logprobs
        self.finish_reason, self.error = out.finish_reason, out.error
        self.num_prompt_tokens = out.num_prompt_tokens


class Sequence:
    """One sample being generated: its tokens, KV blocks and sampling state."""

    def __init__(self, request: "Request", index: int, prompt: list[int]):
        self.request, self.index = request, index
        self.tokens = list(prompt)  # prompt + generated
        self.num_prompt = len(prompt)
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.table: list[int] = []  # block table
        self.hashes: list[bytes] = []  # hashes of the full blocks of the table, in order
        self.generator = make_generator(request.params, sample_index=index)
        self.detok = IncrementalDetokenizer(
            request.tokenizer, stop=request.params.stop, skip_special_tokens=request.params.skip_special_tokens,
            prefix_ids=prompt,
        )
        self.finish_reason: str | None = None

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt


class Request:
    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, sink, tokenizer, want_logprobs: bool):
        self.id, self.params, self.sink, self.tokenizer = request_id, params, sink, tokenizer
        self.want_logprobs = want_logprobs
        self.arrival = time.monotonic()
        self.seqs = [Sequence(self, i, prompt) for i in range(params.n)]


class Engine:
    """Continuous batching over a paged KV cache for one decoder-only model."""

    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        cfg = config or EngineConfig()
        cfg.validate()
        check_servable(model.config)
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, cfg
        self.max_model_len = min(cfg.max_model_len or model.config.max_seq_len, model.config.max_seq_len)
        per_token = kv_bytes_per_token(model.config, model.dtype)
        per_block = per_token * cfg.block_size
        num_blocks = cfg.num_blocks or int(cfg.kv_cache_gb * 2**30 // per_block)
        need_blocks = -(-self.max_model_len // cfg.block_size)
        if num_blocks < need_blocks:
            need_gb = need_blocks * per_block / 2**30
            raise ConfigError(
                f"the KV cache ({num_blocks * per_block / 2**30:.3f} GB, {num_blocks * cfg.block_size} tokens at "
                f"{per_token / 2**10:.0f} KiB each) cannot hold one full context of {self.max_model_len} tokens, "
                f"which needs {need_gb:.3f} GB: raise --kv-cache-gb to at least {need_gb:.3f} or lower --max-model-len."
            )
        self.blocks = BlockManager(num_blocks, cfg.block_size, enable_prefix_caching=cfg.enable_prefix_caching)
        self.cache = PagedKVCache(model.config, num_blocks, cfg.block_size, model.dtype, model.device)
        self.eos_ids = frozenset(tokenizer.eos_ids) | _config_eos(model.config)
        self.vocab_size = model.config.vocab_size
        self.device = model.device
        self.watermark = max(1, num_blocks // 100)  # blocks kept free at admission, for running decodes

        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self._requests: dict[str, Request] = {}
        self._incoming: deque[Request] = deque()
        self._aborts: set[str] = set()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count()

        # counters for /metrics
        self.num_requests = 0
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.num_preemptions = 0
        self.num_steps = 0
        self.num_failed_steps = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens generated) of recent steps

    # --- submitting ----------------------------------------------------------------------------
    def add_request(
        self,
        prompt: Seq[int],
        params: SamplingParams,
        sink: Callable[[SequenceOutput], None],
        request_id: str | None = None,
        want_logprobs: bool | None = None,
    ) -> str:
        """Queue a prompt (token ids); ``sink`` receives every output of its n sequences.

        Raises ContextLengthError / SamplingError for a request that cannot be served and
        QueueFullError when max_queue sequences are already waiting. ``sink`` is called from the
        engine thread and must not block.
        """
        prompt = [int(t) for t in prompt]
        params.validate()
        self.check_prompt(prompt, params.max_new_tokens)
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        want = params.logprobs > 0 if want_logprobs is None else want_logprobs
        req = Request(rid, prompt, params, sink, self.tokenizer, want)
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine is shut down.")
            if self.queue_depth + params.n > self.config.max_queue:
                raise QueueFullError(
                    f"the server's queue is full ({self.config.max_queue} waiting sequences): retry later."
                )
            self._incoming.append(req)
            self._cv.notify()
        return rid

    def check_prompt(self, prompt: Seq[int], max_new_tokens: int | None = None) -> None:
        """Raise ContextLengthError/SamplingError naming the lengths if the prompt cannot be served."""
        if not prompt:
            raise SamplingError("the prompt is empty: give at least one token.")
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise SamplingError(f"token id {bad} in the prompt is outside the vocabulary (0..{self.vocab_size - 1}).")
        n, ctx = len(prompt), self.max_model_len
        if n >= ctx:
            raise ContextLengthError(
                f"the prompt has {n} tokens but the model's context is {ctx} tokens (one more is needed to "
                "generate anything): shorten the prompt."
            )
        if max_new_tokens is not None and n + max_new_tokens > ctx:
            raise ContextLengthError(
                f"the prompt has {n} tokens and max_tokens asks for {max_new_tokens} more, {n + max_new_tokens} "
                f"in all, but the model's context is {ctx} tokens: lower max_tokens to at most {ctx - n} or "
                "shorten the prompt."
            )

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed before the next forward."""
        with self._cv:
            self._aborts.add(request_id)
            self._cv.notify()

    # --- state ---------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Sequences waiting to be admitted."""
        return len(self.waiting) + sum(len(r.seqs) for r in list(self._incoming))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._incoming or self._aborts)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window]
        return sum(n for _, n in recent) / window if recent else 0.0

    def stats(self) -> dict[str, float]:
        return {
            "running": len(self.running),
            "waiting": self.queue_depth,
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_blocks_used": self.blocks.num_used,
            "kv_blocks_free": self.blocks.num_free,
            "requests": self.num_requests,
            "prompt_tokens": self.num_prompt_tokens,
            "generated_tokens": self.num_generated_tokens,
            "prefix_cache_hit_tokens": self.blocks.prefix_hits,
            "preemptions": self.num_preemptions,
            "steps": self.num_steps,
            "failed_steps": self.num_failed_steps,
            "tokens_per_second": self.tokens_per_second(),
        }

    # --- the step ------------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit, schedule, run one forward, sample and emit. False when there was nothing to do."""
        outputs: list[tuple[Request, SequenceOutput]] = []
        self._intake(outputs)
        decodes, prefills = self._schedule()
        if decodes or prefills:
            self.num_steps += 1
            try:
                self._run(decodes, prefills, outputs)
            except Exception as e:  # a failing batch fails its requests, never the engine
                self.num_failed_steps += 1
                log.exception("engine step failed; failing the %d sequences of the batch", len(decodes) + len(prefills))
                failed = {s.request.id: s.request for s in decodes + [s for s, _ in prefills]}
                for req in failed.values():
                    self._finish_request(req, "error", outputs, error=f"{type(e).__name__}: {e}")
        self._emit(outputs)
        return bool(decodes or prefills)

    def _intake(self, outputs) -> None:
        with self._cv:
            incoming, self._incoming = self._incoming, deque()
            aborts, self._aborts = self._aborts, set()
        for req in incoming:
            self._requests[req.id] = req
            self.waiting.extend(req.seqs)
            self.num_requests += 1
            self.num_prompt_tokens += req.seqs[0].num_prompt
        for rid in aborts:
            req = self._requests.get(rid)
            if req is not None:
                self._finish_request(req, "abort", outputs)

    def _schedule(self) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
        bm, bs = self.blocks, self.config.block_size
        budget = self.config.max_num_batched_tokens
        decodes: list[Sequence] = []
        prefills: list[tuple[Sequence, int]] = []
        # 1. decodes, oldest first; out of blocks -> preempt the newest running sequence
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.remaining == 1:
                while not bm.grow(seq.table, seq.num_computed + 1):
                    victim = self.running[-1]  # never one already scheduled: those sit before index i
                    self._preempt(victim)
                    if victim is seq:
                        break
                else:
                    decodes.append(seq)
                    budget -= 1
            if i < len(self.running) and self.running[i] is seq:
                i += 1
        # 2. prompt chunks of running sequences
        for seq in self.running:
            if budget == 0:
                break
            if seq.remaining > 1:
                n = min(seq.remaining, budget, self._room(seq, 0))
                if n > 0:
                    bm.grow(seq.table, seq.num_computed + n)
                    prefills.append((seq, n))
                    budget -= n
        # 3. admit waiting sequences, taking their cached prefix first
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.table:
                seq.table, seq.hashes = bm.match_prefix(seq.tokens)
                seq.num_computed = len(seq.table) * bs
            n = min(seq.remaining, budget, self._room(seq, self.watermark if self.running else 0))
            if n <= 0:
                bm.free(seq.table)  # give the cached prefix back; try again next step
                seq.hashes, seq.num_computed = [], 0
                break
            bm.grow(seq.table, seq.num_computed + n)
            self.waiting.popleft()
            self.running.append(seq)
            if n == seq.remaining == 1:  # only the last prompt token left (the rest was cached)
                decodes.append(seq)
            else:
                prefills.append((seq, n))
            budget -= n
        # 4. nothing could run (every running prompt waits for blocks): preempt the newest and retry
        if not decodes and not prefills and len(self.running) > 1:
            self._preempt(self.running[-1])
            return self._schedule()
        return decodes, prefills

    def _room(self, seq: Sequence, reserve: int) -> int:
        """Tokens ``seq`` can still place: its table's free slots plus the free blocks beyond ``reserve``."""
        bs = self.config.block_size
        return len(seq.table) * bs - seq.num_computed + max(0, self.blocks.num_free - reserve) * bs

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the sequence's K/V; it re-enters the queue at the head."""
        self.running.remove(seq)
        self.blocks.free(seq.table)
        seq.hashes, seq.num_computed = [], 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _run(self, decodes: list[Sequence], prefills: list[tuple[Sequence, int]], outputs) -> None:
        bs = self.config.block_size
        dev = self.device
        step = build_step(
            [(s.table, s.num_computed, s.tokens[s.num_computed]) for s in decodes],
            [(s.table, s.num_computed, s.tokens[s.num_computed : s.num_computed + n]) for s, n in prefills],
            [],
            bs,
            device=dev,
        )
        rows, sampled = list(range(len(decodes))), list(decodes)
        offset = len(decodes)
        for s, n in prefills:
            offset += n
            if s.num_computed + n == len(s.tokens):  # the prompt is done: sample after its last token
                rows.append(offset - 1)
                sampled.append(s)
        step.logit_rows = torch.tensor(rows, dtype=torch.long, device=dev)
        logits = paged_forward(self.model, self.cache, step)  # (S, V)
        for s in decodes:
            self._computed(s, 1)
        for s, n in prefills:
            self._computed(s, n)
        if sampled:
            self._sample(sampled, logits, outputs)

    def _computed(self, seq: Sequence, n: int) -> None:
        seq.num_computed += n
        self.blocks.publish_full_blocks(seq.tokens, seq.table, seq.hashes, seq.num_computed)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, outputs) -> None:
        params = [s.request.params for s in seqs]
        batch = SamplingBatch.from_params(params, logits.device)
        raw = logits.float()
        if batch.any_penalty:
            counts = count_tokens([s.tokens[s.num_prompt :] for s in seqs], raw.shape[-1], raw.device)
            prompt_mask = None
            if bool((batch.repetition_penalty != 1).any()):
                prompt_mask = count_tokens([s.tokens[: s.num_prompt] for s in seqs], raw.shape[-1], raw.device) > 0
            logits = apply_penalties(raw, batch, counts, prompt_mask)
        else:
            logits = raw
        out = sample(logits, batch, [s.generator for s in seqs], raw_logits=raw)
        ids = out.token_ids.tolist()
        lps = out.logprobs.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        now = time.monotonic()
        self.num_generated_tokens += len(seqs)
        self._recent.append((now, len(seqs)))
        while self._recent and now - self._recent[0][0] > 60:
            self._recent.popleft()
        for j, (seq, tok) in enumerate(zip(seqs, ids)):
            req = seq.request
            lp = None
            if req.want_logprobs:
                k = req.params.logprobs
                top = list(zip(top_ids[j][:k], top_lps[j][:k])) if k else []
                lp = [TokenLogprob(tok, lps[j], top)]
            seq.tokens.append(tok)
            text, reason = "", None
            p = req.params
            if tok in self.eos_ids and not p.ignore_eos or tok in p.stop_token_ids:
                reason = "stop"
            else:
                text = seq.detok.push(tok)
                if seq.detok.stopped:
                    reason = "stop"
            if reason is None and (seq.num_output >= p.max_new_tokens or len(seq.tokens) >= self.max_model_len):
                reason = "length"
            if reason is not None and not seq.detok.stopped:
                text += seq.detok.flush()
            outputs.append((req, self._output(seq, text, [tok], lp, reason)))
            if reason is not None:
                self._retire(seq, reason)

    def _output(self, seq: Sequence, text: str, toks: list[int], lp, reason: str | None, error: str | None = None):
        return SequenceOutput(
            seq.request.id, seq.index, text, toks, lp, reason, seq.num_prompt, seq.num_output, error
        )

    def _retire(self, seq: Sequence, reason: str) -> None:
        """Take a finished sequence out of the batch and free its blocks."""
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.table)
        req = seq.request
        if all(s.finish_reason is not None for s in req.seqs):
            self._requests.pop(req.id, None)

    def _finish_request(self, req: Request, reason: str, outputs, error: str | None = None) -> None:
        for seq in req.seqs:
            if seq.finish_reason is None:
                self._retire(seq, reason)
                outputs.append((req, self._output(seq, "", [], None, reason, error)))
        self._requests.pop(req.id, None)

    def _emit(self, outputs: list[tuple[Request, SequenceOutput]]) -> None:
        broken: dict[str, Request] = {}
        for req, out in outputs:
            if req.id in broken:
                continue
            try:
                req.sink(out)
            except Exception:  # a sink that fails (a closed event loop, a bug) cancels its own request only
                log.exception("output sink of request %s failed; aborting it", req.id)
                broken[req.id] = req
        if broken:
            with self._cv:
                self._aborts.update(broken)

    # --- the thread ----------------------------------------------------------------------------
    def start(self) -> "Engine":
        """Step the model in a background thread until ``shutdown``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.has_work():
                    self._cv.wait()
                if self._stopping:
                    break
            try:
                if not self.step():
                    time.sleep(0.001)  # waiting work that cannot be admitted yet
            except Exception:  # the step guards each batch; this is the last line of defence
                log.exception("engine step crashed; failing every request in flight")
                outputs = []
                for req in list(self._requests.values()):
                    self._finish_request(req, "error", outputs, error="internal engine error")
                self._emit(outputs)

    def shutdown(self) -> None:
        """Stop the thread; requests still in flight end with finish_reason "abort"."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        outputs: list = []
        self._intake(outputs)
        for req in list(self._requests.values()):
            self._finish_request(req, "abort", outputs)
        self._emit(outputs)

    @property
    def running_in_thread(self) -> bool:
        return self._thread is not None

    # --- conveniences --------------------------------------------------------------------------
    async def stream(
        self, prompt: Seq[int], params: SamplingParams, request_id: str | None = None, want_logprobs: bool | None = None
    ) -> AsyncIterator[SequenceOutput]:
        """Outputs of one request as they come (needs ``start``); leaving early cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[SequenceOutput] = asyncio.Queue()
        rid = self.add_request(prompt, params, lambda o: loop.call_soon_threadsafe(queue.put_nowait, o), request_id, want_logprobs)
        left = params.n
        try:
            while left:
                out = await queue.get()
                if out.finish_reason is not None:
                    left -= 1
                yield out
        finally:
            if left:
                self.abort(rid)

    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams]) -> list[list[SeqResult]]:
        """Blocking: the n completions of each prompt. Steps inline unless the thread is running."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        results = [[SeqResult(i) for i in range(p.n)] for p in plist]
        done = threading.Event()
        left = [sum(p.n for p in plist)]

        def sink_for(k):
            def sink(out: SequenceOutput) -> None:
                results[k][out.index].add(out)
                if out.finish_reason is not None:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

            return sink

        for k, (prompt, p) in enumerate(zip(prompts, plist)):
            self.add_request(prompt, p, sink_for(k))
        if self.running_in_thread:
            done.wait()
        else:
            while not done.is_set():
                self.step()
        return results


def _config_eos(cfg) -> frozenset[int]:
    eos = cfg.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset(eos if isinstance(eos, list) else [eos])
