"""`lmforge rm|dpo|ppo|grpo RECIPE --data --out [--key=value]`: runs, overrides, and one-sentence errors (exit 2)."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main
from rl_helpers import char_model_dir, char_prompts, tiny_model_dir, word_pairs, write_jsonl


def _recipe(tmp_path, **values):
    path = tmp_path / "recipe.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    return str(path)


@pytest.mark.parametrize("verb", ["rm", "dpo"])
def test_pair_verbs_run_from_a_recipe_with_overrides(tmp_path, capsys, verb):
    data = write_jsonl(tmp_path / "pairs.jsonl", word_pairs(16))
    recipe = _recipe(tmp_path, model=str(tiny_model_dir("llama")), max_steps=5, batch_size=4, progress=False, max_length=48)
    assert main([verb, recipe, "--data", str(data), "--out", str(tmp_path / "run"), "--max_steps=2", "--eval_fraction", "0.25"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["kind"] == verb and out["steps"] == 2
    assert (tmp_path / "run" / "final" / "config.json").is_file()


@pytest.mark.parametrize("verb", ["ppo", "grpo"])
def test_rl_verbs_run_with_a_function_reward(tmp_path, capsys, verb):
    data = write_jsonl(tmp_path / "prompts.jsonl", char_prompts(12))
    recipe = _recipe(tmp_path, model=str(char_model_dir()), max_steps=1, batch_size=2, max_new_tokens=4, progress=False,
                     max_length=32, reward="rl_helpers:vowel_share", eval_fraction=0.2)  # fmt: skip
    extra = ["--num_generations=2"] if verb == "grpo" else []
    assert main([verb, recipe, "--data", str(data), "--out", str(tmp_path / "run"), *extra]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 1 and "eval_reward" in out["first_eval"]


def test_errors_are_one_sentence_and_exit_2(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}])
    recipe = _recipe(tmp_path, model=str(tiny_model_dir("llama")), progress=False)
    out = str(tmp_path / "out")
    assert main(["dpo", recipe, "--data", str(data), "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pairs.jsonl:1: chosen and rejected are the same" in err
    assert main(["dpo", recipe, "--data", str(data), "--out", out, "--betta=0.2"]) == 2
    assert "unknown config key 'betta'; did you mean beta" in capsys.readouterr().err
    assert main(["ppo", recipe, "--data", str(data), "--out", out, "--reward=sentiment"]) == 2
    assert "unknown reward source 'sentiment'" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "good.jsonl", word_pairs(4))
    assert main(["rm", recipe, "--data", str(good), "--out", out, "--resume"]) == 2
    assert "has no checkpoint to resume from" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,kind", [("rm-vader-smollm2.yaml", "rm"), ("dpo-smollm2.yaml", "dpo"),
                                       ("ppo-vader-smollm2.yaml", "ppo"), ("grpo-arithmetic-smollm2.yaml", "grpo")])
def test_shipped_recipes_parse(name, kind):
    from pathlib import Path

    from lmforge.align.dpo import DPOConfig
    from lmforge.align.grpo import GRPOConfig
    from lmforge.align.ppo import PPOConfig
    from lmforge.align.rl_common import load_config
    from lmforge.align.rm import RMConfig

    cls = {"rm": RMConfig, "dpo": DPOConfig, "ppo": PPOConfig, "grpo": GRPOConfig}[kind]
    cfg = load_config(cls, Path(__file__).resolve().parents[2] / "configs" / name, ["--max_steps=3"])
    assert cfg.max_steps == 3 and cfg.model is None  # the bundled SmolLM2
