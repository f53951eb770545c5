"""The bundled SmolLM2 GGUF as loaded by default (Q4_1 in the int4 kernel, the Q8_0 head in int8)
scores WikiText-2 within 1% of the dequantized fp32 model (the full 64k-token figure is in
docs/quantization.md, from benchmarks/quantized_perplexity.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.eval.perplexity import perplexity

WIKITEXT = Path(__file__).resolve().parents[2] / "../shared/data/wikitext2-test.txt"
pytestmark = pytest.mark.slow  # two 135M models over 2k tokens


@pytest.mark.skipif(not WIKITEXT.exists(), reason="needs ../shared/data/wikitext2-test.txt")
def test_default_quantized_path_is_within_one_percent_of_fp32(smol_tokenizer):
    from lmforge import load_model
    from lmforge.inference.quantize import Int4Linear, Int8Linear

    ids = smol_tokenizer.encode(WIKITEXT.read_text(encoding="utf-8")[:20_000])[:2048]
    fp32 = load_model(quantize="none")
    quant = load_model()  # the default: quantize="auto"
    assert isinstance(quant.stack.layers[0].mlp.up, Int4Linear) and isinstance(quant.lm_head, Int8Linear)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref = perplexity(fp32, ids, context=512, stride=256).ppl
        got = perplexity(quant, ids, context=512, stride=256).ppl
    finally:
        torch.set_num_threads(threads)
    assert 5 < ref < 60, ref  # a sane figure for a 135M model, so the comparison means something
    assert abs(got / ref - 1) < 0.01, (got, ref)
