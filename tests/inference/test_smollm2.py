"""The bundled SmolLM2-135M-Instruct: greedy generation token-identical to transformers' generate
(which loads the same GGUF, dequantised), and the chat prompt of `make demo`."""

from __future__ import annotations

import pytest
import torch

from lmforge.checkpoints import default_model_path
from lmforge.inference import complete, stream

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # two 135M models and 64-token generations


@pytest.fixture(scope="module")
def models():
    from lmforge import load_model

    path = default_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return hf, load_model(path, quantize="none")  # dequantized fp32, as transformers runs it


def test_greedy_64_tokens_identical_to_transformers(models, smol_tokenizer):
    hf, ours = models
    tok = smol_tokenizer
    chat = [{"role": "user", "content": "Write a haiku about the sea."}]
    lengths = []
    for prompt in (chat, "The history of the Roman Empire"):
        ids = tok.encode(tok.apply_chat_template(chat), add_special_tokens=False) if prompt is chat else tok.encode(prompt)
        got = complete(ours, tok, prompt, max_new_tokens=64, temperature=0)
        assert got.prompt_tokens == len(ids)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, pad_token_id=2)
        theirs = out[0, len(ids) :].tolist()
        if 2 in theirs:  # both stop at eos (<|im_end|>, id 2)
            theirs = theirs[: theirs.index(2) + 1]
        assert got.token_ids == theirs
        lengths.append(len(theirs))
    assert max(lengths) == 64


def test_demo_answer_and_stream(models, smol_tokenizer):
    _, ours = models
    kw = dict(chat=True, max_new_tokens=32, temperature=0)
    c = complete(ours, smol_tokenizer, "What is the capital of France?", **kw)
    assert "Paris" in c.text and c.finish_reason == "stop"
    assert "".join(stream(ours, smol_tokenizer, "What is the capital of France?", **kw)) == c.text
