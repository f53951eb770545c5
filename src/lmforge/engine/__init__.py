"""The one decode engine: scheduler -> model runner -> sampler -> output processor.

    from lmforge.engine import Engine, EngineConfig, SamplingParams
    engine = Engine(model, tokenizer, EngineConfig(kv_cache_gb=1.0))
    results = engine.generate([prompt_ids], SamplingParams(max_new_tokens=32))  # steps inline
    engine.start()                      # or: a background thread steps it; ``stream`` is async

Parts (one file each): ``blocks`` (block manager, prefix cache), ``scheduler`` (admission,
chunked prefill, preemption), ``runner`` (model inputs, paged and contiguous caches, the compiled
step), ``sampler`` (parameters, penalties, filters, the draw), ``output`` (incremental
detokenizing, the one finish rule), ``prompt`` (the one prompt check), ``batch`` (the fixed-batch
loop over a contiguous cache, for what the engine cannot serve), ``core`` (the ``Engine``: requests
in, outputs out, one stepping thread; ``lmforge.generate`` steps it inline).
See docs/engine.md.
"""

from lmforge.engine.core import Engine, EngineConfig, QueueFullError, SeqResult, SequenceOutput, TokenLogprob
from lmforge.engine.output import IncrementalDetokenizer, OutputProcessor
from lmforge.engine.prompt import ContextLengthError, PromptError
from lmforge.engine.sampler import SamplingError, SamplingParams

__all__ = [
    "ContextLengthError", "Engine", "EngineConfig", "IncrementalDetokenizer", "OutputProcessor", "PromptError",
    "QueueFullError", "SamplingError", "SamplingParams", "SeqResult", "SequenceOutput", "TokenLogprob",
]
