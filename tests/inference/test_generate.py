"""Generation: token-identical to transformers' generate, cache on == cache off, batches, beams,
streaming, stops, speculative decoding, errors."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import UserError
from lmforge.inference import Generator, PromptError, SamplingError, SamplingParams, complete, generate, stream

PROMPTS = [[5, 17, 42, 8, 3], [9, 1], [4, 60, 4, 60, 4, 33, 12, 7, 80, 2, 2]]


def hf_greedy(hf, prompt, max_new, **kw):
    """transformers' greedy continuation of one prompt, up to and including eos."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, pad_token_id=0, **kw)
    start = 1 if hf.config.is_encoder_decoder else len(prompt)
    ids = out[0, start:].tolist()
    eos = hf.generation_config.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids


# --- parity with transformers --------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_t5"])
def test_greedy_is_token_identical_to_transformers(fixture, request):
    hf, ours = request.getfixturevalue(fixture)
    seen = set()
    for prompt in PROMPTS:
        theirs = hf_greedy(hf, prompt, 64)
        got = complete(ours, None, prompt, max_new_tokens=64, temperature=0)
        assert got.token_ids == theirs
        seen |= set(theirs)
    assert len(seen) > 8  # a real walk through the vocabulary, not one repeated token


def test_sliding_window_generation_matches_transformers(tiny_mistral):
    hf, ours = tiny_mistral
    assert ours.config.sliding_window == 8
    unwindowed = type(ours)(ours.config.replace(sliding_window=None))
    unwindowed.load_state_dict(ours.state_dict())
    differs = False
    for prompt in PROMPTS:
        got = complete(ours, None, prompt, max_new_tokens=48, temperature=0, ignore_eos=True).token_ids
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=48, min_new_tokens=48, do_sample=False, pad_token_id=0)
        theirs = out[0, len(prompt) :].tolist()
        assert got == theirs
        assert complete(ours, None, prompt, max_new_tokens=48, temperature=0, ignore_eos=True, use_cache=False).token_ids == got
        differs |= complete(unwindowed.eval(), None, prompt, max_new_tokens=48, temperature=0, ignore_eos=True).token_ids != got
    assert differs  # the window does change the tokens: the test would catch a cache that ignored it


def test_batched_greedy_equals_transformers_left_padded(tiny_gpt2):
    hf, ours = tiny_gpt2
    got = complete(ours, None, PROMPTS, max_new_tokens=40, temperature=0, ignore_eos=True)
    T = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
    assert [c.token_ids for c in got] == out[:, T:].tolist()


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_t5"])
def test_cache_on_equals_cache_off(fixture, request):
    _, ours = request.getfixturevalue(fixture)
    for params in (dict(temperature=0), dict(temperature=0.8, top_p=0.9, seed=7, repetition_penalty=1.3)):
        on = complete(ours, None, PROMPTS, max_new_tokens=48, ignore_eos=True, **params)
        off = complete(ours, None, PROMPTS, max_new_tokens=48, ignore_eos=True, use_cache=False, **params)
        assert [c.token_ids for c in on] == [c.token_ids for c in off]


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_t5"])
def test_a_prompt_gets_the_same_tokens_alone_or_in_a_batch(fixture, request):
    _, ours = request.getfixturevalue(fixture)
    batched = complete(ours, None, PROMPTS, max_new_tokens=32, temperature=0.9, seed=3, ignore_eos=True)
    for prompt, c in zip(PROMPTS, batched):
        assert complete(ours, None, prompt, max_new_tokens=32, temperature=0.9, seed=3, ignore_eos=True).token_ids == c.token_ids


@pytest.mark.parametrize("fixture", ["tiny_t5", "tiny_gpt2"])
@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_matches_transformers(fixture, num_beams, request):
    hf, ours = request.getfixturevalue(fixture)
    for prompt in PROMPTS[:2]:
        theirs = hf_greedy(hf, prompt, 24, num_beams=num_beams)
        got = complete(ours, None, prompt, max_new_tokens=24, temperature=0, num_beams=num_beams)
        assert got.token_ids == theirs


def test_beam_search_returns_n_best_in_order(tiny_t5):
    _, ours = tiny_t5
    best = complete(ours, None, PROMPTS[0], max_new_tokens=16, temperature=0, num_beams=4, n=3)
    assert len(best) == 3 and best[0].score >= best[1].score >= best[2].score
    assert len({tuple(c.token_ids) for c in best}) == 3
    with pytest.raises(SamplingError, match="num_beams"):
        complete(ours, None, PROMPTS[0], temperature=0, num_beams=2, n=3)


# --- sampling through the whole loop -------------------------------------------------------------
def test_seed_repeats_and_n_samples_differ(tiny_gpt2):
    _, ours = tiny_gpt2
    a = complete(ours, None, PROMPTS[0], max_new_tokens=20, temperature=1.0, seed=11, n=3, ignore_eos=True)
    b = complete(ours, None, PROMPTS[0], max_new_tokens=20, temperature=1.0, seed=11, n=3, ignore_eos=True)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert len({tuple(c.token_ids) for c in a}) == 3


