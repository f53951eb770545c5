"""The prompt kit: system prompts, few-shot examples and chain-of-thought, as chat messages.

    messages = build_messages("Is 17 prime?", system="Be brief.", few_shot="examples.jsonl", cot=True)
    text = render(tokenizer, messages)           # through the model's chat template
    generate(model, tokenizer, messages)         # or hand the messages to generate / stream directly

Few-shot examples are input/output pairs (a JSONL file of ``{"input": ..., "output": ...}``
lines, or a list of dicts or pairs), rendered as earlier turns of the conversation: each input a
user message, each output the assistant's reply, so the model sees them exactly as it was tuned
to see dialogue. ``FewShotTemplate`` adds an instruction, input/output formats, and a plain-text
form for base models without a chat template. Chain-of-thought asks for reasoning first and a final
line ``Answer: ...``, which ``extract_answer`` reads back; examples may carry their own
``reasoning`` to show the model how.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import UserError

COT_INSTRUCTION = "Think step by step, then give the final answer on its own last line as 'Answer: <answer>'."
ANSWER_PREFIX = "Answer:"


class PromptError(UserError, ValueError):
    """A prompt that cannot be built: a bad examples file, an unknown field, a template that fails."""


@dataclass(frozen=True)
class Example:
    input: str
    output: str
    reasoning: str | None = None  # chain-of-thought shown before the answer, when given


# --- examples --------------------------------------------------------------------------------------
def _example(item, where: str) -> Example:
    if isinstance(item, Example):
        return item
    if isinstance(item, dict):
        unknown = set(item) - {"input", "output", "reasoning"}
        if unknown or "input" not in item or "output" not in item:
            raise PromptError(f"{where}: a few-shot example needs 'input' and 'output' (and optionally 'reasoning'), "
                              f"got keys {', '.join(sorted(item)) or 'none'}.")  # fmt: skip
        values = [item["input"], item["output"], item.get("reasoning")]
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        values = [item[0], item[1], None]
    else:
        raise PromptError(f"{where}: a few-shot example is an {{'input', 'output'}} object or an (input, output) pair.")
    if not all(isinstance(v, str) for v in values[:2]) or not isinstance(values[2], (str, type(None))):
        raise PromptError(f"{where}: 'input', 'output' and 'reasoning' must be strings.")
    return Example(*values)


def load_examples(path: str | Path) -> list[Example]:
    """Few-shot examples from a JSONL file, one ``{"input", "output"[, "reasoning"]}`` object a line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"cannot read the few-shot file {path}: {e}.") from None
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path} line {number} is not valid JSON ({e.msg}).") from None
        examples.append(_example(item, f"{path} line {number}"))
    if not examples:
        raise PromptError(f"{path} holds no examples: write one JSON object per line with 'input' and 'output'.")
    return examples


def as_examples(few_shot) -> list[Example]:
    """Examples from a JSONL path, or a list of Example / dicts / (input, output) pairs."""
    if few_shot is None:
        return []
    if isinstance(few_shot, (str, Path)):
        return load_examples(few_shot)
    return [_example(x, f"few-shot example {i}") for i, x in enumerate(few_shot)]


