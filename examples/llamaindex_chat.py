"""lmforge's server as the LLM of LlamaIndex (``llama_index.llms.openai_like.OpenAILike``), optionally
with the server's own retrieval (``POST /v1/rag/query``) putting numbered sources in front of the question.

    lmforge serve --port 8000 [--rag-db notes.db] &
    pip install 'lmforge[frameworks]'        # llama-index-llms-openai-like (and langchain-openai)
    python examples/llamaindex_chat.py "Who is Hamlet's mother?" --base-url http://127.0.0.1:8000/v1 [--rag] [--stream]

``OpenAILike`` is LlamaIndex's client for servers that speak the OpenAI protocol: it is given the
server's ``/v1`` URL, the served model's name, ``is_chat_model=True`` (lmforge serves
``/v1/chat/completions`` with the model's chat template) and the model's context window (LlamaIndex
cannot ask the server for it).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

from langchain_chat import RAG_SYSTEM, SYSTEM, retrieve, served_model  # the same HTTP helpers, no LangChain needed


def make_llm(base_url: str, model: str | None = None, api_key: str | None = None, context_window: int = 8192, **kwargs):
    """An ``OpenAILike`` talking to lmforge's server (``base_url`` ends in ``/v1``); ``kwargs`` go to
    OpenAILike (``temperature``, ``max_tokens``, ...)."""
    from llama_index.llms.openai_like import OpenAILike

    model = model or served_model(base_url, api_key)
    return OpenAILike(model=model, api_base=base_url, api_key=api_key or "unused", is_chat_model=True,
                      context_window=context_window, max_retries=0, **kwargs)  # fmt: skip


def messages(question: str, sources: list[dict] | None = None) -> list:
    """LlamaIndex chat messages: a system turn, then the question (after the numbered sources, if any)."""
    from llama_index.core.llms import ChatMessage

    if not sources:
        return [ChatMessage(role="system", content=SYSTEM), ChatMessage(role="user", content=question)]
    blocks = "\n\n".join(f"[{s['n']}] {s['path']}, {s['position']}\n{s['text'].strip()}" for s in sources)
    return [ChatMessage(role="system", content=RAG_SYSTEM),
            ChatMessage(role="user", content=f"Sources:\n\n{blocks}\n\nQuestion: {question}")]  # fmt: skip


def ask(llm, question: str, sources: list[dict] | None = None) -> str:
    """One answer (``llm.chat``)."""
    return llm.chat(messages(question, sources)).message.content


def ask_stream(llm, question: str, sources: list[dict] | None = None) -> Iterator[str]:
    """The answer as it is generated (``llm.stream_chat``): text pieces, in order."""
    for r in llm.stream_chat(messages(question, sources)):
        if r.delta:
            yield r.delta


def complete(llm, prompt: str) -> str:
    """A plain completion through LlamaIndex's ``llm.complete`` (sent as one user turn)."""
    return llm.complete(prompt).text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("question")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="default: the model the server serves")
    p.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"))
    p.add_argument("--rag", action="store_true", help="put the server's retrieved sources (POST /v1/rag/query) in the prompt")
    p.add_argument("-k", type=int, default=4, help="sources retrieved with --rag")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--max-tokens", type=int, default=200)
    args = p.parse_args(argv)
    llm = make_llm(args.base_url, args.model, args.api_key, temperature=0, max_tokens=args.max_tokens)
    sources = retrieve(args.base_url, args.question, args.k, args.api_key) if args.rag else None
    if args.stream:
        for piece in ask_stream(llm, args.question, sources):
            print(piece, end="", flush=True)
        print()
    else:
        print(ask(llm, args.question, sources))
    for s in sources or []:
        print(f" [{s['n']}] {s['path']}, {s['position']}")


if __name__ == "__main__":
    main()
