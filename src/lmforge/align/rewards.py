"""Reward sources for PPO and GRPO: one score per (prompt, completion).

    resolve_reward("runs/rm/final")                          a reward model directory (lmforge rm)
    resolve_reward("rm:runs/rm/final")                       the same, explicitly
    resolve_reward("lmforge.align.rl_tasks:vader_reward")    a Python function module:function
    resolve_reward("my_rewards.py:score")                    a function in a file
    resolve_reward("http://127.0.0.1:8000/v1")               an OpenAI-compatible endpoint as judge

A Python reward function is called once per sample as ``fn(prompt=..., completion=..., **fields)``
where ``fields`` are the other keys of the prompt's JSONL record (an ``answer`` to check, ...), and
returns a number. An endpoint is asked, through /chat/completions, to rate the response from 0 to
10 (``judge_prompt``); the first number of its reply, divided by 10, is the reward.

Every source is a callable ``source(prompts, completions, records) -> list[float]``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
from pathlib import Path

from lmforge.errors import UserError

JUDGE_PROMPT = (
    "Rate how good the assistant's response is to the user's request, from 0 (worst) to 10 (best). "
    "Reply with the number only.\n\nRequest:\n{prompt}\n\nResponse:\n{completion}"
)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class RewardError(UserError, ValueError):
    """A reward source that cannot be used or returned something that is not a number."""


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


class FunctionReward:
    """A Python function called once per sample."""

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, prompts, completions, records=None) -> list[float]:
        records = records or [{} for _ in prompts]
        out = []
        for p, c, r in zip(prompts, completions, records):
            fields = {k: v for k, v in r.items() if k not in ("prompt", "completion") and not k.startswith("_")}
            value = self.fn(prompt=p, completion=c, **fields)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise RewardError(f"reward function {self.name} returned {value!r}, not a number.") from None
            if not math.isfinite(value):
                raise RewardError(f"reward function {self.name} returned {value}; rewards must be finite numbers.")
            out.append(value)
        return out


class ModelReward:
    """A reward model's score of the prompt and completion, rendered as in its training."""

    def __init__(self, path: str | os.PathLike, tokenizer=None, chat: bool | None = None, max_length: int = 512):
        from lmforge.align.rm import load_reward_model
        from lmforge.tokenizer import load_tokenizer

        self.model = load_reward_model(path)
        try:
            self.tokenizer = tokenizer or load_tokenizer(path)
        except UserError:
            raise RewardError(f"{path} has no tokenizer files; save the reward model with its tokenizer.") from None
        self.chat, self.max_length = chat, max_length

    def __call__(self, prompts, completions, records=None) -> list[float]:
        return self.model.score_texts(self.tokenizer, prompts, completions, self.chat, self.max_length).tolist()


class EndpointReward:
    """An OpenAI-compatible chat model as judge (e.g. ``lmforge serve`` or any hosted model)."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 judge_prompt: str = JUDGE_PROMPT, timeout: float = 120.0):  # fmt: skip
        self.base_url = base_url.rstrip("/")
        self.model, self.judge_prompt, self.timeout = model, judge_prompt, timeout
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "unused"

    def _model(self, client) -> str:
        if self.model is None:
            r = client.get(f"{self.base_url}/models")
            r.raise_for_status()
            self.model = r.json()["data"][0]["id"]
        return self.model

    def __call__(self, prompts, completions, records=None) -> list[float]:
        import httpx

        out = []
        headers = {"Authorization": f"Bearer {self.api_key}"}
        try:
            with httpx.Client(timeout=self.timeout, headers=headers) as client:
                model = self._model(client)
                for p, c in zip(prompts, completions):
                    body = {"model": model, "temperature": 0, "max_tokens": 8,
                            "messages": [{"role": "user", "content": self.judge_prompt.format(prompt=_prompt_text(p), completion=c)}]}  # fmt: skip
                    r = client.post(f"{self.base_url}/chat/completions", json=body)
                    r.raise_for_status()
                    text = r.json()["choices"][0]["message"]["content"] or ""
                    m = NUMBER.search(text)
                    out.append(min(max(float(m.group()), 0.0), 10.0) / 10 if m else 0.0)
        except httpx.HTTPError as e:
            raise RewardError(f"the reward endpoint {self.base_url} failed ({e}); check that it is running and reachable.") from None
        return out


def _import_function(spec: str):
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise RewardError(f"reward source {spec!r}: {path} does not exist.")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise RewardError(f"reward source {spec!r}: cannot import module {target!r} ({e}).") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"reward source {spec!r}: {target} has no function {name!r}.")
    return fn


def resolve_reward(spec, tokenizer=None, chat: bool | None = None, max_length: int = 512):
    """A reward source from a spec string (see the module docstring), or a callable as it is."""
    if isinstance(spec, (FunctionReward, ModelReward, EndpointReward)):
        return spec
    if callable(spec):
        return FunctionReward(spec, getattr(spec, "__name__", "reward"))
    if not isinstance(spec, str) or not spec:
        raise RewardError("no reward source given; set reward to rm:PATH, module:function or http(s)://HOST/v1.")
    if spec.startswith(("http://", "https://")):
        return EndpointReward(spec)
    if spec.startswith("rm:") or Path(spec).is_dir():
        path = spec.removeprefix("rm:")
        if not Path(path).is_dir():
            raise RewardError(f"reward model {path} does not exist; train one with `lmforge rm`.")
        return ModelReward(path, tokenizer, chat, max_length)
    if ":" in spec and re.fullmatch(r"[\w./\\-]+:\w+", spec):
        return FunctionReward(_import_function(spec), spec)
    raise RewardError(
        f"unknown reward source {spec!r}; use a reward model directory (rm:PATH), a Python function "
        "(module:function or file.py:function) or an OpenAI-compatible endpoint (http(s)://HOST/v1)."
    )
