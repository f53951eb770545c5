"""Answers: numbered sources in the prompt, the context budget, citations read back."""

import sys
from pathlib import Path

import pytest

from lmforge.checkpoints import default_model_path
from lmforge.rag.answer import Answerer, build_prompt, cited_sources, source_block
from lmforge.rag.retrieve import Retriever
from lmforge.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).parent.parent / "serve"))
from serve_helpers import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def smol_tokenizer():
    return load_tokenizer(default_model_path())


@pytest.fixture
def retriever(corpus_db, embedder):
    r = Retriever.open(corpus_db, embedder)
    yield r
    r.close()


def test_cited_sources():
    assert cited_sources("Water twice a week [2]. Prune in winter [1][2], see [1, 3] and [9].", 3) == [2, 1, 3]
    assert cited_sources("no citations", 3) == []


def test_prompt_numbers_sources_with_file_and_position(retriever, smol_tokenizer):
    hits = retriever.search("tomatoes and roses", k=3)
    messages, kept = build_prompt("When to prune roses?", hits, smol_tokenizer, 4096)
    assert kept == hits and messages[0]["role"] == "system" and "[n]" in messages[0]["content"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]  # one worked example
    assert messages[2]["content"].endswith("[2].")
    user = messages[-1]["content"]
    assert user.endswith("Question: When to prune roses?")
    for n, h in enumerate(hits, start=1):
        assert f"[{n}] {h.chunk.path}, {h.chunk.position}" in user and h.chunk.text.strip() in user
    assert source_block(1, hits[0]).startswith(f"[1] {hits[0].chunk.path}, {hits[0].chunk.position} — {hits[0].chunk.section}")


def test_prompt_budget_drops_the_lowest_ranked_sources(retriever, smol_tokenizer):
    hits = retriever.search("tomatoes and roses", k=4)
    full, _ = build_prompt("q?", hits, smol_tokenizer, 100_000)
    n_full = len(smol_tokenizer.encode(smol_tokenizer.apply_chat_template(full)))
    messages, kept = build_prompt("q?", hits, smol_tokenizer, n_full - 1)
    assert kept == hits[: len(kept)] and 0 < len(kept) < len(hits)
    assert len(smol_tokenizer.encode(smol_tokenizer.apply_chat_template(messages))) <= n_full - 1


def test_answerer_generates_through_lmforge_generate(retriever, smol_tokenizer):
    ans = Answerer(retriever, tiny_model(max_seq_len=2048), smol_tokenizer).ask("When to prune roses?", k=2, max_new_tokens=8)
    assert isinstance(ans.text, str) and len(ans.sources) == 2
    out = ans.format()
    assert "Sources:" in out and f"[1] {ans.sources[0].chunk.path}, {ans.sources[0].chunk.position}" in out
    d = ans.as_dict()
    assert d["sources"][0]["n"] == 1 and d["sources"][0]["path"] == ans.sources[0].chunk.path


@pytest.mark.slow
def test_bundled_smollm2_answers_from_the_sources(retriever):
    ans = Answerer(retriever).ask("Which planet is the largest?", k=3, max_new_tokens=40)
    assert ans.sources[0].chunk.path == "astronomy.pdf"
    assert "Jupiter" in ans.text, ans.text
    assert "\n\n[" not in ans.text  # made-up source blocks are cut by the stop strings
