"""examples/langchain_chat.py and examples/llamaindex_chat.py against an in-process lmforge server (a
tiny random decoder, greedy, plus the small RAG corpus): what each framework returns, invoked and
streamed, is exactly what ``lmforge.generate`` gives for the same messages. Skipped where
langchain-openai / llama-index-llms-openai-like are not installed (``pip install 'lmforge[frameworks]'``)."""

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests" / "serve"))

MAX_TOKENS = 12
QUESTION = "How should roses be pruned?"


@pytest.fixture(scope="module")
def served(corpus_db, embedder):
    """(base URL, tiny model, tokenizer) of a server with a generator and the RAG corpus."""
    from serve_helpers import running_server, tiny_model

    from lmforge.checkpoints import default_model_path
    from lmforge.engine import Engine, EngineConfig
    from lmforge.rag.retrieve import Retriever
    from lmforge.serve.server import create_app
    from lmforge.tokenizer import load_tokenizer

    tiny, tokenizer = tiny_model(), load_tokenizer(default_model_path())
    engine = Engine(tiny, tokenizer, EngineConfig(kv_cache_gb=0.02, block_size=8))
    retriever = Retriever.open(corpus_db, embedder)
    try:
        with running_server(create_app(engine, "tiny", rag=retriever)) as url:
            yield url + "/v1", tiny, tokenizer
    finally:
        retriever.close()


def expected(tiny, tokenizer, system: str, user: str) -> str:
    import lmforge

    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return lmforge.generate(tiny, tokenizer, msgs, max_new_tokens=MAX_TOKENS, temperature=0)


def sources_prompt(sources, question):
    blocks = "\n\n".join(f"[{s['n']}] {s['path']}, {s['position']}\n{s['text'].strip()}" for s in sources)
    return f"Sources:\n\n{blocks}\n\nQuestion: {question}"


@pytest.mark.parametrize("example,package", [("langchain_chat", "langchain_openai"),
                                              ("llamaindex_chat", "llama_index.llms.openai_like")])  # fmt: skip
def test_framework_chat_invoke_and_stream(served, example, package):
    pytest.importorskip(package)
    base_url, tiny, tokenizer = served
    ex = importlib.import_module(example)
    assert ex.served_model(base_url) == "tiny"
    llm = ex.make_llm(base_url, temperature=0, max_tokens=MAX_TOKENS)  # the model name asked from the server
    want = expected(tiny, tokenizer, ex.SYSTEM, QUESTION)
    assert want  # the tiny model says something
    assert ex.ask(llm, QUESTION) == want
    pieces = list(ex.ask_stream(llm, QUESTION))
    assert len(pieces) > 1 and "".join(pieces) == want  # streamed in pieces, the same text


@pytest.mark.parametrize("example,package", [("langchain_chat", "langchain_openai"),
                                              ("llamaindex_chat", "llama_index.llms.openai_like")])  # fmt: skip
def test_framework_chat_over_the_servers_retrieval(served, example, package):
    pytest.importorskip(package)
    base_url, tiny, tokenizer = served
    ex = importlib.import_module(example)
    sources = ex.retrieve(base_url, QUESTION, k=2)
    assert [s["n"] for s in sources] == [1, 2] and sources[0]["path"] == "notes/garden.md"
    assert "Prune roses" in sources[0]["text"]
    llm = ex.make_llm(base_url, "tiny", temperature=0, max_tokens=MAX_TOKENS)
    want = expected(tiny, tokenizer, ex.RAG_SYSTEM, sources_prompt(sources, QUESTION))
    assert ex.ask(llm, QUESTION, sources) == want
    assert "".join(ex.ask_stream(llm, QUESTION, sources)) == want


def test_llamaindex_complete(served):
    pytest.importorskip("llama_index.llms.openai_like")
    base_url, tiny, tokenizer = served
    import llamaindex_chat

    import lmforge

    llm = llamaindex_chat.make_llm(base_url, temperature=0, max_tokens=MAX_TOKENS)
    want = lmforge.generate(tiny, tokenizer, [{"role": "user", "content": "Name a colour."}], max_new_tokens=MAX_TOKENS,
                            temperature=0)  # fmt: skip
    assert llamaindex_chat.complete(llm, "Name a colour.") == want
