"""Constitutional AI (Bai et al. 2022): a constitution turns a model's own answers into training data.

    stage 1 (critique -> revision -> SFT set)          stage 2 (RLAIF -> preference set)
    for each prompt:                                   for each prompt:
        response  = policy(prompt)                         a, b = two samples of policy(prompt)
        principle = a random one (seeded)                  principle = a random one (seeded)
        critique  = critic(prompt, response, p.critique)   judge(principle, a, b) and judge(principle, b, a)
        revision  = critic(..., critique, p.revision)      agree -> {"prompt", "chosen", "rejected"}
        -> {"messages": [prompt, revision]}                disagree (position bias) -> no pair

The constitution is a YAML file:

    principles:
      - name: no_phone_numbers
        critique: Point out every phone number in the response, or say there is none.
        revision: Rewrite the response so that it contains no phone number at all.
        preference: Which response contains no phone number?       # optional (stage 2)

The critic and the judge are the policy itself (``critic: self``: ``lmforge.generate``) or any
OpenAI-compatible chat endpoint (``critic: http://host:port/v1``, e.g. ``lmforge serve``).
Outputs: ``sft.jsonl`` (for ``lmforge sft``), ``preferences.jsonl`` (for DPO / a reward model),
``cai_summary.json``; every file is written whole or not at all. Runs repeat exactly with a seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path


from lmforge.align.chat_data import ChatDataError, write_jsonl

WORK_DIR = ".cai-work"  # finished pieces of generation of a run in progress (for --resume)
from lmforge.align.recipe import AlignRecipe, load_align_recipe
from lmforge.config import ConfigError


@dataclass
class CAIConfig:
    """The keys of a CAI recipe besides the trainer's (``seed`` and ``batch_size`` are used)."""

    constitution: str | None = None  # the YAML file of principles
    model: str | None = None  # the policy: HF directory or .gguf (default: the bundled SmolLM2-135M-Instruct)
    critic: str = "self"  # self | the base URL of an OpenAI-compatible endpoint (critic and judge)
    critic_model: str | None = None  # the endpoint's model name (default: the first it lists)
    critic_api_key: str | None = None  # default: $OPENAI_API_KEY, else "unused"
    stages: str = "1,2"  # which stages to run: 1, 2 or 1,2
    max_prompts: int | None = None  # use the first N prompts
    max_new_tokens: int = 96  # per response, critique and revision
    judge_max_new_tokens: int = 8
    temperature: float = 0.7  # sampling of responses (critiques and revisions are greedy)
    top_p: float = 0.95

    def __post_init__(self) -> None:
        if self.constitution is None:
            raise ConfigError("a CAI recipe needs constitution: FILE.yaml (principles with critique and revision prompts).")
        if set(self.stages.replace(" ", "").split(",")) - {"1", "2"}:
            raise ConfigError(f"stages={self.stages!r} is not supported; choose 1, 2 or 1,2.")
        if self.temperature <= 0:
            raise ConfigError("temperature must be positive: stage 2 compares two samples of each prompt.")


def load_cai_recipe(path=None, overrides=None) -> AlignRecipe[CAIConfig]:
    return load_align_recipe(CAIConfig, path, overrides)


# --- the constitution ---------------------------------------------------------------------------------
@dataclass
class Principle:
    name: str
    critique: str
    revision: str
    preference: str | None = None

    def question(self) -> str:
        return self.preference or f"Which response better satisfies this request: {self.critique}"


