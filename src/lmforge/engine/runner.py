"""The model runner: turns scheduled sequences into the model's inputs and runs its own forward.

Two cache layouts, one forward (the model's, with the cache behind ``Attention``):

* ``ModelRunner`` (the engine: the server, ``generate``, and through ``engine.lanes`` beam search
  and speculative decoding): many sequences of any lengths in a paged block pool; each step packs
  their new tokens into one row (``build_batch``) and returns the logits of the rows that sample.
  Encoder-decoder models run their encoder once per sequence (``encode``). ``PagedDecodeStep``
  compiles its decode-only steps.
* ``DecoderRunner`` / ``Seq2SeqRunner`` (``use_cache=False``, attention the pool cannot page):
  one fixed batch in a contiguous ``KVCache``, static shapes, so
  the one-token step can be compiled (``CompiledStep``). ``prefill()`` the prompts, then ``extend(tokens)``
  feeds new tokens and returns the next logits; ``rewind`` / ``reorder`` serve speculative decoding
  and beam search. With ``use_cache=False`` every step recomputes the whole sequence (the baseline
  the cache is measured against, and the reference it is tested against).

Contiguous batches are left-padded: the attention mask covers the cache slots and positions count
only real tokens (``cumsum(mask) - 1``), so a prompt gets the same tokens alone or in a batch.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import os
import platform
import threading
import time
import types
import warnings
from collections.abc import Sequence

import torch

from lmforge.nn.kv_cache import Chunk, PagedBatch, PagedKVCache

log = logging.getLogger("lmforge.engine")
# torch's own deprecation notices from inside export and max-autotune, printed on a user's terminal
# mid-reply by the background compile: nothing a user of lmforge can act on
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning,
                        module=r"torch\._inductor\.select_algorithm")  # fmt: skip


# --- the paged runner ----------------------------------------------------------------------------
def _slots(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def build_batch(
    pool: PagedKVCache,
    decodes: list[tuple[list[int], int, int]],  # (block table, position, token) per decoding sequence
    prefills: list[tuple[list[int], int, list[int]]],  # (block table, start, tokens) per prefill chunk
    logit_rows: list[int],
    device=None,
    cross: list | None = None,  # encoder-decoder: per segment (decodes, then chunks), per layer (K, V)
) -> PagedBatch:
    """Pack one step's decodes and prefill chunks into a ``PagedBatch`` over ``pool``."""
    bs = pool.block_size
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    ctx_slots: list[list[int]] = []
    for table, pos, tok in decodes:
        ids.append(tok)
        positions.append(pos)
        s = _slots(table, 0, pos + 1, bs)
        slots.append(s[-1])
        ctx_slots.append(s)
    decode_slots = decode_lens = None
    if decodes:
        L = max(len(s) for s in ctx_slots)
        decode_lens = torch.tensor([len(s) for s in ctx_slots], device=device)
        decode_slots = torch.tensor([s + [0] * (L - len(s)) for s in ctx_slots], device=device)  # (B, L)
    chunks: list[Chunk] = []
    for table, start, toks in prefills:
        offset, n = len(ids), len(toks)
        ids.extend(toks)
        positions.extend(range(start, start + n))
        s = _slots(table, 0, start + n, bs)
        slots.extend(s[start:])
        chunks.append(Chunk(offset, n, start, None if start == 0 else torch.tensor(s, device=device)))
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return PagedBatch(
        pool=pool, input_ids=as_long(ids), positions=as_long(positions), slots=as_long(slots),
        num_decodes=len(decodes), decode_slots=decode_slots, decode_lens=decode_lens, chunks=chunks,
        logit_rows=as_long(logit_rows), cross=cross,
    )  # fmt: skip


@torch.inference_mode()
def run_paged(model, batch: PagedBatch) -> torch.Tensor:
    """Logits (S, V) of ``batch.logit_rows``, after writing every new token's K/V to the pool:
    the model's own forward over the packed row."""
    ids = batch.input_ids[None]  # (1, N)
    if model.config.arch == "encoder-decoder":
        return model.decode(ids, None, paged=batch)[0]
    return model(ids, position_ids=batch.positions[None], paged=batch)[0]


