"""Answers grounded in retrieved chunks, citing them as ``[n]``.

    ans = ask("Who sees the ghost first?", "plays.db")      # bundled SmolLM2-135M-Instruct by default
    print(ans.format())     # the answer, then "[1] tragedies/hamlet.md, lines 7-60 (Hamlet > ACT I > ...)"

The retrieved chunks become numbered sources in the user turn (file, position, section path,
text); the system prompt asks for an answer from those sources with ``[n]`` after each fact, and one
worked example shows the format. The prompt is built by the prompt kit
(``lmforge.prompts.build_messages``) and generated through the public ``lmforge.generate``. Sources that would push the prompt past ``max_context_tokens`` (counted
with the generator's tokenizer) are left out, lowest-ranked first.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.prompts import build_messages
from lmforge.rag.retrieve import Hit, Retriever

SYSTEM_PROMPT = "Answer the question from the numbered sources. Cite the source of each fact as [n]."

# One worked example (the prompt kit's few-shot turns): small models such as SmolLM2-135M copy the
# citation format from it far more reliably than from the instruction alone.
EXAMPLE = (
    "Sources:\n\n[1] travel.md, line 9 — Trains\nThe night train to Vienna leaves at nine.\n\n"
    "[2] kitchen.md, lines 4-5 — Bread\nKnead the dough for ten minutes until it is smooth.\n\n"
    "Question: How long should the dough be kneaded?",
    "The dough should be kneaded for ten minutes until it is smooth [2].",
)
# A model that starts writing a new source block or question is making them up: stop there.
STOP = ("\n\nSources:", "\n\nQuestion:", "\n\n[")


@dataclass
class Answer:
    question: str
    text: str
    sources: list[Hit]  # the sources the model saw, numbered from 1
    cited: list[int] = field(default_factory=list)  # source numbers the answer cites, in order of first use

    def format(self) -> str:
        lines = [self.text.strip(), "", "Sources:"]
        for n, hit in enumerate(self.sources, start=1):
            c = hit.chunk
            mark = "*" if n in self.cited else " "
            lines.append(f"{mark}[{n}] {c.path}, {c.position}" + (f" ({c.section})" if c.section else ""))
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"question": self.question, "answer": self.text, "cited": self.cited,
                "sources": [{"n": n, **h.as_dict()} for n, h in enumerate(self.sources, start=1)]}  # fmt: skip


def source_block(n: int, hit: Hit) -> str:
    c = hit.chunk
    head = f"[{n}] {c.path}, {c.position}" + (f" — {c.section}" if c.section else "")
    return f"{head}\n{c.text.strip()}"


def build_prompt(question: str, hits: Sequence[Hit], tokenizer=None, max_context_tokens: int | None = None,
                 system: str = SYSTEM_PROMPT, few_shot=(EXAMPLE,)) -> tuple[list[dict], list[Hit]]:  # fmt: skip
    """The chat messages for ``question`` over ``hits`` and the hits that fit the budget."""
    kept = list(hits)
    while True:
        blocks = "\n\n".join(source_block(n, h) for n, h in enumerate(kept, start=1))
        user = f"Sources:\n\n{blocks}\n\nQuestion: {question}" if kept else f"Question: {question}"
        messages = build_messages(user, system=system, few_shot=few_shot)
        if tokenizer is None or max_context_tokens is None or not kept:
            return messages, kept
        if len(tokenizer.encode(tokenizer.apply_chat_template(messages))) <= max_context_tokens:
            return messages, kept
        kept.pop()


def cited_sources(text: str, n_sources: int) -> list[int]:
    """Source numbers cited as ``[n]`` (or ``[1, 2]``) in ``text`` that exist, in order of first use."""
    seen: dict[int, None] = {}
    for group in re.findall(r"\[(\d+(?:\s*,\s*\d+)*)\]", text):
        for n in group.split(","):
            if 1 <= int(n) <= n_sources:
                seen.setdefault(int(n), None)
    return list(seen)


class Answerer:
    """A retriever plus a generator; the generator (default: bundled SmolLM2) loads on first use."""

    def __init__(self, retriever: Retriever, model=None, tokenizer=None, max_context_tokens: int = 2048):
        self.retriever, self.model, self.tokenizer = retriever, model, tokenizer
        self.max_context_tokens = max_context_tokens
        self._lock, self._generate_lock = threading.Lock(), threading.Lock()

    def _generator(self):
        with self._lock:
            if self.model is None:
                from lmforge.checkpoints import load_model

                self.model = load_model()
            if self.tokenizer is None:
                from lmforge.tokenizer import load_tokenizer

                self.tokenizer = load_tokenizer()
        return self.model, self.tokenizer

    def ask(self, question: str, k: int = 5, mode: str = "hybrid", *, path: str | None = None,
            kinds: Sequence[str] | None = None, mmr_lambda: float | None = None, max_new_tokens: int = 256,
            temperature: float = 0.0, seed: int | None = None) -> Answer:  # fmt: skip
        from lmforge import generate

        hits = self.retriever.search(question, k, mode, path=path, kinds=kinds, mmr_lambda=mmr_lambda)
        model, tok = self._generator()
        messages, kept = build_prompt(question, hits, tok, self.max_context_tokens)
        with self._generate_lock:  # the model's KV cache serves one generation at a time
            text = generate(model, tok, messages, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop=STOP)
        return Answer(question, text, kept, cited_sources(text, len(kept)))


def ask(question: str, db: str | Path, k: int = 5, *, model=None, tokenizer=None, **kwargs) -> Answer:
    """Retrieve ``k`` chunks from ``db`` and answer ``question`` from them with citations.
    ``model``/``tokenizer``: the generator (default: the bundled SmolLM2-135M-Instruct)."""
    retriever = Retriever.open(db)
    try:
        return Answerer(retriever, model, tokenizer).ask(question, k, **kwargs)
    finally:
        retriever.close()