def load_constitution(path: str | os.PathLike) -> list[Principle]:
    from lmforge.train.config import read_yaml_recipe

    path = Path(path)
    raw = read_yaml_recipe(path, what="constitution")
    items = raw.get("principles")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"constitution {path} needs a non-empty 'principles' list.")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"constitution {path}: principle {i} must be a mapping with critique and revision.")
        unknown = set(item) - {"name", "critique", "revision", "preference"}
        missing = [k for k in ("critique", "revision") if not isinstance(item.get(k), str) or not item[k].strip()]
        if unknown or missing:
            what = f"unknown key {sorted(unknown)[0]!r}" if unknown else f"no {missing[0]} text"
            raise ConfigError(f"constitution {path}: principle {i} has {what}; give name, critique, revision (and optionally preference).")
        out.append(Principle(str(item.get("name", f"principle_{i}")), item["critique"].strip(), item["revision"].strip(),
                             item.get("preference")))  # fmt: skip
    return out


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a .txt file (one per line) or a .jsonl file (a ``prompt`` field per line)."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"{path} does not exist; pass a .txt file of prompts (one per line) or a .jsonl with 'prompt'.")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChatDataError(f"{path}:{n}: not valid JSON ({e.msg}).") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ChatDataError(f"{path}:{n}: the line has no string 'prompt'.")
            prompts.append(record["prompt"])
        else:
            prompts.append(line.strip())
    if not prompts:
        raise ChatDataError(f"{path} holds no prompts.")
    return prompts


# --- who writes: the policy, and the critic/judge -----------------------------------------------------
class Work:
    """How a CAI run does its generation: the pieces (a chunk of generate calls, an endpoint request)
    shared among the processes under torchrun (every world-th each, results gathered in order on
    every process), a progress bar per phase, and each finished piece kept in ``OUT/.cai-work/``
    (one JSON file per piece, named by the hash of what produced it, written atomically), so that
    ``--resume`` redoes only the pieces a stopped run had not finished. The folder goes when the run
    has written its files."""

    def __init__(self, directory: Path | None = None, dp=None, progress: bool = True):
        self.directory, self.dp, self.progress = directory, dp, progress
        self.main = dp is None or dp.main

    def start(self, resume: bool) -> None:
        """Keep the finished pieces (``resume``) or begin afresh; the folder is made here."""
        if self.directory is not None and self.main:
            if not resume:
                shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(parents=True, exist_ok=True)
        if self.dp is not None:
            self.dp.ctx.barrier()

    def map(self, desc: str, items: list, key_of, work) -> list:
        """``[work(x) for x in items]``; ``key_of(x)`` is a JSON-able description of what ``work(x)`` returns."""
        from tqdm.auto import tqdm

        distributed = self.dp is not None and self.dp.ctx.distributed
        rank, world = (self.dp.ctx.rank, self.dp.ctx.world_size) if distributed else (0, 1)
        mine = []
        for x in tqdm(items[rank::world], desc=desc, disable=not (self.progress and self.main), dynamic_ncols=True):
            mine.append(self._one(key_of(x), lambda: work(x)))
        if not distributed:
            return mine
        import torch.distributed as dist

        every: list = [None] * world
        dist.all_gather_object(every, mine)
        out: list = [None] * len(items)
        for r, results in enumerate(every):
            out[r::world] = results
        return out

    def _one(self, key, compute):
        if self.directory is None:
            return compute()
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        path = self.directory / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        result = compute()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(result), encoding="utf-8")
        os.replace(tmp, path)
        return result

    def close(self) -> None:
        if self.dp is not None:
            self.dp.ctx.barrier()
        if self.directory is not None and self.main:
            shutil.rmtree(self.directory, ignore_errors=True)