class ModelRunner:
    """A model and the paged KV pool of the serving engine."""

    def __init__(self, model, num_blocks: int, block_size: int, decode_step: "PagedDecodeStep | None" = None):
        cfg = model.config
        self.model, self.device = model, model.device
        self.encoder_decoder = cfg.arch == "encoder-decoder"
        n_layer = cfg.n_decoder_layer if self.encoder_decoder else cfg.n_layer
        # one block more than the block manager hands out: the compiled step's padding rows write there
        self.pool = PagedKVCache(n_layer, self.local_kv_heads(model), cfg.head_dim, num_blocks + 1, block_size, model.dtype,
                                 model.device)  # fmt: skip
        self.scratch_slot = num_blocks * block_size
        self.decode_step = decode_step
        if decode_step is not None:
            decode_step.start(self)

    @staticmethod
    def local_kv_heads(model) -> int:
        """K/V heads this process caches: all of them, or its share under tensor parallelism."""
        return model.config.n_kv_head // getattr(model, "tensor_parallel", 1)

    @classmethod
    def kv_bytes_per_token(cls, model) -> int:
        cfg = model.config
        n_layer = cfg.n_decoder_layer if cfg.arch == "encoder-decoder" else cfg.n_layer
        return PagedKVCache.bytes_per_token(n_layer, cls.local_kv_heads(model), cfg.head_dim, model.dtype)

    def start_tokens(self, prompt: list[int]) -> list[int]:
        """The tokens the cache holds before the first generated one: the prompt, or for an
        encoder-decoder the decoder's start token (the prompt goes to the encoder)."""
        if not self.encoder_decoder:
            return list(prompt)
        cfg = self.model.config
        return [cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id or 0]

    @torch.inference_mode()
    def encode(self, prompt: list[int]):
        """Encoder-decoder: the encoder's output as each decoder layer's cross-attention K/V."""
        memory = self.model.encode(torch.tensor([prompt], device=self.device))
        return self.model.cross_kv(memory)

    def execute(self, decodes, prefills, logit_rows: list[int], cross: list | None = None) -> torch.Tensor:
        """One forward over the step's decodes and prefill chunks (see ``build_batch``). A step of
        decodes only runs the compiled decode step once it is ready for that batch size."""
        step = self.decode_step
        if step is not None and decodes and not prefills and cross is None and step.ready(len(decodes)):
            return step.run(self, decodes)[logit_rows]
        batch = build_batch(self.pool, decodes, prefills, logit_rows, self.device, cross)
        return run_paged(self.model, batch)


