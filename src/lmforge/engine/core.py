"""The engine core: requests in, outputs out; scheduler -> model runner -> sampler -> output processor.

    engine = Engine(model, tokenizer, EngineConfig(kv_cache_gb=1.0))
    engine.start()                                   # a background thread steps the model
    async for out in engine.stream(prompt_ids, SamplingParams(max_new_tokens=64)):
        print(out.text, end="")                      # text deltas, then one output with finish_reason
    engine.generate([ids1, ids2], params)            # blocking helper (steps inline without the thread)

Each ``step``: the ``Scheduler`` picks the decodes and prefill chunks (continuous batching over the
paged KV cache, chunked prefill, preemption, prefix cache); the ``ModelRunner`` packs them into one
row and runs the model's own forward over it; the ``Sampler`` picks the next token of every
sequence whose prompt is done, each with its own parameters; each sequence's ``OutputProcessor``
detokenizes it and applies the one finish rule, so a finished sequence frees its blocks in the
very step it finishes. Outputs go to each request's sink (the server's event loop, or a list).
Decoder-only and encoder-decoder models (the encoder runs once per request) are served alike.
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

from lmforge.config import ConfigError
from lmforge.engine.blocks import BlockManager
from lmforge.engine.output import OutputProcessor, stop_token_ids
from lmforge.engine.prompt import check_prompt, token_budget
from lmforge.engine.runner import ModelRunner, PagedDecodeStep
from lmforge.engine.sampler import MAX_LOGPROBS, Sampler, SamplingError, SamplingParams, make_generator
from lmforge.engine.scheduler import Scheduler
from lmforge.errors import UserError

log = logging.getLogger("lmforge.engine")


class QueueFullError(UserError):
    """The engine's queue of waiting requests is full (HTTP 429)."""


@dataclass
class EngineConfig:
    kv_cache_gb: float = 1.0  # memory for the paged KV cache
    block_size: int = 16  # token slots per KV block
    max_num_seqs: int = 64  # sequences in one batch
    max_num_batched_tokens: int = 512  # tokens in one step (decodes + prefill chunks)
    max_model_len: int | None = None  # context per sequence; None: the model's
    max_queue: int = 1024  # waiting sequences before add_request refuses (QueueFullError)
    enable_prefix_caching: bool = True
    num_blocks: int | None = None  # exact pool size, overriding kv_cache_gb (tests, a Generator's engine)
    compile: bool = False  # decode-only steps on compiled graphs (built in the background; decoder-only models)

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
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with a sequence's first output, if asked: None first
    error_status: int | None = None  # with an error: 400 when the request caused it (its grammar, its parameters), else 500
    exception: Exception | None = None  # with an error: what was raised, for a synchronous client to raise again


def failure(e: Exception) -> tuple[str, int]:
    """(message, HTTP status) of an exception that ended a request inside the engine step."""
    return f"{type(e).__name__}: {e}", 400 if isinstance(e, UserError) else 500


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
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error_status: int | None = None

    def add(self, out: SequenceOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.text += out.text
        self.token_ids += out.token_ids
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + out.logprobs
        self.finish_reason, self.error, self.error_status = out.finish_reason, out.error, out.error_status
        self.num_prompt_tokens = out.num_prompt_tokens


class Sequence:
    """One sample being generated: its tokens, KV blocks, random stream and output."""

    def __init__(self, request: "Request", index: int, start: list[int], out: OutputProcessor, device=None):
        self.request, self.index, self.out = request, index, out
        self.tokens = list(start)  # what the cache holds: the prompt (decoder-only) + generated
        self.num_prompt = len(start)
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.table: list[int] = []  # block table
        self.hashes: list[bytes] = []  # hashes of the full blocks of the table, in order
        self.generator = make_generator(request.params, device, sample_index=index)  # on the logits' device
        self.cross = None  # encoder-decoder: each decoder layer's cross-attention K/V of the prompt
        # prompt logprobs, when asked: position p -> logprob of prompt token p (p >= 1). Every prompt
        # token must then go through the model, so such a sequence takes nothing from the prefix cache.
        self.prompt_lps: dict[int, TokenLogprob] | None = {} if request.prompt_logprobs is not None else None
        self.reuse_prefix = self.prompt_lps is None
        self.finish_reason: str | None = None

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt


class Request:
    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, sink, want_logprobs: bool,
                 prompt_logprobs: int | None = None):  # fmt: skip
        self.id, self.prompt, self.params, self.sink = request_id, prompt, params, sink
        self.want_logprobs, self.prompt_logprobs = want_logprobs, prompt_logprobs
        self.arrival = time.monotonic()
        self.seqs: list[Sequence] = []