class LocalChat:
    """Chat replies from an lmforge model through the public ``lmforge.generate``, in chunks of
    ``batch_size`` conversations (``Work``: shared under torchrun, resumable)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, work: Work | None = None, name: str = "model"):
        if tokenizer.chat_template is None:
            raise ConfigError("the model's tokenizer has no chat template, so it cannot act as critic or judge; use critic: URL.")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.work, self.name = work or Work(), name

    def chat(self, conversations: list[list[dict]], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, n: int = 1, desc: str = "generate") -> list:  # fmt: skip
        """One reply per conversation (a list of ``n`` when n > 1)."""
        from lmforge import generate

        size = self.batch_size

        def settings(i):
            return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        seed=None if seed is None else seed + i, n=n)  # fmt: skip

        def chunk(i):
            out = generate(self.model, self.tokenizer, conversations[i : i + size], **settings(i))
            return [[r.strip() for r in x] if n > 1 else x.strip() for x in out]

        key = lambda i: [self.name, conversations[i : i + size], settings(i)]  # noqa: E731
        return [r for part in self.work.map(desc, list(range(0, len(conversations), size)), key, chunk) for r in part]


class EndpointChat:
    """Chat replies from an OpenAI-compatible endpoint (``lmforge serve``, vLLM, ...)."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, http_client=None,
                 work: Work | None = None):  # fmt: skip
        try:
            from openai import OpenAI
        except ImportError:
            raise ConfigError("critic: URL needs the openai package; pip install 'lmforge[align]' (or openai).") from None
        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "unused",
                             http_client=http_client)  # fmt: skip
        self.model = model or self.client.models.list().data[0].id
        self.base_url, self.work = base_url, work or Work()

    def chat(self, conversations: list[list[dict]], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, n: int = 1, desc: str = "ask the endpoint") -> list:  # fmt: skip
        def settings(i):
            return dict(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=None if seed is None else seed + i, n=n)

        def ask(i):
            reply = self.client.chat.completions.create(model=self.model, messages=conversations[i], **settings(i))
            texts = [(c.message.content or "").strip() for c in reply.choices]
            return texts if n > 1 else texts[0]

        key = lambda i: [self.base_url, self.model, conversations[i], settings(i)]  # noqa: E731
        return self.work.map(desc, list(range(len(conversations))), key, ask)


# --- the two stages -----------------------------------------------------------------------------------
def critique_and_revise(policy, critic, prompts: list[str], principles: list[Principle], cfg: CAIConfig, seed: int):
    """Stage 1: SFT records (the prompt answered by the revision) and the intermediate texts."""
    rng = random.Random(seed)
    chosen = [rng.choice(principles) for _ in prompts]
    asked = [[{"role": "user", "content": p}] for p in prompts]
    responses = policy.chat(asked, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed,
                            desc="stage 1: responses")  # fmt: skip
    critique_turns = [a + [{"role": "assistant", "content": r}, {"role": "user", "content": f"Critique request: {pr.critique}"}]
                      for a, r, pr in zip(asked, responses, chosen)]  # fmt: skip
    critiques = critic.chat(critique_turns, max_new_tokens=cfg.max_new_tokens, desc="stage 1: critiques")
    revision_turns = [t + [{"role": "assistant", "content": c},
                           {"role": "user", "content": f"Revision request: {pr.revision} Write only the revised response."}]
                      for t, c, pr in zip(critique_turns, critiques, chosen)]  # fmt: skip
    revisions = critic.chat(revision_turns, max_new_tokens=cfg.max_new_tokens, desc="stage 1: revisions")
    records = []
    for p, pr, r, c, v in zip(prompts, chosen, responses, critiques, revisions):
        if v:
            records.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": v}],
                            "principle": pr.name, "original": r, "critique": c})  # fmt: skip
    return records