def _paged_decode(model, pool, ids, positions, slots, decode_slots, decode_lens):
    """Next-token logits (B, V) of B decoding sequences, one token each, over the paged pool."""
    batch = PagedBatch(pool=pool, input_ids=ids, positions=positions, slots=slots, num_decodes=ids.shape[0],
                       decode_slots=decode_slots, decode_lens=decode_lens, always_mask=True)  # fmt: skip
    return model(ids[None], position_ids=positions[None], paged=batch)[0]


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class PagedDecodeStep:
    """The serving engine's decode step, compiled: a step whose sequences all decode one token
    (the common step once prompts are in) runs one inductor graph per batch bucket (1, 2, 4, .. up to
    the engine's max_num_seqs; a batch is padded up to its bucket with rows that write a scratch slot),
    with the context length a dynamic size, so a handful of graphs serve every step.

    Graphs are built in a background thread while the engine keeps stepping eagerly: bucket 1 at
    once, then each bucket the first time a decode batch of its size arrives (only the sizes the
    traffic uses are compiled; a compile takes a minute or more on a 2-core CPU, seconds from the
    disk cache). Weights are frozen into the graphs as constants (quantized: int4/int8 kernels).
    The thread lives only while buckets are queued (a later bucket starts a new one), so an engine
    nobody shuts down -- a ``Generator``'s -- leaves no thread behind to hold up the interpreter's exit.

    Each graph is an AOTInductor package in ``$LMFORGE_CACHE/decode-graphs``, keyed by the model's
    code, structure and a content hash of its weights (frozen graphs hold the weights), the pool's
    shape, the bucket and the compiler set-up, so a second start loads it in about a second. (A
    ``torch.compile`` graph cannot be: torch's AOT autograd cache refuses frozen graphs, so every
    start would trace the model and freeze its weights again, ~20 s for SmolLM2.) A model that
    ``torch.export`` cannot take gets the ``torch.compile`` graph instead, and so do the buckets above
    1 of a model with float weights, where inductor's MKL-packed linear measured faster (``ahead``).
    """

    def __init__(self, model, max_batch: int = BATCH_BUCKETS[-1]):
        from lmforge.inference.quantize import Int8Linear, is_quantized

        self.cache_dir = os.path.join(use_disk_cache(), "decode-graphs")
        self.model = model
        self.buckets = tuple(b for b in BATCH_BUCKETS if b < max_batch) + (max_batch,)
        self.steps = 0  # decode steps run on a compiled graph
        # int8 weights: max-autotune's weight-only-int8 GEMM template (aten's kernel is far slower there)
        int8 = any(isinstance(m, Int8Linear) for m in model.modules())
        self.mode = "max-autotune-no-cudagraphs" if int8 else "default"
        self.fn = compile_decode_step(_paged_decode, fullgraph=True, dynamic=False, mode=self.mode)
        # AOTInductor graphs per bucket; export traces a copy of the model that shares its tensors,
        # so swapping fake tensors into it leaves the model the engine runs eagerly alone (made here:
        # copying a module while the engine's thread sets it up fails)
        self.graphs: dict[int, object] = {}
        self.loaded: set[int] = set()  # buckets whose graph came from the disk cache
        self._aot_error: BaseException | None = None  # export or AOTInductor failed: torch.compile graphs
        # Float linear weights are exported stored input-major (``input_major_twin``: W.t() contiguous): a
        # package multiplies them with plain ``mm``, which streams the row-major layout ~20% slower (SmolLM2
        # fp32, batch 1, 2 threads: 33.4 ms a step as stored, 26.1 input-major; torch.compile's graph,
        # whose MKL-packed linear a package does not get, 27.4). At batch 8 the packed linear wins (52.6
        # against 56.0 ms), so a float model's larger buckets stay torch.compile graphs (``ahead``).
        # Quantized layers keep their packed int4/int8 kernels in a package at every bucket.
        self.input_major = not is_quantized(model)
        self._shadow = input_major_twin(model) if self.input_major else sharing_copy(model)
        self._weights_key: str | None = None  # computed once, in the builder thread
        self.max_ctx = max(2, model.config.max_seq_len)  # the longest context a graph takes
        self.built: set[int] = set()
        self._warm: set[int] = set()  # buckets that have run a real step (see _call)
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None  # the latest builder thread
        self._runner: "ModelRunner | None" = None
        self._wanted: list[int] = [self.buckets[0]]  # buckets to compile, in order
        self._cv = threading.Condition()
        self._building = False  # a builder thread is running (it ends once nothing is queued)
        self._stopping = False
        self._started = 0.0
        self.first_built_s = 0.0  # seconds from start to the first graph

    def ahead(self, b: int) -> bool:
        """Whether bucket ``b``'s graph is an AOTInductor package (else a torch.compile graph)."""
        return not self.input_major or b == 1

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def ready(self, n: int) -> bool:
        """Whether n decoding sequences can take a compiled graph; if their bucket has none yet,
        it is queued for the background thread."""
        b = self.bucket(n)
        if b is None or self.error is not None:
            return False
        if b in self.built:
            return True
        with self._cv:
            if b not in self._wanted:
                self._wanted.append(b)
                self._spawn()
        return False

    def start(self, runner: "ModelRunner") -> None:
        self._runner, self._started = runner, time.perf_counter()
        with self._cv:
            self._spawn()

    def _spawn(self) -> None:
        """Start a builder thread unless one is running (call with ``_cv`` held)."""
        if self._building or self._stopping or self._runner is None or self.error is not None:
            return
        # not a daemon: a compile cut off at interpreter exit aborts the process; ``stop`` ends the
        # thread after the graph in progress (whose artifacts then stay in the disk cache)
        self._building = True
        self.thread = threading.Thread(target=self._build, args=(self._runner,), name="lmforge-paged-compile")
        self.thread.start()

    @property
    def building(self) -> bool:
        """Whether a builder thread is running (compiling a graph, or about to)."""
        return self._building

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            if self._wanted and self.error is None and self._building:
                log.info("finishing the decode graph being compiled, so the next start finds it in the disk cache "
                         "(Ctrl-C again skips it)")  # fmt: skip

    @property
    def pending(self) -> int:
        """Buckets queued or being compiled."""
        return len(self._wanted)

    def wait(self, buckets: Sequence[int], timeout: float | None = None) -> bool:
        """Queue ``buckets`` and wait until they are built; False on timeout, failure or ``stop``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for b in buckets:
            self.ready(b)

        def done() -> bool:
            return all(self.bucket(b) in self.built for b in buckets)

        while not done():
            if not self._building:  # failed, stopped, or (a bucket is built before its thread ends) just done
                return done()
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def _build(self, runner: "ModelRunner") -> None:
        while True:
            with self._cv:
                if self._stopping or not self._wanted:
                    self._building = False
                    return
                b = self._wanted[0]
            try:
                # a warm-up of padding rows only: they write the scratch slot, which no sequence uses
                zeros = lambda: torch.zeros(b, dtype=torch.long, device=runner.device)  # noqa: E731
                slots = torch.full((b,), runner.scratch_slot, dtype=torch.long, device=runner.device)
                ctx = torch.full((b, 2), runner.scratch_slot, dtype=torch.long, device=runner.device)
                t0 = time.perf_counter()
                if self._aot_error is None and self.ahead(b):
                    try:
                        self._aot_graph(runner, b)
                    except Exception as e:  # noqa: BLE001 - the torch.compile graph instead; say why
                        self._aot_error = e
                        log.info("the decode step cannot be compiled ahead of time (%s: %s); compiling it with "
                                 "torch.compile, which a next start redoes", type(e).__name__, e)  # fmt: skip
                self._call(runner, zeros(), zeros(), slots, ctx, torch.ones(b, dtype=torch.long, device=runner.device))
            except Exception as e:  # noqa: BLE001 - decoding stays eager; say why
                self.error = e
                log.warning("compiling the paged decode step failed (%s: %s); decode steps stay eager", type(e).__name__, e)
                with self._cv:
                    self._building = False
                return
            self.built.add(b)
            with self._cv:
                self._wanted.remove(b)
            if len(self.built) == 1:  # said when a step first runs on it (a graph nobody used is no switch)
                self.first_built_s = time.perf_counter() - self._started
            else:
                log.info("%s the decode graph for batches of up to %d sequences (%.0f s)",
                         "loaded" if b in self.loaded else "compiled", b, time.perf_counter() - t0)  # fmt: skip

    def _call(self, runner, ids, positions, slots, ctx_slots, ctx_lens, warm: bool = False) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        graph = self.graphs.get(ids.shape[0])
        if graph is not None:
            if ctx_slots.shape[1] <= self.max_ctx:
                pool = runner.pool
                with torch.inference_mode():  # the package's runner, without its per-call pytree round trip
                    return graph.loader.boxed_run([*pool.k, *pool.v, ids, positions, slots, ctx_slots, ctx_lens])[0]
            warm = False  # longer than the package takes: torch.compile's graph, compiled here on first use
        torch._dynamo.mark_dynamic(ctx_slots, 1)  # the context grows each step: one graph for every length
        if warm and not self._building:
            # A bucket that has run once passes every guard dynamo checks (the same pool and model,
            # the same shapes but the dynamic context length), so skip them: ~1 ms a token at batch 1.
            # Only while no builder thread compiles: the stance is process-wide, and a compile that
            # looked its frame up under it could take another bucket's graph. Builders are started
            # from the engine's thread, the one calling here, so none starts during this call.
            with torch.inference_mode(), torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self.fn(self.model, runner.pool, ids, positions, slots, ctx_slots, ctx_lens)
        quiet = dict(autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)
        # the engine's thread runs ready buckets while this one compiles the next: dynamo compiles under
        # its own lock, and a graph's warm-up writes only the scratch slot, which no sequence uses
        with torch.inference_mode(), inductor_config.patch(freezing=True, cpp_wrapper=True, **quiet):
            return self.fn(self.model, runner.pool, ids, positions, slots, ctx_slots, ctx_lens)

    def _aot_graph(self, runner: "ModelRunner", b: int) -> None:
        """Load bucket ``b``'s AOTInductor graph from the disk cache, or export, compile and store it."""
        import torch._inductor

        if self._weights_key is None:
            self._weights_key = _weights_digest(self.model)
        key = _graph_key(self.model, runner.pool, b, self.max_ctx, self.mode + ("/input-major" if self.input_major else ""))
        path = os.path.join(self.cache_dir, f"{key}-{self._weights_key}.pt2")
        if os.path.exists(path):
            try:
                self.graphs[b] = _load_package(path, self._shadow)
                self.loaded.add(b)
                os.utime(path)  # recently used: the size cap (``_prune``) removes the least recently used first
                return
            except Exception as e:  # noqa: BLE001 - a damaged file: compile it again
                log.warning("the cached decode graph %s does not load (%s: %s); compiling it again", path, type(e).__name__, e)
        pool = runner.pool
        module = _AheadStep(self._shadow, pool)
        L = torch.export.Dim("ctx", min=2, max=self.max_ctx)
        full = lambda n, v: torch.full(n, v, dtype=torch.long, device=runner.device)  # noqa: E731
        args = (pool.k, pool.v, full((b,), 0), full((b,), 0), full((b,), runner.scratch_slot),
                full((b, min(16, self.max_ctx)), runner.scratch_slot), full((b,), 1))  # fmt: skip
        dims = ([None] * len(pool.k), [None] * len(pool.v), None, None, None, {1: L}, None)
        with torch.inference_mode():
            ep = torch.export.export(module, args, dynamic_shapes=dims, strict=False)
        from lmforge.nn.kv_cache import KVCache

        caches = tuple(f"model.{n}." for n, m in self._shadow.named_modules() if isinstance(m, KVCache))
        held = [*ep.graph_signature.lifted_tensor_constants, *ep.graph_signature.inputs_to_buffers.values()]
        if caches and any(n.startswith(caches) for n in held):  # state the weights' hash leaves out
            raise RuntimeError("the decode graph reads a contiguous KV cache")
        options = dict(torch._inductor.list_mode_options(self.mode), freezing=True,
                       autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)  # fmt: skip
        os.makedirs(self.cache_dir, exist_ok=True)
        tmp = os.path.join(self.cache_dir, f".{key}-{os.getpid()}-{threading.get_ident()}.pt2")
        try:
            torch._inductor.aoti_compile_and_package(ep, package_path=tmp, inductor_configs=options)
            os.replace(tmp, path)  # whole or absent, for a process starting beside this one
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        _prune(self.cache_dir, key, path)
        _drop_build_copy(path)
        self.graphs[b] = _load_package(path, self._shadow)

    def run(self, runner: "ModelRunner", decodes) -> torch.Tensor:
        """Logits (n, V) of n decoding sequences: (block table, position, token) each."""
        n, bs = len(decodes), runner.pool.block_size
        b = self.bucket(n)
        ctx = [_slots(table, 0, pos + 1, bs) for table, pos, _ in decodes]
        L = max(2, max(len(c) for c in ctx))
        pad = b - n
        dev = runner.device
        ids = torch.tensor([t for _, _, t in decodes] + [0] * pad, dtype=torch.long, device=dev)
        positions = torch.tensor([pos for _, pos, _ in decodes] + [0] * pad, dtype=torch.long, device=dev)
        slots = torch.tensor([c[-1] for c in ctx] + [runner.scratch_slot] * pad, dtype=torch.long, device=dev)
        ctx_slots = torch.tensor([c + [0] * (L - len(c)) for c in ctx] + [[runner.scratch_slot] * L] * pad,
                                 dtype=torch.long, device=dev)  # fmt: skip
        ctx_lens = torch.tensor([len(c) for c in ctx] + [1] * pad, dtype=torch.long, device=dev)
        if self.steps == 0:
            log.info("decode steps switch to compiled graphs (the first built in the background in %.0f s)", self.first_built_s)
        self.steps += 1
        logits = self._call(runner, ids, positions, slots, ctx_slots, ctx_lens, warm=b in self._warm)
        self._warm.add(b)  # run once in this thread with the guards checked
        return logits[:n]


