"""Text generation: the synchronous client of the engine.

    text = generate(model, tokenizer, "Once upon a time", max_new_tokens=64, temperature=0)
    for piece in stream(model, tokenizer, [{"role": "user", "content": "Hi!"}]):
        print(piece, end="", flush=True)

``Generator`` prepares a model once (quantised copy, compiled decode graphs, the engine and its KV
pool) and turns prompts (text, chat messages or token ids) into ``Completion`` objects or streamed
text; ``generate`` / ``stream`` / ``complete`` are that, for a model, in one call (what they prepare
is kept with the model, per options, tokenizer and version of the weights).

Every decode runs on the one ``Engine`` (``lmforge.engine``) of the Generator wherever its pool can
page the model's attention (softmax, KV cache on): sampling (``num_beams=1``) adds its prompts as
requests, steps the engine inline and collects each sequence's outputs through the request's sink,
so text pieces come out as each step produces them; ``beam_search`` and speculative decoding
(``speculative.py``) drive ``engine.lanes.Lanes`` on the engine's runner and pool (forked beams share
blocks, copy-on-write; rejected guesses are rewound). ``use_cache=False`` (every step recomputes
everything: the reference the cache is tested against) and sparse or linear attention (layers the
pool cannot page) run the same loops on the contiguous cache of ``engine.runner`` (``DecoderRunner``
/ ``Seq2SeqRunner``; sampling through the fixed-batch loop ``engine.batch.decode_batch``). Both
share the prompt check, the sampler and the output processor with its one finish rule. A
``GenerationRun`` carries the completions, timings and draft statistics of one call.
"""

from __future__ import annotations

import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace

import torch

from lmforge.engine.batch import Row, decode_batch
from lmforge.engine.core import Engine, EngineConfig, SeqResult, SequenceOutput
from lmforge.engine.lanes import Lanes
from lmforge.engine.output import OutputProcessor, stop_token_ids
from lmforge.engine.prompt import PromptError, chat_ids, check_prompt, token_budget
from lmforge.engine.runner import BackgroundStep, CompiledStep, ModelRunner, make_runner
from lmforge.engine.sampler import SamplingError, SamplingParams, make_generator
from lmforge.errors import UserError

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
POOL_BYTES = 512 * 2**20  # a Generator's KV pool: this much, but at least one full context and at most four


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


class GenerationRun:
    """One call's generation: iterate it for (row, text piece) as text becomes certain, row =
    prompt * n + sample; afterwards ``completions`` holds each row's ``Completion``, ``timing``
    the prefill and decode times, and, with a draft model, ``draft_stats`` the target passes,
    drafted and accepted tokens.

    ``timing``: prefill_s (from the start to every sequence's first token), decode_s and
    decode_steps (the steps after that), first_step_s (the first of those steps: where a compiled
    step is compiled or waited for), and step: "compiled" (decode steps started on a compiled
    graph), "switched" (they started eagerly and a graph compiled in the background took over) or
    "eager"."""

    def __init__(self, pieces_of: Callable[[dict, dict], Iterator[tuple[int, str]]],
                 completions_of: Callable[[], list[Completion]]):  # fmt: skip
        self.timing: dict = {}
        self.draft_stats: dict = {}
        self._completions_of = completions_of
        # the pieces get the dicts to fill, not the run: an abandoned run is freed (and its engine
        # requests cancelled, see ``_engine_pieces``) as soon as nothing refers to it
        self._pieces = pieces_of(self.timing, self.draft_stats)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return self._pieces

    def __next__(self) -> tuple[int, str]:
        return next(self._pieces)

    def finish(self) -> "GenerationRun":
        """Run to the end (without looking at the pieces)."""
        for _ in self._pieces:
            pass
        return self

    @property
    def completions(self) -> list[Completion]:
        return self._completions_of()


def _row_completion(r: Row) -> Completion:
    """A contiguous-path row as a Completion."""
    return Completion(r.out.text, r.out.token_ids, r.out.finish_reason or "length", len(r.prompt), r.logprobs,
                      r.top if r.params.logprobs else None)  # fmt: skip