def test_logprobs_and_finish_reasons(tiny_gpt2):
    hf, ours = tiny_gpt2
    c = complete(ours, None, PROMPTS[0], max_new_tokens=10, temperature=0, logprobs=2, ignore_eos=True)
    assert c.finish_reason == "length" and len(c.token_ids) == len(c.logprobs) == len(c.top_logprobs) == 10
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPTS[0]])).logits[0, -1].log_softmax(-1)
    assert c.logprobs[0] == pytest.approx(float(ref.max()), abs=1e-4)
    assert list(c.top_logprobs[0]) == ref.topk(2).indices.tolist()
    first = c.token_ids[0]
    stopped = complete(ours, None, PROMPTS[0], max_new_tokens=10, temperature=0, stop_token_ids=[c.token_ids[3]])
    assert stopped.finish_reason == "stop" and stopped.token_ids == c.token_ids[: c.token_ids.index(c.token_ids[3]) + 1]
    assert first == c.token_ids[0]


def test_stream_joins_to_generate_and_stops_cut_exactly(tiny_chat, smol_tokenizer):
    _, model = tiny_chat
    tok = smol_tokenizer
    kw = dict(max_new_tokens=80, temperature=1.0, seed=5, ignore_eos=True)
    full = generate(model, tok, "Bonjour, ça va? 日本", **kw)
    pieces = list(stream(model, tok, "Bonjour, ça va? 日本", **kw))
    assert "".join(pieces) == full  # a piece ending mid-character would leave U+FFFD in the join
    assert any(len(p.encode()) > len(p) for p in pieces)  # random tokens did produce multi-byte characters
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = generate(model, tok, "Bonjour, ça va? 日本", stop=[stop], **kw)
    assert cut == full[: full.index(stop)]
    assert "".join(stream(model, tok, "Bonjour, ça va? 日本", stop=[stop], **kw)) == cut


def test_chat_messages_go_through_the_template(tiny_chat, smol_tokenizer):
    _, model = tiny_chat
    tok = smol_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    c = complete(model, tok, messages, max_new_tokens=2, temperature=0)
    assert c.prompt_tokens == len(tok.encode(tok.apply_chat_template(messages), add_special_tokens=False))
    as_chat = complete(model, tok, "Hi", chat=True, max_new_tokens=2, temperature=0)
    assert as_chat.prompt_tokens == len(tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]),
                                                   add_special_tokens=False))  # fmt: skip
    batch = generate(model, tok, [messages, "plain text"], max_new_tokens=3, temperature=0)
    assert isinstance(batch, list) and len(batch) == 2


def test_generation_ends_at_the_context(tiny_gpt2):
    _, ours = tiny_gpt2
    prompt = [i % 90 + 1 for i in range(119)]  # context 128
    c = complete(ours, None, prompt, max_new_tokens=50, temperature=0, ignore_eos=True)
    assert c.finish_reason == "length" and len(c.token_ids) == 128 - len(prompt)


# --- speculative decoding ------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_greedy_is_identical_to_the_target_alone(tiny_gpt2, tiny_gpt2_draft, k):
    _, target = tiny_gpt2
    for draft in (tiny_gpt2_draft, target):  # a poor draft (mostly rejected) and a perfect one (all accepted)
        gen = Generator(target, draft_model=draft, num_draft_tokens=k)
        for prompt in PROMPTS:
            alone = complete(target, None, prompt, max_new_tokens=50, temperature=0)
            run = gen.run([gen.encode(prompt)], SamplingParams(max_new_tokens=50, temperature=0)).finish()
            assert run.completions[0].token_ids == alone.token_ids
        if draft is target:
            assert run.draft_stats["accepted"] == run.draft_stats["drafted"]


def test_speculative_refuses_sampling(tiny_gpt2, tiny_gpt2_draft):
    _, target = tiny_gpt2
    with pytest.raises(SamplingError, match="greedy"):
        generate(target, None, PROMPTS[0], draft_model=tiny_gpt2_draft, temperature=0.7)


# --- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ("", {}, "empty"),
        ([], {}, "empty"),
        ("x " * 600, {}, "context"),
        ("hi", dict(max_new_tokens=0), "max_new_tokens"),
        ("hi", dict(temperature=-1.0), "temperature"),
        ("hi", dict(top_p=0.0), "top_p"),
        ("hi", dict(top_p=1.01), "top_p"),
        ("hi", dict(top_k=-3), "top_k"),
        ("hi", dict(tempreature=0.5), "unknown generation parameter"),
        ([5, 10**6], {}, "vocabulary"),
    ],
)
def test_bad_input_gets_a_clear_error(tiny_chat, smol_tokenizer, prompt, params, match):
    _, model = tiny_chat
    with pytest.raises(UserError, match=match) as e:
        generate(model, smol_tokenizer, prompt, **params)
    assert "\n" not in str(e.value)


def test_encoder_only_models_cannot_generate():
    from lmforge import ModelConfig
    from lmforge.models import build_model

    bert = build_model(ModelConfig.from_name("minilm-l6", n_layer=1, vocab_size=50))
    with pytest.raises(PromptError, match="encoder-only"):
        generate(bert, None, [1, 2], max_new_tokens=2)
