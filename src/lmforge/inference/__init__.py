"""Inference: ``generate`` / ``stream`` / ``complete`` (synchronous clients of ``lmforge.engine``),
beam search, speculative decoding, quantisation."""

from lmforge.engine.output import IncrementalDetokenizer
from lmforge.engine.prompt import PromptError
from lmforge.engine.sampler import SamplingError, SamplingParams
from lmforge.inference.generate import (
    Completion,
    GenerationRun,
    Generator,
    StaleWeightsError,
    TextStream,
    complete,
    generate,
    stream,
)

__all__ = [
    "Completion", "GenerationRun", "Generator", "IncrementalDetokenizer", "PromptError", "SamplingError",
    "SamplingParams", "StaleWeightsError", "TextStream", "complete", "generate", "stream",
]
