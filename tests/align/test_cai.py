"""Constitutional AI: the constitution file, both stages with the model as its own critic (seeded,
repeatable), an OpenAI-compatible critic/judge (a fake in-process server), and bad input."""

import json
import re

import httpx
import pytest

from lmforge.align.cai import load_cai_recipe, load_constitution, parse_verdict, run_cai
from lmforge.align.chat_data import ChatDataError
from lmforge.align.tasks import cai_prompts, has_phone_number, violations
from lmforge.cli import main
from lmforge.config import ConfigError
from sft_helpers import REPO, make_tiny_chat_model, write_jsonl

CONSTITUTION = REPO / "configs" / "align" / "constitution-checkable.yaml"
FAST = ["--max_new_tokens=12", "--batch_size=4", "--progress=false"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cai")
    make_tiny_chat_model(d / "model", max_seq_len=1024)  # critique and judge prompts hold whole responses
    write_jsonl(d / "prompts.jsonl", cai_prompts(6, seed=1))
    return d


def recipe(work, *extra):
    return load_cai_recipe(REPO / "configs" / "align" / "cai-smollm2.yaml", [f"--model={work / 'model'}", *FAST, *extra])


def test_constitution_and_checkers():
    principles = load_constitution(CONSTITUTION)
    assert [p.name for p in principles] == ["no_phone_numbers", "brief", "plain_words"]
    assert violations("Call 555-123-4567, it is really good.") == {"phone_number": True, "too_long": False, "banned_word": True}
    assert not has_phone_number("In 1999 I had 3 cats and 12 dogs.") and has_phone_number("(020) 7946 0018")
    assert [parse_verdict(t) for t in ["A", "(B)", "Response B is better.", "B.", "A or B", "Both are fine"]] == ["A", "B", "B", "B", None, None]


def test_bad_constitution_names_the_principle(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("principles:\n  - name: x\n    critique: Is it long?\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"principle 0 has no revision text"):
        load_constitution(bad)


def test_self_critique_runs_both_stages_and_repeats_with_a_seed(work, tmp_path):
    a = run_cai(recipe(work), work / "prompts.jsonl", tmp_path / "a")
    run_cai(recipe(work), work / "prompts.jsonl", tmp_path / "b")
    assert a["prompts"] == 6 and a["sft_records"] + a["empty_revisions"] == 6
    for name in ("sft.jsonl", "preferences.jsonl", "cai_summary.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text(), name
    for line in (tmp_path / "a" / "sft.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["principle"] in a["principles"]
    pairs = a["preference_pairs"] + a["identical_or_empty"] + a["unclear"] + a["inconsistent"]
    assert pairs == a["pairs_sampled"] == 6


def fake_endpoint(calls: list):
    """An OpenAI-compatible server in process: revisions drop digits; the judge prefers fewer digits."""

    def reply(messages):
        last = messages[-1]["content"]
        if last.startswith("Critique request:"):
            return "The response has digits in it."
        if last.startswith("Revision request:"):
            return re.sub(r"\d", "", messages[1]["content"]).strip() or "Look it up in a directory."
        first, second = re.search(r"Response \(A\):\n(.*)\n\nResponse \(B\):\n(.*)\n\n", last, re.S).groups()
        da, db = (sum(c.isdigit() for c in t) for t in (first, second))
        return "A" if da < db else "B" if db < da else "not sure"

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake-judge", "object": "model", "created": 0, "owned_by": "me"}]})
        body = json.loads(request.content)
        choices = [{"index": i, "message": {"role": "assistant", "content": reply(body["messages"])}, "finish_reason": "stop"}
                   for i in range(body.get("n") or 1)]  # fmt: skip
        return httpx.Response(200, json={"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                         "choices": choices})  # fmt: skip

    return httpx.Client(transport=httpx.MockTransport(handler))


def test_endpoint_critic_and_judge(work, tmp_path):
    calls = []
    summary = run_cai(recipe(work, "--critic=http://judge.test/v1", "--temperature=1.5"), work / "prompts.jsonl", tmp_path,
                      http_client=fake_endpoint(calls))  # fmt: skip
    assert calls[0] == "/v1/models" and calls.count("/v1/chat/completions") >= 12
    revisions = [json.loads(l)["messages"][1]["content"] for l in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert len(revisions) == 6 and not any(c.isdigit() for r in revisions for c in r)
    pairs = [json.loads(l) for l in (tmp_path / "preferences.jsonl").read_text().splitlines()]
    assert len(pairs) == summary["preference_pairs"] >= 1
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected", "principle"} and p["chosen"] != p["rejected"]
        assert sum(c.isdigit() for c in p["chosen"]) < sum(c.isdigit() for c in p["rejected"])


def test_cli_bad_prompts_file_exits_2_and_writes_nothing(work, tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"question": "no prompt"}\n', encoding="utf-8")
    code = main(["cai", str(REPO / "configs" / "align" / "cai-smollm2.yaml"), "--data", str(bad), "--out", str(tmp_path / "out"),
                 f"--model={work / 'model'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and re.search(r"p\.jsonl:2: the line has no string 'prompt'", err) and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_resume_redoes_only_the_unfinished_generation(work, tmp_path, monkeypatch):
    import lmforge

    whole = run_cai(recipe(work), work / "prompts.jsonl", tmp_path / "whole")
    assert not (tmp_path / "whole" / ".cai-work").exists()  # the pieces go once the files are written
    real, calls = lmforge.generate, []

    def failing(*a, **kw):  # the run is stopped after 4 chunks of generation
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(lmforge, "generate", failing)
    with pytest.raises(KeyboardInterrupt):
        run_cai(recipe(work), work / "prompts.jsonl", tmp_path / "cut")
    assert len(list((tmp_path / "cut" / ".cai-work").glob("*.json"))) == 4 and not (tmp_path / "cut" / "sft.jsonl").exists()

    counted = []
    monkeypatch.setattr(lmforge, "generate", lambda *a, **kw: counted.append(1) or real(*a, **kw))
    resumed = run_cai(recipe(work), work / "prompts.jsonl", tmp_path / "cut", resume=True)
    assert resumed == whole
    for name in ("sft.jsonl", "preferences.jsonl"):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    # 6 prompts in chunks of 4: 2 chunks each of responses, critiques, revisions, pairs, judge (12 questions: 3)
    assert len(counted) == 11 - 4


def test_resume_without_a_stopped_run_is_one_sentence(work, tmp_path):
    with pytest.raises(ChatDataError, match=r"--resume: .* holds no unfinished CAI run \(\.cai-work/\); run without --resume\."):
        run_cai(recipe(work), work / "prompts.jsonl", tmp_path / "none", resume=True)
    assert not (tmp_path / "none").exists()
