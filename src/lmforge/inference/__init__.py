"""Inference: sampling, KV-cached generation, beam search, speculative decoding, quantisation."""

from lmforge.inference.generate import Completion, Generator, PromptError, StaleWeightsError, complete, generate, stream
from lmforge.inference.sampling import IncrementalDetokenizer, SamplingError, SamplingParams

__all__ = [
    "Completion", "Generator", "IncrementalDetokenizer", "PromptError", "SamplingError", "SamplingParams", "StaleWeightsError",
    "complete", "generate", "stream",
]
