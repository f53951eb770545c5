"""PPO end to end on a tiny character model: a learnable reward rises on held-out prompts, the KL
controller adapts, metrics/curves/checkpoints are written, resume is exact, bad reward sources
are refused with one sentence; plus the reward sources themselves."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.align.ppo import PPOConfig, train_ppo
from lmforge.align.rewards import FunctionReward, RewardError, resolve_reward
from lmforge.checkpoints import load_model
from lmforge.errors import UserError
from rl_helpers import char_model_dir, char_prompts, write_jsonl

REWARD = "rl_helpers:vowel_share"


def _cfg(**kw) -> PPOConfig:
    base = dict(model=str(char_model_dir()), reward=REWARD, batch_size=16, micro_batch_size=16, max_new_tokens=8,
                learning_rate=1e-2, ppo_epochs=2, mini_batch_size=8, kl_coef=0.01, eval_fraction=0.25, eval_prompts=32,
                eval_interval=0, checkpoint_interval=5, progress=False, max_length=32)  # fmt: skip
    return PPOConfig(**(base | kw))


def test_ppo_raises_held_out_reward(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", char_prompts(64))
    result = train_ppo(_cfg(max_steps=10, kl_target=0.5, kl_horizon=100), data, tmp_path / "run")
    before, after = result.first_eval["eval_reward"], result.last_eval["eval_reward"]
    assert after > before + 0.15, (before, after)
    assert result.last_eval["eval_kl"] > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "eval_reward" in records[0]
    coefs = [r["kl_coef"] for r in records if "kl_coef" in r]
    assert coefs[0] != 0.01 and len(set(coefs)) > 1  # adaptive
    for key in ("score", "kl", "pg_loss", "vf_loss", "clip_fraction", "length"):
        assert key in records[-1]
    assert (tmp_path / "run" / "curves.png").is_file()
    load_model(result.model_dir)


def test_ppo_resume_is_exact(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", char_prompts(32))
    cfg = dict(eval_fraction=0.0, checkpoint_interval=2, batch_size=8, mini_batch_size=4, micro_batch_size=8)
    full = train_ppo(_cfg(max_steps=4, kl_target=0.5, **cfg), data, tmp_path / "a")
    train_ppo(_cfg(max_steps=2, kl_target=0.5, **cfg), data, tmp_path / "b")
    resumed = train_ppo(_cfg(max_steps=4, kl_target=0.5, **cfg), data, tmp_path / "b", resume=True)
    for (name, p), q in zip(load_model(full.model_dir).state_dict().items(), load_model(resumed.model_dir).state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    rec = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["kl_coef"] for r in rec("a")] == [r["kl_coef"] for r in rec("b")]


def test_unknown_reward_source_is_one_sentence_and_writes_nothing(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", char_prompts(8))
    with pytest.raises(RewardError, match=r"unknown reward source 'vader'.*rm:PATH"):
        train_ppo(_cfg(reward="vader"), data, tmp_path / "out")
    with pytest.raises(RewardError, match=r"cannot import module 'no_such_module'"):
        train_ppo(_cfg(reward="no_such_module:fn"), data, tmp_path / "out")
    with pytest.raises(RewardError, match=r"no function 'nope'"):
        train_ppo(_cfg(reward="rl_helpers:nope"), data, tmp_path / "out")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ab"}, {"text": "no prompt"}])
    with pytest.raises(UserError, match=r"bad\.jsonl:2: missing key 'prompt'"):
        train_ppo(_cfg(), bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_reward_sources(tmp_path):
    f = resolve_reward("lmforge.align.rl_tasks:arithmetic_reward")
    assert f(["What is 2 + 2?"] * 2, ["4", "5"], [{"answer": 4}, {"answer": 4}]) == [1.0, 0.0]
    final = resolve_reward("lmforge.align.rl_tasks:final_answer_reward")
    said = ["2 + 2 is 4.", "4, or 2 + 3 = 5", "no number", "-1"]
    assert f(["p"] * 4, said, [{"answer": 4}] * 3 + [{"answer": -1}]) == [0.0, 1.0, 0.0, 1.0]
    assert final(["p"] * 4, said, [{"answer": 4}] * 3 + [{"answer": -1}]) == [1.0, 0.0, 0.0, 1.0]
    v = resolve_reward("lmforge.align.rl_tasks:vader_reward")
    happy, sad = v(["p", "p"], ["What a lovely, happy day!", "I hate this awful, cruel place."])
    assert happy > 0.5 and sad < -0.5
    (tmp_path / "my_reward.py").write_text("def score(prompt, completion, **kw):\n    return 'high'\n")
    with pytest.raises(RewardError, match="returned 'high', not a number"):
        resolve_reward(f"{tmp_path}/my_reward.py:score")(["p"], ["c"])
    assert isinstance(resolve_reward(lambda prompt, completion: 1.0), FunctionReward)


def test_endpoint_reward_asks_a_judge(monkeypatch):
    httpx = pytest.importorskip("httpx")
    seen = []

    def handler(request):
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "judge"}]})
        body = json.loads(request.content)
        seen.append(body)
        return httpx.Response(200, json={"choices": [{"message": {"content": "Score: 7"}}]})

    real = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real(transport=httpx.MockTransport(handler), **kw))
    src = resolve_reward("http://judge.invalid/v1")
    assert src(["Say hi"], ["Hello!"]) == [0.7]
    assert seen[0]["model"] == "judge" and "Hello!" in seen[0]["messages"][0]["content"]


def test_reward_model_source_scores_like_the_model(tmp_path):
    from lmforge.align.rm import reward_model_from
    from lmforge.tokenizer import load_tokenizer
    from rl_helpers import tiny_model_dir

    d = tiny_model_dir("llama")
    rm = reward_model_from(load_model(d), pad_id=2)
    torch.nn.init.normal_(rm.score.weight)
    tok = load_tokenizer(d)
    rm.save_pretrained(tmp_path / "rm", tokenizer=tok)
    src = resolve_reward(f"rm:{tmp_path / 'rm'}")
    got = src(["Say hi.", "Say bye."], ["Hello!", "Farewell, friend."])
    want = rm.eval().score_texts(tok, ["Say hi.", "Say bye."], ["Hello!", "Farewell, friend."])
    torch.testing.assert_close(torch.tensor(got), want)
    assert got[0] != got[1]
    with pytest.raises(RewardError, match="does not exist; train one with `lmforge rm`"):
        resolve_reward(f"rm:{tmp_path / 'nope'}")