def _engine_pieces(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], results: list[SeqResult],
                   timing: dict, wait_compiled: bool) -> Iterator[tuple[int, str]]:  # fmt: skip
    """Add the prompts to ``engine`` and step it inline until every sequence is finished; yields
    (row, text piece) as each step produces them (row = prompt * n + sample) and accumulates each
    row's outputs in ``results``. ``wait_compiled``: the first decode step waits for the compiled
    graph of its batch size (compile=True). Leaving early cancels what is left of the requests."""
    n = params[0].n
    ready: deque[tuple[int, str]] = deque()
    failed: list[SequenceOutput] = []
    left = [len(results)]

    def sink_for(base: int):
        def sink(out: SequenceOutput) -> None:
            row = base + out.index
            results[row].add(out)
            if out.text:
                ready.append((row, out.text))
            if out.finish_reason is not None:
                left[0] -= 1
                if out.finish_reason == "error":
                    failed.append(out)

        return sink

    graphs = engine.runner.decode_step  # the compiled decode step (compile=True / "background"), or None
    rids: list[str] = []
    start = time.perf_counter()
    first = None  # when every sequence had its first token
    steps, first_step, started, took_over = 0, 0.0, False, False
    try:
        for k, (prompt, p) in enumerate(zip(prompts, params)):
            rids.append(engine.add_request(prompt, p, sink_for(k * n), want_logprobs=True))
        while left[0]:
            t0 = time.perf_counter()
            if wait_compiled and graphs is not None and first is not None and steps == 0 and engine.running:
                graphs.wait([len(engine.running)])  # the first call of a batch size pays for its graph
            before = graphs.steps if graphs is not None else 0
            if not engine.step() and not engine.running and left[0]:  # (another thread's step may have finished them)
                raise RuntimeError("the engine could not schedule any of this call's sequences.")
            t1 = time.perf_counter()
            if failed:
                out = failed[0]
                raise out.exception if out.exception is not None else RuntimeError(out.error)
            if first is None:
                if all(r.token_ids or r.finish_reason for r in results):
                    first = t1
            else:
                steps += 1
                compiled = graphs is not None and graphs.steps > before
                if steps == 1:
                    first_step, started = t1 - t0, compiled
                took_over |= compiled
            while ready:
                yield ready.popleft()
        end = time.perf_counter()
        first = end if first is None else first
        if steps == 0:
            started = graphs is not None and graphs.bucket(min(len(results), graphs.buckets[-1])) in graphs.built
        timing.update(prefill_s=first - start, decode_s=end - first, decode_steps=steps,
                      step="compiled" if started else "switched" if took_over else "eager")  # fmt: skip
        if steps:
            timing["first_step_s"] = first_step
    finally:
        for k, rid in enumerate(rids):  # an abandoned (or failed) call leaves nothing running
            if any(r.finish_reason is None for r in results[k * n : (k + 1) * n]):
                engine.abort(rid)