class _AheadStep(torch.nn.Module):
    """``_paged_decode`` as a module for ``torch.export``: the pool's K/V tensors are inputs (written in
    place), the model's tensors constants."""

    def __init__(self, model, pool: PagedKVCache):
        super().__init__()
        self.model, self.pool = model, copy.copy(pool)

    def forward(self, k, v, ids, positions, slots, ctx_slots, ctx_lens):
        self.pool.k, self.pool.v = k, v
        return _paged_decode(self.model, self.pool, ids, positions, slots, ctx_slots, ctx_lens)


_GRAPH_KEY_VERSION = 1
_source_digest_value: str | None = None


def _source_digest() -> str:
    """A hash of lmforge's Python source: the model code a cached graph was traced from."""
    global _source_digest_value
    if _source_digest_value is None:
        import lmforge

        h, root = hashlib.sha256(), os.path.dirname(os.path.abspath(lmforge.__file__))
        for d, dirs, files in os.walk(root):
            dirs.sort()
            for f in sorted(files):
                if f.endswith(".py"):
                    with open(os.path.join(d, f), "rb") as fh:
                        h.update(os.path.relpath(os.path.join(d, f), root).encode() + b"\0" + fh.read() + b"\0")
        _source_digest_value = h.hexdigest()
    return _source_digest_value