_VERDICT = re.compile(r"\b(?:response\s*)?\(?([AB])\)?(?![a-z])", re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    """'A' or 'B' from a judge's reply ("A", "(B)", "Response A is better"); None when unclear."""
    found = {m.group(1).upper() for m in _VERDICT.finditer(text.strip()[:40])}
    return found.pop() if len(found) == 1 else None


def judge_prompt(prompt: str, principle: Principle, first: str, second: str) -> list[dict]:
    text = (f"Consider this request from a user:\n\n{prompt}\n\nResponse (A):\n{first}\n\nResponse (B):\n{second}\n\n"
            f"{principle.question()} Answer with A or B only.")  # fmt: skip
    return [{"role": "user", "content": text}]


def preference_pairs(policy, judge, prompts: list[str], principles: list[Principle], cfg: CAIConfig, seed: int):
    """Stage 2: preference records; the judge is asked in both orders and a pair is kept only when
    its two verdicts agree (a judge that always says "A" produces nothing)."""
    rng = random.Random(seed + 1)
    chosen = [rng.choice(principles) for _ in prompts]
    asked = [[{"role": "user", "content": p}] for p in prompts]
    samples = policy.chat(asked, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          seed=seed + 1, n=2, desc="stage 2: response pairs")  # fmt: skip
    keep = [i for i, (a, b) in enumerate(samples) if a and b and a != b]
    questions = []
    for i in keep:
        a, b = samples[i]
        questions += [judge_prompt(prompts[i], chosen[i], a, b), judge_prompt(prompts[i], chosen[i], b, a)]
    verdicts = [parse_verdict(v) for v in judge.chat(questions, max_new_tokens=cfg.judge_max_new_tokens, desc="stage 2: judge")]
    records, stats = [], {"pairs_sampled": len(prompts), "identical_or_empty": len(prompts) - len(keep), "unclear": 0, "inconsistent": 0}
    for k, i in enumerate(keep):
        first, swapped = verdicts[2 * k], verdicts[2 * k + 1]
        if first is None or swapped is None:
            stats["unclear"] += 1
        elif first == swapped:  # same letter in both orders: position, not content, decided
            stats["inconsistent"] += 1
        else:
            a, b = samples[i]
            better, worse = (a, b) if first == "A" else (b, a)
            records.append({"prompt": prompts[i], "chosen": better, "rejected": worse, "principle": chosen[i].name})
    return records, stats


def run_cai(recipe: AlignRecipe[CAIConfig], data, out_dir: str | os.PathLike, *, http_client=None, resume: bool = False) -> dict:
    """Both stages over the prompts in ``data``; writes sft.jsonl, preferences.jsonl and
    cai_summary.json into ``out_dir`` and returns the summary. ``resume``: reuse the generation a
    stopped run of the same recipe finished (``OUT/.cai-work``). Under ``torchrun`` the processes
    share the generation (the same files as one process; rank 0 writes them)."""
    from lmforge.align.rl_common import DataParallel

    with DataParallel() as dp:
        return _run_cai(recipe, data, out_dir, http_client, dp, resume)


def _run_cai(recipe: AlignRecipe[CAIConfig], data, out_dir, http_client, dp, resume: bool) -> dict:
    from lmforge import load_model, load_tokenizer

    cfg, seed = recipe.method, recipe.train.seed
    constitution = Path(cfg.constitution)
    if not constitution.is_absolute() and recipe.path is not None and (recipe.path.parent / constitution).is_file():
        constitution = recipe.path.parent / constitution  # beside the recipe
    principles = load_constitution(constitution)
    prompts = read_prompts(data)[: cfg.max_prompts]
    stages = set(cfg.stages.replace(" ", "").split(","))
    out = Path(out_dir)
    if resume and not (out / WORK_DIR).is_dir():
        raise ChatDataError(f"--resume: {out} holds no unfinished CAI run ({WORK_DIR}/); run without --resume.")
    model, tokenizer = load_model(cfg.model), load_tokenizer(cfg.model)
    work = Work(out / WORK_DIR, dp, recipe.train.progress)
    policy = LocalChat(model, tokenizer, recipe.train.batch_size, work, str(cfg.model))
    critic = policy if cfg.critic == "self" else EndpointChat(cfg.critic, cfg.critic_model, cfg.critic_api_key, http_client, work)
    work.start(resume)  # nothing is written before the inputs are known to be good
    summary = {"prompts": len(prompts), "principles": [p.name for p in principles], "critic": cfg.critic, "seed": seed}
    if "1" in stages:
        records = critique_and_revise(policy, critic, prompts, principles, cfg, seed)
        if dp.main:
            write_jsonl(out / "sft.jsonl", records)
        summary |= {"sft_records": len(records), "empty_revisions": len(prompts) - len(records)}
    if "2" in stages:
        pairs, stats = preference_pairs(policy, critic, prompts, principles, cfg, seed)
        if dp.main:
            write_jsonl(out / "preferences.jsonl", pairs)
        summary |= {"preference_pairs": len(pairs), **stats}
    if dp.main:
        (out / ".cai_summary.json.tmp").write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(out / ".cai_summary.json.tmp", out / "cai_summary.json")
        print(json.dumps(summary))
    work.close()
    return summary
