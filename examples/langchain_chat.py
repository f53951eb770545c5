"""lmforge's server as the chat model of LangChain (``langchain_openai.ChatOpenAI``), optionally with
the server's own retrieval (``POST /v1/rag/query``) putting numbered sources in front of the question.

    lmforge serve --port 8000 [--rag-db notes.db] &
    pip install 'lmforge[frameworks]'        # langchain-openai (and llama-index-llms-openai-like)
    python examples/langchain_chat.py "Who is Hamlet's mother?" --base-url http://127.0.0.1:8000/v1 [--rag] [--stream]

ChatOpenAI speaks the OpenAI chat-completions protocol, which ``lmforge serve`` implements, so the only
settings are the server's ``/v1`` URL, the served model's name (``GET /v1/models``) and any API key
(``--api-key`` on the server; anything when the server has none).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

import httpx

SYSTEM = "Answer in one or two sentences."
RAG_SYSTEM = ("Answer the question from the numbered sources only, and cite them as [n] after each fact. "
              "If the sources do not say, answer that they do not say.")  # fmt: skip


def served_model(base_url: str, api_key: str | None = None) -> str:
    """The id of the model the server serves (its ``GET /v1/models``)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def make_llm(base_url: str, model: str | None = None, api_key: str | None = None, **kwargs):
    """A ``ChatOpenAI`` talking to lmforge's server (``base_url`` ends in ``/v1``); ``kwargs`` go to
    ChatOpenAI (``temperature``, ``max_tokens``, ``seed``, ...)."""
    from langchain_openai import ChatOpenAI

    model = model or served_model(base_url, api_key)
    return ChatOpenAI(base_url=base_url, model=model, api_key=api_key or "unused", max_retries=0, **kwargs)


def retrieve(base_url: str, question: str, k: int = 4, api_key: str | None = None) -> list[dict]:
    """The server's retrieval only (``"answer": false``): its numbered sources for ``question``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.post(base_url.rstrip("/") + "/rag/query", json={"query": question, "k": k, "answer": False},
                   headers=headers, timeout=120)  # fmt: skip
    r.raise_for_status()
    return r.json()["sources"]


def messages(question: str, sources: list[dict] | None = None) -> list:
    """LangChain messages: a system turn, then the question (after the numbered sources, if any)."""
    from langchain_core.messages import HumanMessage, SystemMessage

    if not sources:
        return [SystemMessage(SYSTEM), HumanMessage(question)]
    blocks = "\n\n".join(f"[{s['n']}] {s['path']}, {s['position']}\n{s['text'].strip()}" for s in sources)
    return [SystemMessage(RAG_SYSTEM), HumanMessage(f"Sources:\n\n{blocks}\n\nQuestion: {question}")]


def ask(llm, question: str, sources: list[dict] | None = None) -> str:
    """One answer (``llm.invoke``)."""
    return llm.invoke(messages(question, sources)).content


def ask_stream(llm, question: str, sources: list[dict] | None = None) -> Iterator[str]:
    """The answer as it is generated (``llm.stream``): text pieces, in order."""
    for chunk in llm.stream(messages(question, sources)):
        if chunk.content:
            yield chunk.content


def cli(make_llm, ask, ask_stream, description: str, argv: list[str] | None = None) -> None:
    """The command line both examples share: ask the server one question (with --rag, from its sources)."""
    p = argparse.ArgumentParser(description=description.split("\n\n")[0])
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


def main(argv: list[str] | None = None) -> None:
    cli(make_llm, ask, ask_stream, __doc__, argv)


if __name__ == "__main__":
    main()