def _weights_digest(model) -> str:
    """A content hash of every tensor the model holds (parameters, buffers, plain tensor attributes),
    with names, dtypes, shapes and which are one tensor (tied): a frozen graph holds their values.
    Contiguous KV caches (``KVCache`` modules: state, not weights; ``_aot_graph`` checks that a graph
    reads none) are left out. ~0.1 s for SmolLM2's 200 MB."""
    from lmforge.nn.kv_cache import KVCache

    h, seen = hashlib.sha256(), {}
    for prefix, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, KVCache):
            continue
        own = itertools.chain(mod.named_parameters(recurse=False), mod.named_buffers(recurse=False),
                              ((k, v) for k, v in vars(mod).items() if isinstance(v, torch.Tensor)))  # fmt: skip
        for name, t in own:
            h.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)}:{t.device.type};".encode())
            if id(t) in seen:  # tied
                h.update(f"={seen[id(t)]};".encode())
                continue
            seen[id(t)] = f"{prefix}.{name}"
            data = t.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                h.update(memoryview(data.view(torch.uint8).numpy()))
    return h.hexdigest()[:32]


def _graph_key(model, pool: PagedKVCache, b: int, max_ctx: int, mode: str) -> str:
    """What a decode graph depends on besides the weights' values: torch and lmforge's code, the model's
    structure and configuration, the pool's shape, the bucket and the compiler's target."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    parts = [_GRAPH_KEY_VERSION, torch.__version__, torch.version.git_version, _source_digest(), repr(model),
             repr(model.config), len(pool.k), tuple(pool.k[0].shape), pool.k[0].dtype, pool.k[0].device.type,
             b, max_ctx, mode, platform.machine(), str(pick_vec_isa()), torch.get_num_threads()]  # fmt: skip
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


DECODE_CACHE_GB = 4.0  # default cap of $LMFORGE_CACHE/decode-graphs (LMFORGE_DECODE_CACHE_GB)


def _prune(cache_dir: str, key: str, keep: str) -> None:
    """Drop the packages of ``key`` (one model and bucket) for other weights but the newest one (a
    package holds its weights: ~235 MB for SmolLM2), then the least recently used packages of any key
    (other models, lmforge or torch versions) while the folder holds more than
    ``LMFORGE_DECODE_CACHE_GB`` (default 4). ``keep``, the package just written, always stays."""
    try:
        others = sorted((e for e in os.scandir(cache_dir) if e.name.startswith(key + "-") and e.path != keep),
                        key=lambda e: e.stat().st_mtime)  # fmt: skip
        for e in others[:-1]:
            os.remove(e.path)
        cap = float(os.environ.get("LMFORGE_DECODE_CACHE_GB") or DECODE_CACHE_GB) * 2**30
        files = sorted((e for e in os.scandir(cache_dir) if e.name.endswith(".pt2") and not e.name.startswith(".")),
                       key=lambda e: e.stat().st_mtime)  # fmt: skip
        total = sum(e.stat().st_size for e in files)
        for e in files:
            if total <= cap:
                break
            if e.path != keep:
                total -= e.stat().st_size
                os.remove(e.path)
    except (OSError, ValueError) as e:
        log.debug("pruning the decode graph cache failed: %s", e)


def _load_package(path: str, model):
    """An AOTInductor package of ``_AheadStep`` that reads ``model``'s tensors (the exported one: the
    engine's model, or its input-major twin) wherever it holds one as it is (what it folded, e.g.
    packed weights, stays its own): the same values, as the weights' hash in the package's name says. On its own copies the step was ~5% slower than
    torch.compile's graph (SmolLM2, 1 thread: 12.2 vs 11.5 ms); on the model's, ~5% faster (10.5 vs 11.1)."""
    import torch._inductor

    graph = torch._inductor.aoti_load_package(path)
    own = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    shared = {f: own[f[6:]] for f in graph.get_constant_fqns() if f.startswith("model.") and f[6:] in own}
    graph.load_constants(shared, check_full_update=False, user_managed=True)  # the model keeps them alive
    return graph


def _drop_build_copy(package: str) -> None:
    """Delete the shared library AOTInductor left in its build folder under inductor's cache: the
    package holds a copy, and each is as large as the weights it embeds."""
    import glob
    import zipfile

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    try:
        with zipfile.ZipFile(package) as z:
            names = [os.path.basename(n) for n in z.namelist() if n.endswith(".wrapper.so")]
        for name in names:
            for f in glob.glob(os.path.join(cache_dir(), "*", name)):
                os.remove(f)
    except (OSError, zipfile.BadZipFile) as e:
        log.debug("removing AOTInductor's build copy failed: %s", e)


# --- the contiguous runners --------------------------------------------------------------------
def _decode_step(model, ids, position_ids, input_pos, mask):
    """Next-token logits (B, V) for one new token per row, through the KV cache."""
    h = model.hidden(ids, attention_mask=mask, position_ids=position_ids, input_pos=input_pos)
    return model.lm_head(h[:, -1])


def compile_decode_step(fn=_decode_step, **compile_kwargs):
    """``torch.compile`` of a decode step function (``fn``) with its own code object.

    Dynamo keeps compiled graphs on the code object, and inductor's freezing bakes the weights into
    them as constants; with a shared code object, a second model of the same shapes would pass the
    guards and run on the first model's weights. A copy of the code per compiled model keeps
    each graph to its own model.
    """
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_compile_ids)}")
    return torch.compile(types.FunctionType(code, fn.__globals__, code.co_name), **compile_kwargs)


_compile_ids = iter(range(1 << 62))
CACHE_BUCKET = 256  # compiled decoding rounds cache sizes up to a multiple of this


class DecoderRunner:
    """A decoder-only model and its KV cache for a batch of left-padded prompts.

    Cache slot s holds padded position s; ``slot_mask`` (B, max_len) is False on padding. With
    ``use_cache=False`` every step runs the model over the whole sequence again (the baseline the
    cache is measured against, and the reference it is tested against).
    """

    def __init__(self, model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, use_cache: bool = True,
                 step=None, extra_slots: int = 0, pending: "BackgroundStep | None" = None):  # fmt: skip
        self.model, self.use_cache, self.step = model, use_cache, step or _decode_step
        device = model.device
        lens = torch.tensor([len(p) for p in prompts], device=device)
        B, T = len(prompts), int(lens.max())
        self.batch_size, self.prompt_len = B, T
        self.max_len = T + max_new_tokens + extra_slots
        if isinstance(step, CompiledStep):  # compiled: a few cache sizes, so a few graphs serve every call
            bucket = max(step.min_len, -(-self.max_len // CACHE_BUCKET) * CACHE_BUCKET)
            self.max_len = max(self.max_len, min(bucket, model.config.max_seq_len))
        # a step compiling in the background can take over mid-generation if the cache has its shape
        self.pending = pending if pending is not None and B == 1 and use_cache and self.max_len <= pending.warm_len else None
        if self.pending is not None:
            self.max_len = pending.warm_len
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

    def take_compiled_step(self) -> bool:
        """If the background step is ready, continue on it: the cache moves into the step's own
        buffers of this shape (those its graph was compiled for). True when it switched."""
        pending = self.pending
        step = pending.ready() if pending is not None else None
        if step is None:
            return False
        self.pending = None
        key = (self.batch_size, self.max_len)
        if key not in step.caches:
            return False
        pending.announce()
        with torch.inference_mode():
            for new, old in zip(step.caches[key], self.model.stack.caches):
                new.k.copy_(old.k)
                new.v.copy_(old.v)
        self.model.stack.caches, self.step = step.caches[key], step
        return True

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
        _reorder(self, self.model.stack.caches, index)

    def close(self) -> None:
        if self.use_cache:
            self.model.clear_cache()


def _reorder(runner, caches, index: torch.Tensor) -> None:
    """Reorder a contiguous runner's rows: its caches', or (no cache) its token sequences."""
    if runner.use_cache:
        for cache in caches:
            cache.reorder(index)
    else:
        runner.seq = runner.seq[index]


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
        # self-attention, and cross-attention: the memory of the source each row now belongs to
        caches = [*self.model.decoder.caches, *self.model.decoder.cross_caches] if self.use_cache else []
        _reorder(self, caches, index)

    close = DecoderRunner.close


def make_runner(model, prompts, max_new_tokens, **kw):
    cls = Seq2SeqRunner if model.config.arch == "encoder-decoder" else DecoderRunner
    return cls(model, prompts, max_new_tokens, **kw)


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

    def __init__(self, model, min_len: int = 0):
        from lmforge.inference.quantize import Int8Linear

        use_disk_cache()
        self.min_len = min_len  # runners size their cache at least this (the shape compiled ahead)
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
        # max-autotune keeps its kernel timing table and its "Autotune Choices Stats" JSON off the user's terminal
        quiet = dict(autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)
        with inductor_config.patch(freezing=fn is self.matrix_fn, cpp_wrapper=True, **quiet):
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


def use_disk_cache() -> str:
    """Keep inductor's compiled artifacts (FX graph and AOT caches) in a stable directory,
    ``$LMFORGE_CACHE`` or ~/.cache/lmforge, so a second start loads the step instead of compiling it
    (unless TORCHINDUCTOR_CACHE_DIR was set to another directory); returns that root."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    root = os.environ.get("LMFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmforge")
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):  # not chosen by the user
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor")

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return root