# --- the templates ---------------------------------------------------------------------------------
@dataclass
class FewShotTemplate:
    """An instruction, examples, and how each input and output is written.

    ``input_format``/``output_format`` are ``str.format`` patterns over ``{input}``/``{output}``;
    ``k`` keeps that many examples (chosen with ``seed``, or the first k when seed is None).
    """

    examples: list[Example] = field(default_factory=list)
    instruction: str | None = None
    input_format: str = "{input}"
    output_format: str = "{output}"
    k: int | None = None
    seed: int | None = None
    cot: bool = False

    def __post_init__(self):
        self.examples = as_examples(self.examples)
        for fmt, name in ((self.input_format, "input"), (self.output_format, "output")):
            try:
                fmt.format(**{name: ""})
            except (KeyError, IndexError, ValueError) as e:
                raise PromptError(f"{name}_format {fmt!r} may only use {{{name}}} ({type(e).__name__}: {e}).") from None

    def chosen(self) -> list[Example]:
        if self.k is None or self.k >= len(self.examples):
            return list(self.examples)
        if self.seed is None:
            return self.examples[: self.k]
        picked = sorted(random.Random(self.seed).sample(range(len(self.examples)), self.k))
        return [self.examples[i] for i in picked]

    def _reply(self, ex: Example) -> str:
        out = self.output_format.format(output=ex.output)
        if not self.cot:
            return out
        if ex.reasoning:
            return f"{ex.reasoning}\n{ANSWER_PREFIX} {out}"
        return f"{ANSWER_PREFIX} {out}"

    def messages(self, query: str, system: str | None = None) -> list[dict]:
        """Chat messages: system (``system`` then the instruction), the examples as turns, the query."""
        head = "\n\n".join(x for x in (system, self.instruction, COT_INSTRUCTION if self.cot else None) if x)
        msgs = [{"role": "system", "content": head}] if head else []
        for ex in self.chosen():
            msgs.append({"role": "user", "content": self.input_format.format(input=ex.input)})
            msgs.append({"role": "assistant", "content": self._reply(ex)})
        msgs.append({"role": "user", "content": self.input_format.format(input=query)})
        return msgs

    def text(self, query: str, system: str | None = None, input_label: str = "Input", output_label: str = "Output") -> str:
        """A plain-text prompt for base models: the instruction, ``Input: ...`` / ``Output: ...``
        blocks for the examples, and the query left open after ``Output:``."""
        head = "\n\n".join(x for x in (system, self.instruction, COT_INSTRUCTION if self.cot else None) if x)
        parts = [head] if head else []
        for ex in self.chosen():
            parts.append(f"{input_label}: {self.input_format.format(input=ex.input)}\n{output_label}: {self._reply(ex)}")
        parts.append(f"{input_label}: {self.input_format.format(input=query)}\n{output_label}:")
        return "\n\n".join(parts)


def build_messages(user: str, system: str | None = None, few_shot=None, cot: bool = False) -> list[dict]:
    """The chat messages for one user turn: an optional system prompt, few-shot examples (a JSONL
    path or a list) as earlier turns, and a chain-of-thought request when ``cot``."""
    if not isinstance(user, str):
        raise PromptError("the user message must be a string.")
    return FewShotTemplate(as_examples(few_shot), cot=cot).messages(user, system=system)


def with_system(messages: Sequence[dict], system: str) -> list[dict]:
    """``messages`` with ``system`` as their system prompt (replacing one that is there)."""
    rest = [m for m in messages if m.get("role") != "system"]
    return [{"role": "system", "content": system}, *rest]


def chain_of_thought(messages: Sequence[dict]) -> list[dict]:
    """``messages`` with the chain-of-thought instruction added to the last user turn."""
    msgs = [dict(m) for m in messages]
    for m in reversed(msgs):
        if m.get("role") == "user":
            m["content"] = f"{m['content']}\n\n{COT_INSTRUCTION}"
            return msgs
    raise PromptError("chain_of_thought needs a user message to add the instruction to.")


def extract_answer(text: str) -> str:
    """The final answer of a chain-of-thought reply: what follows the last ``Answer:`` (the last
    non-empty line when there is none)."""
    found = re.findall(rf"{re.escape(ANSWER_PREFIX)}\s*(.+)", text, flags=re.IGNORECASE)
    if found:
        return found[-1].strip()
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _merge_system(messages: Iterable[dict]) -> list[dict]:
    """For chat templates without a system role: the system text goes before the first user turn."""
    msgs = [dict(m) for m in messages]
    system = "\n\n".join(m["content"] for m in msgs if m.get("role") == "system")
    msgs = [m for m in msgs if m.get("role") != "system"]
    for m in msgs:
        if m.get("role") == "user":
            m["content"] = f"{system}\n\n{m['content']}" if system else m["content"]
            break
    return msgs


def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text of ``messages`` through the tokenizer's chat template. A template that
    rejects the system role (Gemma's, Mistral's older ones) gets the system text in the first user turn."""
    from lmforge.tokenizer import TokenizerError

    try:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)
    except TokenizerError:
        if not any(m.get("role") == "system" for m in messages):
            raise
        return tokenizer.apply_chat_template(_merge_system(messages), add_generation_prompt=add_generation_prompt)


__all__ = ["Example", "FewShotTemplate", "PromptError", "as_examples", "build_messages", "chain_of_thought",
           "extract_answer", "load_examples", "render", "with_system"]  # fmt: skip
