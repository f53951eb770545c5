"""Few-shot tasks from local JSONL files, scored the way lm-evaluation-harness scores them.

A task file has one JSON object per line, of one of two kinds (told apart by their fields):

    multiple choice   {"context": "The sky is", "choices": [" blue", " green"], "gold": 0}
    generate-until    {"context": "12 + 30 =", "target": " 42", "until": ["\\n"]}   (until: optional)

Multiple choice scores every choice by its log-likelihood after the context (``loglikelihood``)
and picks the highest (``acc``) or the highest per byte of the choice (``acc_norm``). Generate-until
decodes greedily until a stop string and compares with the target: ``exact_match`` (after
stripping spaces), plus two continuous metrics of the same answers, the target's mean per-token
log-likelihood and a normalised character edit distance (for the emergence study: an ability can
look sudden under exact match and smooth under a continuous metric).

Few-shot prompts put ``num_fewshot`` other examples of the same file (context + answer) before the
example, separated by a blank line, chosen by a seeded generator per example.

    from lmforge.eval.tasks import evaluate_tasks
    results = evaluate_tasks(model, tokenizer, ["arith.jsonl"], num_fewshot=3)
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmforge.errors import UserError

FIELDS = {"multiple_choice": ("context", "choices", "gold"), "generate_until": ("context", "target")}
FEWSHOT_SEPARATOR = "\n\n"


class TaskFileError(UserError, ValueError):
    """A task file that cannot be used; the message names the file and line."""


@dataclass
class Task:
    name: str
    kind: str  # multiple_choice | generate_until
    docs: list[dict]
    path: Path | None = None

    @property
    def answers(self) -> list[str]:
        """The text that follows each context in a few-shot demonstration."""
        if self.kind == "multiple_choice":
            return [d["choices"][d["gold"]] for d in self.docs]
        return [d["target"] for d in self.docs]


def _check_doc(doc, where: str, kind: str | None) -> str:
    """The kind of one record, or a TaskFileError naming ``where`` (file:line) and what is wrong."""
    if not isinstance(doc, dict):
        raise TaskFileError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    if kind is None:
        kind = "multiple_choice" if "choices" in doc or "gold" in doc else "generate_until"
    missing = [f for f in FIELDS[kind] if f not in doc]
    if missing:
        raise TaskFileError(
            f"{where}: missing field {', '.join(repr(m) for m in missing)} "
            f"(a {kind.replace('_', '-')} record needs {', '.join(FIELDS[kind])})"
        )
    if not isinstance(doc["context"], str):
        raise TaskFileError(f"{where}: 'context' must be a string")
    if kind == "multiple_choice":
        choices, gold = doc["choices"], doc["gold"]
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise TaskFileError(f"{where}: 'choices' must be a list of at least two non-empty strings")
        if not (isinstance(gold, int) and 0 <= gold < len(choices)):
            raise TaskFileError(f"{where}: 'gold' must be the index of the right choice (0..{len(choices) - 1}), got {gold!r}")
    else:
        if not isinstance(doc["target"], str) or not doc["target"]:
            raise TaskFileError(f"{where}: 'target' must be a non-empty string")
        until = doc.get("until", ["\n"])
        if not (isinstance(until, list) and all(isinstance(u, str) and u for u in until)):
            raise TaskFileError(f"{where}: 'until' must be a list of non-empty stop strings")
    return kind


def load_task(path: str | os.PathLike) -> Task:
    """Read and check a JSONL task file; every record must be of the first record's kind."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"task file {path} does not exist; write one with `lmforge eval make-task` or pass a .jsonl path")
    docs, kind = [], None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFileError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            kind = _check_doc(doc, f"{path}:{n}", kind)
            docs.append(doc)
    if not docs:
        raise TaskFileError(f"{path} has no records; each line must be one JSON object")
    return Task(name=path.stem, kind=kind, docs=docs, path=path)


# --- scoring -----------------------------------------------------------------------------------------
def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness splits them: spaces ending the context move to
    the continuation, the whole text is encoded once and cut where the context's own encoding ends
    (so a token that merges across the boundary is not split in a way the model never saw)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:  # condition on the beginning-of-text token, as the harness does
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if prefix is None:
            raise UserError("an empty context needs a beginning-of-text token, and this tokenizer has none; give every example a context")
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        return [prefix], cont
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