class TextStream:
    """The text pieces of one completion (iterate it); once done, ``completion`` and ``timing``."""

    def __init__(self, run: GenerationRun):
        self.run = run

    def __iter__(self) -> Iterator[str]:
        return (piece for _, piece in self.run)

    @property
    def completion(self) -> Completion:
        return self.run.completions[0]

    @property
    def timing(self) -> dict:
        return self.run.timing


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
def engine_config(model, compile: bool | str = False) -> EngineConfig:
    """The engine of a ``Generator``: a KV pool of ``POOL_BYTES``, but at least one full context (a
    single sequence can always run) and at most four (a small model needs no more); beyond it the
    engine queues and preempts. No queue limit: a call's prompts are all known up front."""
    block = EngineConfig.block_size
    context = model.config.max_seq_len
    tokens = min(max(POOL_BYTES // ModelRunner.kv_bytes_per_token(model), context), 4 * context)
    return EngineConfig(num_blocks=-(-tokens // block), block_size=block, max_queue=sys.maxsize, compile=bool(compile))


class Generator:
    """A model prepared for generation, with its tokenizer.

    compile=True   compiles the one-token decode step (inductor, weights frozen as constants);
                   the first call of a batch size waits for its graph, later calls do not
    compile="background"  answers at once, eagerly, while a thread compiles the decode step; it
                   takes over once ready, mid-generation (the switch is logged once)
    quantize="int8" generates with a copy whose linear layers are weight-only int8
    draft_model    a smaller model of the same vocabulary for speculative decoding (greedy only)

    Sampling runs on an ``Engine`` of its own (``engine``: built on the first call and kept, with
    its KV pool and compiled graphs); see the module's docstring for what stays on the contiguous
    cache. ``close()`` shuts the engine down.
    """

    def __init__(self, model, tokenizer=None, *, compile: bool | str = False, quantize: str | None = None,
                 draft_model=None, num_draft_tokens: int = 4):  # fmt: skip
        if model.config.arch == "encoder":
            raise PromptError("an encoder-only model cannot generate text: use a decoder or encoder-decoder checkpoint.")
        # quantising copies the weights and compiling freezes them: remember which weights those were
        self._source = (model, weights_version(model)) if compile or quantize is not None else None
        if quantize is not None:
            from lmforge.inference.quantize import quantize_model

            model = quantize_model(model, quantize)
        self.model, self.tokenizer, self.compile = model, tokenizer, compile
        self.draft_model, self.num_draft_tokens = draft_model, num_draft_tokens
        if draft_model is not None:
            if model.config.arch != "decoder" or draft_model.config.arch != "decoder":
                raise PromptError("speculative decoding needs a decoder-only target and draft model.")
            if draft_model.config.vocab_size != model.config.vocab_size:
                raise PromptError(
                    f"the draft model's vocabulary ({draft_model.config.vocab_size}) differs from the target's "
                    f"({model.config.vocab_size}): use a draft model with the same tokenizer."
                )
        # decoding runs on the engine wherever it can page the model's attention
        self.on_engine = getattr(model.config, "attention", "softmax") == "softmax"
        self._engine: Engine | None = None
        self._engine_version = 0  # weights_version of self.model when the engine was built
        # the contiguous cache's compiled step: every decode of a model off the engine
        self._step, self._background = None, None
        if compile:
            if model.config.arch != "decoder":
                raise PromptError("compile=True compiles the decoder-only decode step; encoder-decoder models run eagerly.")
            if not self.on_engine:
                self._step, self._background = (None, BackgroundStep(model)) if compile == "background" else (CompiledStep(model), None)

    @property
    def step(self):
        """The contiguous cache's compiled decode step in use (None: eager). A background compile is
        swapped in at the start of the first call after it is ready."""
        if self._step is None and self._background is not None and self._background.ready() is not None:
            self._step = self._background.ready()
            self._background.announce()
        return self._step

    @step.setter
    def step(self, value) -> None:
        self._step = value

    @property
    def engine(self) -> Engine | None:
        """The engine sampling runs on (built on first use; rebuilt, with an empty prefix cache, when
        the weights it runs on have changed), or None for a model that decodes on the contiguous cache."""
        if not self.on_engine:
            return None
        version = weights_version(self.model)
        if self._engine is not None and self._engine_version != version:
            self.close()
        if self._engine is None:
            was = self.model.training
            try:
                self._engine = Engine(self.model, self.tokenizer, engine_config(self.model, self.compile))
            finally:
                self.model.train(was)  # the engine sets eval mode; generate leaves the model as it found it
            self._engine_version = version
        return self._engine

    def close(self) -> None:
        """Shut the engine down (a graph being compiled is finished first); the next call builds another."""
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    @property
    def compiling(self) -> bool:
        """Whether a decode step is being compiled in the background."""
        if self._background is not None:
            return self._background.building
        graphs = self._engine.runner.decode_step if self._engine is not None else None
        return graphs is not None and graphs.building

    def finish_compiling(self) -> None:
        """Wait until the background compile is done (a compile cut off at exit is lost)."""
        if self._background is not None:
            self._background.wait()
            return
        graphs = self._engine.runner.decode_step if self._engine is not None else None
        while graphs is not None and graphs.building:
            graphs.thread.join()

    @property
    def stale(self) -> bool:
        """Whether the weights changed after this Generator quantised or compiled them."""
        return self._source is not None and weights_version(self._source[0]) != self._source[1]

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
            return chat_ids(tok, prompt)
        if isinstance(prompt, str):
            if not prompt:
                raise PromptError("the prompt is empty: give at least one character of text.")
            if tok is None:
                raise PromptError("a text prompt needs a tokenizer: pass one, or pass token ids.")
            return tok.encode(prompt)
        raise PromptError(f"a prompt must be text, chat messages or token ids, not {type(prompt).__name__}.")

    def _check_prompt(self, ids: list[int]) -> None:
        check_prompt(ids, self.model.config, self.context)

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        return stop_token_ids(params, self.model.config, self.tokenizer)

    def _max_new(self, prompt_len: int, params: SamplingParams) -> int:
        return token_budget(prompt_len, params.max_new_tokens, self.model.config, self.context)

    # --- generation -----------------------------------------------------------------------------
    def _check_params(self, params: SamplingParams) -> None:
        if params.stop and self.tokenizer is None:
            raise SamplingError("stop strings need a tokenizer to turn tokens into text; pass one or use stop_token_ids.", "stop")
        if params.constraint is not None:  # a grammar this tokenizer cannot serve fails here, before any work
            OutputProcessor(params, frozenset(), 1, self.tokenizer)

    def _rows(self, prompts: list[list[int]], params: SamplingParams) -> list[Row]:
        device = self.model.device
        stop_ids = self._stop_ids(params)
        rows = []
        for ids in prompts:
            for j in range(params.n):
                out = OutputProcessor(params, stop_ids, self._max_new(len(ids), params), self.tokenizer, ids)
                rows.append(Row(params, ids, make_generator(params, device, j), out))
        return rows

    def _lanes(self, prompts: list[list[int]], max_new: int, use_cache: bool, copies: int = 1, extra_slots: int = 0):
        """The cache beam search and speculative decoding run on: lanes on the engine's paged pool
        (each prompt prefilled once, its ``copies`` lanes sharing its blocks), or, for attention the
        pool cannot page and ``use_cache=False``, a contiguous runner of each prompt ``copies`` times."""
        if use_cache and self.on_engine:
            lanes = Lanes.of_engine(self.engine, prompts, copies)
            graphs = self.engine.runner.decode_step
            if graphs is not None and self.compile is True:  # compile=True: the first call of a batch size waits
                graphs.wait([lanes.batch_size])
            return lanes
        expanded = [p for p in prompts for _ in range(copies)]
        return make_runner(self.model, expanded, max_new, use_cache=use_cache, step=self.step, extra_slots=extra_slots)

    def _check_weights(self) -> None:
        if self.stale:
            raise StaleWeightsError(
                "the model's weights changed after this Generator quantised or compiled them: make a new Generator "
                "(lmforge.generate does so by itself)."
            )

    def run(self, prompts: list[list[int]], params: SamplingParams, use_cache: bool = True) -> GenerationRun:
        """Low level: generation for token-id prompts, as a ``GenerationRun`` (iterate it for the
        text pieces; its ``completions`` afterwards). Bad input raises here, before any work."""
        self._check_weights()
        for p in prompts:
            self._check_prompt(p)
        self._check_params(params)
        if self.draft_model is not None:
            from lmforge.inference.speculative import speculative_tokens

            if len(prompts) != 1 or params.n != 1 or not params.greedy or params.uses_penalties:
                raise SamplingError(
                    "speculative decoding serves one prompt, n=1, greedy (temperature=0) without penalties; "
                    "drop the draft model for batches or sampling.", "temperature",
                )
            if params.constraint is not None:
                raise SamplingError("speculative decoding does not take a json_schema, regex or grammar: drop the draft model.", "constraint")
            rows = self._rows(prompts, params)
            return GenerationRun(lambda timing, stats: speculative_tokens(self, rows[0], stats, use_cache=use_cache),
                                 lambda: [_row_completion(r) for r in rows])  # fmt: skip
        if use_cache and self.on_engine:
            return self._engine_run(prompts, params)
        rows = self._rows(prompts, params)

        def pieces(timing: dict, stats: dict) -> Iterator[tuple[int, str]]:
            max_new = max(r.out.max_new for r in rows)
            step = self.step
            pending = {"pending": self._background} if step is None and self._background is not None else {}
            runner = make_runner(self.model, [r.prompt for r in rows], max_new, use_cache=use_cache, step=step, **pending)
            try:
                yield from decode_batch(runner, rows, timing)
            finally:
                runner.close()

        return GenerationRun(pieces, lambda: [_row_completion(r) for r in rows])

    def _engine_run(self, prompts: list[list[int]], params: SamplingParams) -> GenerationRun:
        engine = self.engine
        # each prompt's budget cut to what the context leaves (the engine takes max_new_tokens as asked for)
        per_prompt = [replace(params, max_new_tokens=b) if (b := self._max_new(len(p), params)) != params.max_new_tokens
                      else params for p in prompts]  # fmt: skip
        results = [SeqResult(j) for _ in prompts for j in range(params.n)]

        def completions() -> list[Completion]:
            out = []
            for i, r in enumerate(results):
                lps = r.logprobs or []
                top = [dict(lp.top) for lp in lps] if params.logprobs else None
                out.append(Completion(r.text, r.token_ids, r.finish_reason or "length", len(prompts[i // params.n]),
                                      [lp.logprob for lp in lps], top))  # fmt: skip
            return out

        wait = bool(self.compile) and self.compile != "background"  # compile=True: the first call pays
        return GenerationRun(lambda timing, stats: _engine_pieces(engine, prompts, per_prompt, results, timing, wait),
                             completions)  # fmt: skip

    def complete(self, prompt, *, chat: bool = False, use_cache: bool = True, num_beams: int = 1,
                 length_penalty: float = 1.0, early_stopping: bool = False, **params):  # fmt: skip
        """Completion objects: one per prompt, or a list of ``n`` per prompt when n > 1."""
        sp = make_params(**params)
        items, batched = split_batch(prompt)
        prompts = [self.encode(p, chat) for p in items]
        if num_beams > 1:
            results = self._beam(prompts, sp, num_beams, length_penalty, early_stopping, use_cache)
        else:
            results = self.run(prompts, sp, use_cache).finish().completions
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

    def stream(self, prompt, *, chat: bool = False, use_cache: bool = True, **params) -> TextStream:
        """Text pieces of one completion as they are generated; each is whole UTF-8 characters,
        and together they are exactly ``generate``'s text. Bad input raises here, not mid-stream.
        Once iterated, the stream's ``completion`` and ``timing`` say what was generated and how fast."""
        sp = make_params(**params)
        items, batched = split_batch(prompt)
        if batched or sp.n != 1:
            raise PromptError("stream() follows one prompt with n=1; use generate() for batches and several samples.")
        if self.tokenizer is None:
            raise PromptError("stream() yields text and needs a tokenizer.")
        return TextStream(self.run([self.encode(items[0], chat)], sp, use_cache))

    def _beam(self, prompts, sp: SamplingParams, num_beams, length_penalty, early_stopping, use_cache):
        if sp.top_k or sp.top_p < 1 or sp.min_p or sp.uses_penalties or sp.logprobs:
            raise SamplingError("beam search ranks by log-probability: drop top_k, top_p, min_p, penalties and logprobs.")
        if sp.constraint is not None:
            raise SamplingError("beam search does not take a json_schema, regex or grammar: sample with num_beams=1.", "constraint")
        if sp.n > num_beams:
            raise SamplingError(f"n={sp.n} exceeds num_beams={num_beams}: beam search returns at most num_beams sequences.", "n")
        self._check_weights()
        for p in prompts:
            self._check_prompt(p)
        max_new = min(self._max_new(len(p), sp) for p in prompts)
        runner = self._lanes(prompts, max_new, use_cache, copies=num_beams)
        stop_ids = self._stop_ids(sp)
        try:
            best = beam_search(runner, num_beams, max_new, stop_ids, length_penalty, early_stopping, sp.n)
        finally:
            runner.close()
        results = []
        for p, hyps in zip(prompts, best):
            for tokens, score in hyps:
                # the finish rule decides where the text ends (a stop string may end it early)
                out = OutputProcessor(sp, stop_ids, max_new, self.tokenizer, p)
                for t in tokens:
                    out.accept(t)
                    if out.finish_reason is not None:
                        break
                ended = bool(tokens) and (tokens[-1] in stop_ids)
                results.append(Completion(out.text, tokens, "stop" if ended else "length", len(p), score=score))
        return results


def make_params(*, json_schema=None, regex: str | None = None, grammar: str | None = None, **params) -> SamplingParams:
    """SamplingParams from keyword arguments; ``json_schema`` / ``regex`` / ``grammar`` (Lark) constrain
    the text (compiled once per distinct spec, see ``engine/constraints.py``)."""
    unknown = sorted(set(params) - SAMPLING_FIELDS)
    if unknown:
        known = sorted(SAMPLING_FIELDS - {"constraint"} | {"json_schema", "regex", "grammar"})
        raise SamplingError(f"unknown generation parameter(s) {', '.join(unknown)}; known: {', '.join(known)}.")
    if json_schema is not None or regex is not None or grammar is not None:
        from lmforge.engine.constraints import compile_grammar

        params["constraint"] = compile_grammar(json_schema=json_schema, regex=regex, grammar=grammar)
    return SamplingParams(**params)


# --- one-call API --------------------------------------------------------------------------------
class _Prepared(dict):
    """The one-call API's Generators for one model, per (compile, quantize): kept on the model itself
    (each Generator's engine refers to the model, so a cache beside it would keep every model alive;
    on the model, the two form a cycle the garbage collector frees together). A copy of the model
    starts empty: ``owner`` says which model the Generators belong to."""

    ATTR = "_lmforge_generators"

    def __init__(self, owner=None):
        super().__init__()
        self.owner = weakref.ref(owner) if owner is not None else None

    @classmethod
    def of(cls, model) -> "_Prepared":
        found = model.__dict__.get(cls.ATTR)
        if isinstance(found, cls) and found.owner is not None and found.owner() is model:
            return found
        fresh = cls(model)
        model.__dict__[cls.ATTR] = fresh  # beside the module's own attributes; no parameter, buffer or submodule
        return fresh

    def __deepcopy__(self, memo) -> "_Prepared":
        return _Prepared()  # engines, threads and compiled graphs are not copied with a model

    def __reduce__(self):
        return _Prepared, ()  # nor pickled with it


def _generator(model, tokenizer, compile, quantize, draft_model, num_draft_tokens) -> Generator:
    """A Generator for the call. What is costly to prepare -- the quantised copy, compiled graphs, the
    engine with its KV pool and prefix cache -- is kept per model, options and tokenizer, so it
    happens once per version of the weights: a Generator whose quantised or compiled weights went
    stale (training steps) is replaced; an eager one rebuilds its engine by itself."""
    prepared = _Prepared.of(model)
    key = (compile, quantize)
    g = prepared.get(key)
    if g is None or g.stale or g.tokenizer is not tokenizer:
        if g is not None:
            g.close()
        g = prepared[key] = Generator(model, tokenizer, compile=compile, quantize=quantize)
    if draft_model is None:
        return g
    spec = Generator(g.model, tokenizer, draft_model=draft_model, num_draft_tokens=num_draft_tokens)
    spec._step, spec._background = g._step, g._background  # beam search's compiled step, as without a draft
    return spec


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
