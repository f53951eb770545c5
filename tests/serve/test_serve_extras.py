"""Serving extras through the official openai client: echo + prompt logprobs on /v1/completions
(what evaluation harnesses use for log-likelihood), GET /v1/models/{id}, --served-model-name, and
`lmforge serve` on an ALiBi decoder and a T5 encoder-decoder; the embedder follows its model's device."""

import openai
import pytest
import torch
from serve_helpers import running_server

import lmforge
from lmforge.cli import build_parser
from lmforge.config import ModelConfig
from lmforge.engine import Engine, EngineConfig
from lmforge.models import build_model
from lmforge.serve.server import Embedder, build_app, create_app


@pytest.fixture(scope="module")
def client(tiny, tokenizer):
    engine = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.02, block_size=8))
    with running_server(create_app(engine, "tiny")) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_echo_with_zero_tokens_returns_the_prompts_logprobs(client, tiny, tokenizer):
    prompt = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(prompt)
    r = client.completions.create(model="tiny", prompt=prompt, echo=True, max_tokens=0, logprobs=2)
    choice = r.choices[0]
    assert choice.text == tokenizer.decode(ids, skip_special_tokens=False)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    with torch.no_grad():
        ref = tiny(torch.tensor([ids]))[0].log_softmax(-1)
    expected = [float(ref[p - 1, ids[p]]) for p in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)


def test_echo_prepends_the_prompt_to_a_completion(client, tiny, tokenizer):
    ids = tokenizer.encode("Once upon a time")
    r = client.completions.create(model="tiny", prompt=ids, echo=True, max_tokens=4, temperature=0, logprobs=0)
    generated = lmforge.generate(tiny, tokenizer, ids, max_new_tokens=4, temperature=0)
    assert r.choices[0].text == tokenizer.decode(ids, skip_special_tokens=False) + generated
    assert len(r.choices[0].logprobs.token_logprobs) == len(ids) + r.usage.completion_tokens
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="tiny", prompt="hi", echo=True, stream=True)


def test_retrieve_a_model_by_id(client):
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_served_model_name(tiny, tokenizer, tmp_path):
    assert build_parser().parse_args(["serve", "--served-model-name", "my-model"]).served_model_name == "my-model"
    path = tiny.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    with running_server(build_app(path, kv_cache_gb=0.02, served_model_name="my-model")) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["my-model"]
        assert c.completions.create(model="my-model", prompt="hi", max_tokens=2).usage.completion_tokens <= 2
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="ckpt", prompt="hi", max_tokens=2)


@pytest.mark.parametrize("family", ["alibi", "t5"])
def test_lmforge_serve_runs_alibi_and_t5(family, tokenizer, tmp_path):
    torch.manual_seed(0)
    V = tokenizer.vocab_size
    if family == "alibi":
        cfg = ModelConfig.from_name("smollm2-135m", n_layer=2, n_embd=32, n_head=4, n_kv_head=2, d_ff=64,
                                    max_seq_len=128, position="alibi")  # fmt: skip
    else:
        cfg = ModelConfig.from_name("t5-small", n_layer=2, n_embd=32, n_head=4, head_dim=8, d_ff=64, vocab_size=V,
                                    max_seq_len=128)  # fmt: skip
    model = build_model(cfg).eval()
    path = model.save_pretrained(tmp_path / family, tokenizer=tokenizer)
    prompt = "Translate: the cat sat on the mat."
    with running_server(build_app(path, kv_cache_gb=0.01)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = c.completions.create(model=family, prompt=prompt, max_tokens=6, temperature=0)
    loaded = lmforge.load_model(path)
    assert r.choices[0].text == lmforge.generate(loaded, tokenizer, prompt, max_new_tokens=6, temperature=0)


def test_embedder_puts_its_inputs_on_the_models_device(tokenizer):
    class OnMeta(torch.nn.Module):  # an encoder that says where its inputs arrived
        config = ModelConfig.from_name("minilm-l6", n_layer=1)
        device = torch.device("meta")
        seen: list = []

        def embed_tokens(self, ids, mask=None):  # the embedder batches equal lengths: no mask needed
            self.seen.append(ids.device if mask is None else (ids.device, mask.device))
            return torch.zeros(ids.shape[0], 4, device=ids.device)

    model = OnMeta()
    with pytest.raises(NotImplementedError):  # meta tensors have no values to return; the point is where they went
        Embedder(model, tokenizer, "enc").embed([[1, 2, 3]])
    assert model.seen == [torch.device("meta")]