@torch.inference_mode()
def loglikelihood(model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 16,
                  progress: bool = False) -> list[tuple[float, bool]]:  # fmt: skip
    """(sum of log p(continuation tokens | context), whether greedy decoding would produce them) for
    each (context, continuation). Long inputs keep their last ``max_seq_len`` tokens (the harness's rule).

    Requests are run longest first in right-padded batches: a causal model's logits at a position
    do not depend on the padding after it, so batching changes no number."""
    encoded = [encode_pair(tokenizer, c, x) for c, x in requests]
    for (c, x), (_, cont) in zip(requests, encoded):
        if not cont:
            raise UserError(f"the continuation {x!r} after {c[-40:]!r} is empty once tokenized; give every choice some text")
    max_len = model.config.max_seq_len
    rows = []
    for (_, x), (ctx, cont) in zip(requests, encoded):
        if len(cont) > max_len:
            raise UserError(f"the continuation {x[:40]!r}... has {len(cont)} tokens, more than the model's context of "
                            f"{max_len}; use shorter answers or a longer-context model")  # fmt: skip
        ids = (ctx + cont)[-(max_len + 1) :][:-1]  # inputs; the last token is only ever a target
        rows.append((ids, cont))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    device = model.device
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="loglikelihood", unit="batch", disable=not progress):
        T = max(len(rows[i][0]) for i in batch)
        inputs = torch.zeros(len(batch), T, dtype=torch.long)
        for b, i in enumerate(batch):
            inputs[b, : len(rows[i][0])] = torch.tensor(rows[i][0])
        logp = F.log_softmax(model(inputs.to(device)).float(), dim=-1)  # (B, T, V)
        for b, i in enumerate(batch):
            ids, cont = rows[i]
            n = len(cont)
            lp = logp[b, len(ids) - n : len(ids)]  # (n, V): predictions of the continuation tokens
            target = torch.tensor(cont, device=device)
            total = lp.gather(1, target[:, None]).sum().item()
            greedy = bool((lp.argmax(-1) == target).all())
            results[i] = (total, greedy)
    return results  # type: ignore[return-value]


def greedy_until(model, tokenizer, prompts: Sequence[str], until: Sequence[Sequence[str]], *,
                 max_new_tokens: int = 32, progress: bool = False) -> list[str]:  # fmt: skip
    """Greedy continuations of ``prompts``, each cut before the first of its stop strings
    (through ``lmforge.generate``, the one decoding path)."""
    from lmforge.inference import generate

    out = []
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len // 2)  # a short context keeps room for its prompt
    budget = model.config.max_seq_len - max_new_tokens
    for prompt, stops in tqdm(list(zip(prompts, until)), desc="generate", unit="doc", disable=not progress):
        ids = tokenizer.encode(prompt)[-budget:]  # keep the end of an overlong few-shot prompt
        text = generate(model, tokenizer, ids, temperature=0.0, max_new_tokens=max_new_tokens, stop=tuple(stops))
        for s in stops:  # stop strings are cut by generate; an eos may leave one inside
            text = text.split(s)[0]
        out.append(text)
    return out


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings (insertions, deletions, substitutions)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# --- evaluation --------------------------------------------------------------------------------------
def fewshot_prompt(task: Task, index: int, num_fewshot: int, seed: int = 1234) -> str:
    """The context of example ``index`` after ``num_fewshot`` other examples with their answers."""
    if num_fewshot >= len(task.docs):
        raise UserError(f"{task.name} has {len(task.docs)} examples, too few for {num_fewshot}-shot prompts; lower --num-fewshot")
    rng = random.Random(seed * 1_000_003 + index)
    others = [j for j in range(len(task.docs)) if j != index]
    shots = rng.sample(others, num_fewshot)
    answers = task.answers
    demos = [task.docs[j]["context"] + answers[j] for j in shots]
    return FEWSHOT_SEPARATOR.join(demos + [task.docs[index]["context"]])


@dataclass
class TaskResult:
    task: str
    kind: str
    num_fewshot: int
    n: int
    metrics: dict[str, float]
    samples: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self, samples: bool = False) -> dict:
        d = {"task": self.task, "kind": self.kind, "num_fewshot": self.num_fewshot, "n": self.n, "metrics": self.metrics}
        return d | ({"samples": self.samples} if samples else {})


