"""Corpora, token shards, loaders and pretraining objectives.

    prepare(inputs, out_dir, tokenizer)   .txt/.md/.jsonl -> memory-mapped token shards + meta.json
    TokenData(dir)                        a prepared directory: .split("train"|"val"), .tokenizer()
    RandomWindows, SequentialWindows      batches of windows from a split (sequences packed with EOS)
    causal_lm, masked_lm, prefix_lm, span_corruption   the objectives (see objectives.py)
    AnswerWeights, answer_spans           per-label loss weights for the answers of a corpus format
"""

from lmforge.data.objectives import (
    IGNORE_INDEX,
    OBJECTIVES,
    AnswerWeights,
    Objective,
    answer_spans,
    causal_lm,
    make_objective,
    masked_lm,
    noise_mask,
    prefix_lm,
    reconstruct_spans,
    span_corruption,
    span_corruption_lengths,
)
from lmforge.data.prepare import (
    PRETRAIN_SPECIAL_TOKENS,
    DataError,
    SpecialIds,
    collect_files,
    iter_documents,
    prepare,
    resolve_tokenizer,
    special_ids,
    token_dtype,
)
from lmforge.data.tokens import RandomWindows, SequentialWindows, TokenData, TokenStream, generator, mix_seed

__all__ = [
    "IGNORE_INDEX", "OBJECTIVES", "AnswerWeights", "Objective", "answer_spans", "causal_lm", "make_objective", "masked_lm", "noise_mask", "prefix_lm",
    "reconstruct_spans", "span_corruption", "span_corruption_lengths", "PRETRAIN_SPECIAL_TOKENS", "DataError",
    "SpecialIds", "collect_files", "iter_documents", "prepare", "resolve_tokenizer", "special_ids", "token_dtype",
    "RandomWindows", "SequentialWindows", "TokenData", "TokenStream", "generator", "mix_seed",
]
