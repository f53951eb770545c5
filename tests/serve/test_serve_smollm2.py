"""The real bundled SmolLM2-135M-Instruct through the server: greedy chat equals lmforge.generate."""

import openai
import pytest
from serve_helpers import running_server

import lmforge
from lmforge.checkpoints import load_model
from lmforge.engine import Engine, EngineConfig
from lmforge.serve.server import create_app, model_id


@pytest.fixture(scope="module")
def smollm2():
    return load_model()


def test_greedy_chat_equals_lmforge_generate_on_smollm2(smollm2, tokenizer):
    name = model_id(None)
    engine = Engine(smollm2, tokenizer, EngineConfig(kv_cache_gb=0.5))
    questions = ["What is the capital of France?", "Give me one word that rhymes with cat."]
    with running_server(create_app(engine, name)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        for q in questions:
            messages = [{"role": "user", "content": q}]
            r = client.chat.completions.create(model=name, messages=messages, max_tokens=20, temperature=0)
            expected = lmforge.generate(smollm2, tokenizer, messages, max_new_tokens=20, temperature=0)
            assert r.choices[0].message.content == expected
        assert "Paris" in client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": questions[0]}], max_tokens=20, temperature=0
        ).choices[0].message.content
    assert engine.blocks.num_used == 0