def sharing_copy(model):
    """Another module object with the very same parameters and buffers (own cache attributes)."""
    return copy.deepcopy(model, {id(t): t for t in itertools.chain(model.parameters(), model.buffers())})


class BackgroundStep:
    """A ``CompiledStep`` built in a background thread while the caller decodes eagerly.

    The thread compiles the batch-1 step on a copy of the model that shares its weights (so the
    eager decoding beside it keeps its own cache), with a cache of ``warm_len`` slots; runners then
    size their caches to at least that, so the graph compiled here is the one they use. ``ready()``
    is the step once compiled, else None; a failure leaves decoding eager (logged)."""

    def __init__(self, model, warm_len: int | None = None):
        self.warm_len = min(warm_len or 4 * CACHE_BUCKET, model.config.max_seq_len)
        self.step = CompiledStep(model, min_len=self.warm_len)
        self.error: BaseException | None = None
        self.seconds: float | None = None
        self._done = threading.Event()
        self._announced = False
        # not a daemon: a compile cut off at interpreter exit aborts the process; the exit waits for it
        # instead, which also leaves the artifacts in the disk cache for the next start
        # the copy is made here, not in the thread: the caller's decoding sets up caches on ``model``
        # right away, and copying a module while another thread changes it fails
        # ("dictionary changed size during iteration", seen on a cold start of `make demo`)
        self.thread = threading.Thread(target=self._build, args=(sharing_copy(model),), name="lmforge-compile")
        self.thread.start()

    def _build(self, shadow) -> None:
        start = time.perf_counter()
        try:
            runner = DecoderRunner(shadow, [[0]], self.warm_len - 1, step=self.step)
            runner.prefill()
            runner.extend(torch.zeros(1, 1, dtype=torch.long, device=shadow.device))  # compiles (or loads) the graph
            self.seconds = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - decoding stays eager; say why
            self.error = e
            if not threading.main_thread().is_alive():  # cut off by the interpreter's exit: nothing to report
                return
            log.warning("compiling the decode step in the background failed (%s: %s); decoding stays eager",
                        type(e).__name__, e)  # fmt: skip
        finally:
            self._done.set()

    def announce(self) -> None:
        """Log the switch to the compiled step, once."""
        if not self._announced:
            self._announced = True
            log.info("switched to the compiled decode step (built in the background in %.0f s)", self.seconds)

    def ready(self) -> CompiledStep | None:
        return self.step if self._done.is_set() and self.error is None else None

    @property
    def building(self) -> bool:
        return not self._done.is_set()

    def wait(self, timeout: float | None = None) -> CompiledStep | None:
        self._done.wait(timeout)
        return self.ready()
