"""Preference data and response log-probs: chat rendering matches the template, batched masked
log-probs equal a plain full forward, row by row."""

from __future__ import annotations

import torch

from lmforge.align.logprobs import pack, response_logprobs
from lmforge.align.pairs import encode_prompt, encode_response, fit, read_pairs
from lmforge.checkpoints import load_model
from lmforge.tokenizer import load_tokenizer
from rl_helpers import smollm2_tokenizer_dir, tiny_model_dir, write_jsonl


def test_chat_rendering_is_the_templates_assistant_turn(tmp_path):
    tok = load_tokenizer(smollm2_tokenizer_dir())
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    p, r = encode_prompt(tok, prompt), encode_response(tok, prompt, "Hello there.")
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "Hello there."}], add_generation_prompt=False)
    assert tok.decode(p + r) == full.rstrip()
    assert r[-1] == tok.eos_id  # <|im_end|>: the model learns to stop
    text_p = encode_prompt(tok, "Hi!", chat=False)
    assert encode_response(tok, "Hi!", "Yo", chat=False)[-1] == tok.eos_id and tok.decode(text_p).endswith("Hi!")


def test_fit_keeps_the_end_of_the_prompt_and_the_start_of_the_response():
    p, r = fit(list(range(10)), list(range(100, 110)), 12)
    assert p == list(range(4, 10)) and r == list(range(100, 106)) and len(p) + len(r) == 12
    assert fit([1, 2], [3], 5) == ([1, 2], [3])


def test_batched_response_logprobs_equal_a_full_forward():
    model = load_model(tiny_model_dir("llama"))
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    responses = [[20, 21], [22, 23, 24, 25], [26]]
    batch = pack(prompts, responses, pad_id=2)
    with torch.no_grad():
        got = response_logprobs(model, batch)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            logits = model(torch.tensor([p + r]))[0].log_softmax(-1)  # (T, V)
            want = torch.stack([logits[len(p) - 1 + j, t] for j, t in enumerate(r)])
            torch.testing.assert_close(got[i, : len(r)], want, atol=1e-5, rtol=1e-5)
            assert got[i, len(r):].abs().sum() == 0 and batch.mask[i].sum() == len(r)


def test_read_pairs_accepts_messages(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"}])
    (pair,) = read_pairs(data)
    assert pair.where.endswith("p.jsonl:1") and pair.prompt[0]["role"] == "user"
