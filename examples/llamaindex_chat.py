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

from collections.abc import Iterator

from langchain_chat import RAG_SYSTEM, SYSTEM, cli, retrieve, served_model  # noqa: F401  the same HTTP helpers and CLI (retrieve is part of this example's API), no LangChain needed


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
    cli(make_llm, ask, ask_stream, __doc__, argv)


if __name__ == "__main__":
    main()