class Engine:
    """Continuous batching over a paged KV cache for one generating model (decoder-only or
    encoder-decoder)."""

    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        cfg = config or EngineConfig()
        cfg.validate()
        if model.config.arch == "encoder":
            raise ConfigError("the engine generates with decoder-only and encoder-decoder models; this one is an "
                              "encoder (serve it with --embedding-model instead).")  # fmt: skip
        if getattr(model.config, "attention", "softmax") != "softmax":
            raise ConfigError(f"the serving engine pages softmax attention's keys and values; this model's {model.config.attention} "
                              "attention runs through lmforge.generate / `lmforge generate` instead.")  # fmt: skip
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, cfg
        self.max_model_len = min(cfg.max_model_len or model.config.max_seq_len, model.config.max_seq_len)
        per_token = ModelRunner.kv_bytes_per_token(model)
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
        step = None
        if cfg.compile and model.config.arch == "decoder" and getattr(model, "tensor_parallel", 1) == 1:
            step = PagedDecodeStep(model, cfg.max_num_seqs)  # the sharded (DTensor) and encoder-decoder steps stay eager
        self.runner = ModelRunner(model, num_blocks, cfg.block_size, decode_step=step)
        # an encoder-decoder's decoder tokens mean nothing without their encoder input: no prefix sharing
        caching = cfg.enable_prefix_caching and not self.runner.encoder_decoder
        self.blocks = BlockManager(num_blocks, cfg.block_size, enable_prefix_caching=caching)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.sampler = Sampler()
        self.vocab_size = model.config.vocab_size
        self.device = model.device

        self._requests: dict[str, Request] = {}
        self._incoming: deque[Request] = deque()
        self._aborts: set[str] = set()
        self._cv = threading.Condition()
        # held for a step: callers that step inline (one Generator used from several threads) take turns,
        # and lanes (engine/lanes.py) drive the runner and blocks under it too
        self.step_lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count()

        # counters for /metrics
        self.num_requests = 0
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.num_steps = 0
        self.num_failed_steps = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens generated) of recent steps

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self):
        return self.scheduler.running

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    # --- submitting ----------------------------------------------------------------------------
    def add_request(
        self,
        prompt: Seq[int],
        params: SamplingParams,
        sink: Callable[[SequenceOutput], None],
        request_id: str | None = None,
        want_logprobs: bool | None = None,
        prompt_logprobs: int | None = None,
    ) -> str:
        """Queue a prompt (token ids); ``sink`` receives every output of its n sequences.
        ``prompt_logprobs=k`` (decoder-only models): each sequence's first output also carries the
        log-probability of every prompt token given the ones before it (None for the first), with
        the k most likely alternatives.

        Raises ContextLengthError / SamplingError for a request that cannot be served and
        QueueFullError when max_queue sequences are already waiting. ``sink`` is called from the
        engine thread and must not block.
        """
        prompt = [int(t) for t in prompt]
        params.validate()
        self.check_prompt(prompt, params.max_new_tokens)
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        want = params.logprobs > 0 if want_logprobs is None else want_logprobs
        if prompt_logprobs is not None:
            if self.runner.encoder_decoder:
                raise SamplingError("prompt logprobs need a decoder-only model: an encoder-decoder's prompt is not "
                                    "predicted by the model.", "echo")  # fmt: skip
            if not 0 <= prompt_logprobs <= MAX_LOGPROBS:
                raise SamplingError(f"prompt_logprobs must lie in [0, {MAX_LOGPROBS}], got {prompt_logprobs}.", "logprobs")
        req = Request(rid, prompt, params, sink, want, prompt_logprobs)
        stop_ids = stop_token_ids(params, self.model.config, self.tokenizer)
        budget = token_budget(len(prompt), params.max_new_tokens, self.model.config, self.max_model_len)
        start = self.runner.start_tokens(prompt)
        req.seqs = [Sequence(req, i, start, OutputProcessor(params, stop_ids, budget, self.tokenizer, prompt), self.device)
                    for i in range(params.n)]  # fmt: skip
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
        """Raise PromptError / ContextLengthError naming the lengths if the prompt cannot be served."""
        check_prompt(prompt, self.model.config, self.max_model_len, max_new_tokens)

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
            "compiled_decode_graphs": len(step.built) if (step := self.runner.decode_step) is not None else 0,
            "compiled_decode_steps": step.steps if step is not None else 0,
            "compiled_decode_pending": step.pending if step is not None and step.error is None else 0,
        }

    # --- the step ------------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit, schedule, run one forward, sample and emit. False when there was nothing to do.
        Threads that step one engine take turns (``step_lock``)."""
        with self.step_lock:
            return self._step()

    def _step(self) -> bool:
        outputs: list[tuple[Request, SequenceOutput]] = []
        self._intake(outputs)
        decodes, prefills = self.scheduler.schedule()
        if decodes or prefills:
            self.num_steps += 1
            try:
                self._run(decodes, prefills, outputs)
            except Exception as e:  # a failing batch fails only the sequences that fail on their own
                self.num_failed_steps += 1
                self._isolate(decodes, prefills, outputs, e)
        self._emit(outputs)
        return bool(decodes or prefills)

    def _isolate(self, decodes: list[Sequence], prefills: list[tuple[Sequence, int]], outputs, error: Exception) -> None:
        """The batched step failed: run each of its sequences alone, so that one request's failure
        (a bad grammar state, a kernel that rejects its shape, ...) ends that request only. ``_run``
        commits nothing until its forward and sampling have succeeded, so a retry recomputes the
        very same step for the sequences that are fine."""
        units = [([s], []) for s in decodes] + [([], [(s, n)]) for s, n in prefills]
        if len(units) == 1:
            seq = (decodes or [prefills[0][0]])[0]
            log.error("engine step failed for request %s: %s", seq.request.id, error, exc_info=error)
            self._finish_request(seq.request, "error", outputs, exception=error)
            return
        log.warning("engine step of %d sequences failed (%s: %s); running them one by one", len(units),
                    type(error).__name__, error)  # fmt: skip
        for d, p in units:
            seq = (d or [p[0][0]])[0]
            if seq.finish_reason is not None:  # a sibling of its request already failed it
                continue
            try:
                self._run(d, p, outputs)
            except Exception as e:
                log.error("request %s failed in the engine step: %s", seq.request.id, e, exc_info=e)
                self._finish_request(seq.request, "error", outputs, exception=e)

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

    def _run(self, decodes: list[Sequence], prefills: list[tuple[Sequence, int]], outputs) -> None:
        rows: list[int] = []  # the packed tokens whose logits are wanted, in order
        sampled: list[Sequence] = []
        sample_at: list[int] = []  # where in ``rows`` each sampled sequence's row is
        scored: list[tuple[Sequence, int, int, int]] = []  # prompt logprobs: (sequence, at, first position, count)
        for i, s in enumerate(decodes):
            sample_at.append(len(rows))
            rows.append(i)
            sampled.append(s)
        offset = len(decodes)
        for s, n in prefills:
            if s.prompt_lps is not None:  # the token at position p predicts prompt token p + 1
                lo, hi = s.num_computed, min(s.num_computed + n, s.num_prompt - 1)
                if hi > lo:
                    scored.append((s, len(rows), lo + 1, hi - lo))
                    rows.extend(range(offset, offset + hi - lo))
            offset += n
            if s.num_computed + n == len(s.tokens):  # the prompt is done: sample after its last token
                sample_at.append(len(rows))
                rows.append(offset - 1)
                sampled.append(s)
        cross = None
        if self.runner.encoder_decoder:
            for s in decodes + [s for s, _ in prefills]:
                if s.cross is None:
                    s.cross = self.runner.encode(s.prompt)
            cross = [s.cross for s in decodes] + [s.cross for s, _ in prefills]
        logits = self.runner.execute(
            [(s.table, s.num_computed, s.tokens[s.num_computed]) for s in decodes],
            [(s.table, s.num_computed, s.tokens[s.num_computed : s.num_computed + n]) for s, n in prefills],
            rows, cross,
        )  # (len(rows), V)
        for s, at, first, count in scored:
            self._score_prompt(s, logits[at : at + count], first)
        picked = self._pick(sampled, logits[sample_at] if len(sample_at) < len(rows) else logits) if sampled else None
        # nothing above changed what a retry of this step would compute; from here on it is committed
        for s in decodes:
            self.scheduler.computed(s, 1)
        for s, n in prefills:
            self.scheduler.computed(s, n)
        if picked is not None:
            self._accept(sampled, picked, outputs)

    def _score_prompt(self, seq: Sequence, logits, first: int) -> None:
        """Log-probabilities of prompt tokens first.. under the logits of the tokens before them."""
        logp = logits.float().log_softmax(-1)  # (count, V)
        targets = seq.tokens[first : first + len(logp)]
        chosen = logp[range(len(targets)), targets].tolist()
        k = seq.request.prompt_logprobs
        top_ids = top_lps = None
        if k:
            top = logp.topk(k, dim=-1)
            top_ids, top_lps = top.indices.tolist(), top.values.tolist()
        for j, tok in enumerate(targets):
            alts = list(zip(top_ids[j], top_lps[j])) if k else []
            seq.prompt_lps[first + j] = TokenLogprob(tok, chosen[j], alts)

    def _pick(self, seqs: list[Sequence], logits):
        """The next token of each sequence. Seeded random streams are rewound if sampling fails, so a
        retry draws what this attempt would have drawn."""
        gens = [s.generator for s in seqs]
        saved = [g.get_state() if g is not None else None for g in gens]
        try:
            return self.sampler(logits, [s.request.params for s in seqs], gens, [s.out.token_ids for s in seqs],
                                [s.prompt for s in seqs], [s.out.constraint for s in seqs])  # fmt: skip
        except Exception:
            for g, state in zip(gens, saved):
                if g is not None:
                    g.set_state(state)
            raise

    def _accept(self, seqs: list[Sequence], out, outputs) -> None:
        """Record each sequence's token and apply the finish rule; a sequence whose output processing
        fails (its grammar refuses the token, its detokenizer breaks) fails its own request only."""
        now = time.monotonic()
        self.num_generated_tokens += len(seqs)
        self._recent.append((now, len(seqs)))
        while self._recent and now - self._recent[0][0] > 60:
            self._recent.popleft()
        for j, (seq, tok) in enumerate(zip(seqs, out.token_ids)):
            req = seq.request
            if seq.finish_reason is not None:
                continue
            lp = [TokenLogprob(tok, out.logprobs[j], out.top[j])] if req.want_logprobs else None
            seq.tokens.append(tok)
            try:
                text = seq.out.accept(tok)  # the finish rule
            except Exception as e:
                log.error("request %s failed on its token %d: %s", req.id, tok, e, exc_info=e)
                self._finish_request(req, "error", outputs, exception=e)
                continue
            reason = seq.out.finish_reason
            output = self._output(seq, text, [tok], lp, reason)
            if seq.prompt_lps is not None and len(seq.out.token_ids) == 1:
                output.prompt_logprobs = [None] + [seq.prompt_lps[p] for p in range(1, seq.num_prompt)]
            outputs.append((req, output))
            if reason is not None:
                self._retire(seq, reason)

    def _output(self, seq: Sequence, text: str, toks: list[int], lp, reason: str | None, error: str | None = None):
        return SequenceOutput(
            seq.request.id, seq.index, text, toks, lp, reason, seq.num_prompt, seq.num_output, error
        )

    def _retire(self, seq: Sequence, reason: str) -> None:
        """Take a finished sequence out of the batch and free its blocks."""
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        req = seq.request
        if all(s.finish_reason is not None for s in req.seqs):
            self._requests.pop(req.id, None)

    def _finish_request(self, req: Request, reason: str, outputs, error: tuple[str, int] | None = None,
                        exception: Exception | None = None) -> None:  # fmt: skip
        """End every unfinished sequence of ``req``. For reason "error": ``exception``, what was raised
        (its message and HTTP status follow from it, ``failure``), or ``error``, (message, status)."""
        if exception is not None and error is None:
            error = failure(exception)
        for seq in req.seqs:
            if seq.finish_reason is None:
                self._retire(seq, reason)
                out = self._output(seq, "", [], None, reason, error[0] if error else None)
                out.error_status, out.exception = (error[1] if error else None), exception
                outputs.append((req, out))
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
                    self._finish_request(req, "error", outputs, error=("internal engine error", 500))
                self._emit(outputs)

    def shutdown(self) -> None:
        """Stop the thread; requests still in flight end with finish_reason "abort"."""
        if self.runner.decode_step is not None:
            self.runner.decode_step.stop()  # no further graph: the one in progress finishes
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

    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams],
                 prompt_logprobs: int | None = None) -> list[list[SeqResult]]:  # fmt: skip
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
            self.add_request(prompt, p, sink_for(k), prompt_logprobs=prompt_logprobs)
        if self.running_in_thread:
            done.wait()
        else:
            while not done.is_set():
                self.step()
        return results
