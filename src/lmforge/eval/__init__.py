"""Evaluation: perplexity (strided, as transformers' perplexity guide computes it), tasks, scaling laws."""

from lmforge.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