def evaluate_task(model, tokenizer, task: Task | str | os.PathLike, *, num_fewshot: int = 0, limit: int | None = None,
                  seed: int = 1234, max_new_tokens: int = 32, batch_size: int = 16, progress: bool = False) -> TaskResult:  # fmt: skip
    """Score ``model`` on one task (the first ``limit`` examples): accuracy for multiple choice,
    exact match with per-token log-likelihood and edit distance for generate-until."""
    task = task if isinstance(task, Task) else load_task(task)
    indices = list(range(len(task.docs)))[:limit]
    prompts = [fewshot_prompt(task, i, num_fewshot, seed) for i in indices]
    docs = [task.docs[i] for i in indices]
    samples = []
    if task.kind == "multiple_choice":
        requests = [(p, c) for p, d in zip(prompts, docs) for c in d["choices"]]
        scores = loglikelihood(model, tokenizer, requests, batch_size=batch_size, progress=progress)
        k = 0
        for p, d in zip(prompts, docs):
            lls = [s for s, _ in scores[k : k + len(d["choices"])]]
            k += len(d["choices"])
            per_byte = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, d["choices"])]
            pred, pred_norm = max(range(len(lls)), key=lls.__getitem__), max(range(len(lls)), key=per_byte.__getitem__)
            samples.append({"prompt": p, "loglikelihoods": lls, "pred": pred, "pred_norm": pred_norm, "gold": d["gold"]})
        metrics = {
            "acc": sum(s["pred"] == s["gold"] for s in samples) / len(samples),
            "acc_norm": sum(s["pred_norm"] == s["gold"] for s in samples) / len(samples),
            "gold_loglikelihood": sum(s["loglikelihoods"][s["gold"]] for s in samples) / len(samples),
        }
    else:
        outputs = greedy_until(model, tokenizer, prompts, [d.get("until", ["\n"]) for d in docs],
                               max_new_tokens=max_new_tokens, progress=progress)  # fmt: skip
        targets = [d["target"] for d in docs]
        scores = loglikelihood(model, tokenizer, list(zip(prompts, targets)), batch_size=batch_size, progress=progress)
        for p, out, t, (ll, _) in zip(prompts, outputs, targets, scores):
            n_tokens = len(encode_pair(tokenizer, p, t)[1])
            dist = edit_distance(out.strip(), t.strip()) / max(len(t.strip()), 1)
            samples.append({"prompt": p, "output": out, "target": t, "exact": out.strip() == t.strip(),
                            "token_loglikelihood": ll / n_tokens, "edit_distance": dist})  # fmt: skip
        metrics = {
            "exact_match": sum(s["exact"] for s in samples) / len(samples),
            "token_loglikelihood": sum(s["token_loglikelihood"] for s in samples) / len(samples),
            "target_token_prob": sum(math.exp(s["token_loglikelihood"]) for s in samples) / len(samples),
            "edit_distance": sum(min(s["edit_distance"], 1.0) for s in samples) / len(samples),
        }
    return TaskResult(task.name, task.kind, num_fewshot, len(samples), metrics, samples)


def evaluate_tasks(model, tokenizer, tasks: Sequence[str | os.PathLike | Task], **kwargs) -> list[TaskResult]:
    """``evaluate_task`` for each task file (all files are checked before any model work starts)."""
    loaded = [t if isinstance(t, Task) else load_task(t) for t in tasks]
    return [evaluate_task(model, tokenizer, t, **kwargs) for t in loaded]


def run_tasks(model_path, tasks: Sequence[str | os.PathLike], *, out: str | os.PathLike | None = None,
              progress: bool = True, **kwargs) -> list[TaskResult]:  # fmt: skip
    """``lmforge eval tasks``: load the model (fp32), evaluate each task file, optionally write JSON."""
    from lmforge.checkpoints import load_model
    from lmforge.tokenizer import load_tokenizer

    loaded = [load_task(t) for t in tasks]  # a bad file fails before the model loads
    model = load_model(model_path, dtype=torch.float32, quantize="none")
    if model.config.arch != "decoder":
        raise UserError(f"tasks are scored with a decoder-only model, and {model_path} is {model.config.arch}; pass a causal LM")
    results = evaluate_tasks(model, load_tokenizer(model_path), loaded, progress=progress, **kwargs)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps([r.to_dict(samples=True) for r in results], indent=2), encoding="utf-8")
        os.replace(tmp, out)
    return results
