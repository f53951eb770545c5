"""TrainConfig, recipes and overrides; the learning-rate schedule; AdamW parameter groups."""

import pytest
import torch

from train_helpers import CHAR_RECIPE, CONFIGS
from lmforge.config import ConfigError, ModelConfig
from lmforge.models import build_model
from lmforge.train import TrainConfig, load_recipe, lr_at, param_groups, parse_overrides
from lmforge.train.optim import WarmupCosine


def test_nanogpt_recipe_is_nanogpts_cpu_recipe():
    r = load_recipe(CHAR_RECIPE)
    t, m = r.train, r.model
    assert (m["preset"], m["n_layer"], m["n_head"], m["n_embd"], m["dropout"]) == ("nanogpt-char", 4, 4, 128, 0.0)
    assert (t.block_size, t.batch_size, t.max_iters, t.lr_decay_iters) == (64, 12, 2000, 2000)
    assert (t.learning_rate, t.final_lr, t.eval_interval, t.eval_iters) == (1e-3, 1e-4, 250, 20)
    assert t.tokenizer == "char" and t.objective == "causal" and t.decay_lr


def _align_loader(kind):
    def load(path):
        from lmforge.align.rl_common import load_config

        module = __import__(f"lmforge.align.{kind}", fromlist=["x"])
        cls = {"rm": "RMConfig", "dpo": "DPOConfig", "ppo": "PPOConfig", "grpo": "GRPOConfig"}[kind]
        return load_config(getattr(module, cls), path)

    return load


def _scaling(path):
    from lmforge.eval.scaling import load_plan

    return load_plan(path)


# recipes of the other verbs, by file-name prefix; the rest are pretraining recipes
OTHER_VERBS = {"rm-": _align_loader("rm"), "dpo-": _align_loader("dpo"), "ppo-": _align_loader("ppo"),
               "grpo-": _align_loader("grpo"), "scaling-": _scaling}  # fmt: skip


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_recipe_loads(recipe):
    for prefix, load in OTHER_VERBS.items():
        if recipe.startswith(prefix):
            assert load(CONFIGS / recipe) is not None
            return
    r = load_recipe(CONFIGS / recipe)
    assert r.train.objective in ("causal", "mlm", "prefix", "span") and r.model.get("preset")


def test_overrides_reach_both_sections_with_types():
    r = load_recipe(CHAR_RECIPE, ["--learning_rate=3e-4", "--max-iters", "7", "--compile=true", "--block_size=none",
                                  "--dropout=0.1", "--n_layer=2", "--rope_scaling={type: linear, factor: 2.0}"])  # fmt: skip
    assert r.train.learning_rate == 3e-4 and r.train.max_iters == 7 and r.train.compile is True
    assert r.train.block_size is None
    assert r.model["dropout"] == 0.1 and r.model["n_layer"] == 2 and r.model["rope_scaling"]["factor"] == 2.0
    assert parse_overrides(["--a=1", "--b", "2"]) == {"a": "1", "b": "2"}


def test_unknown_keys_and_bad_values_are_one_sentence():
    with pytest.raises(ConfigError, match="unknown config key 'lerning_rate'; did you mean learning_rate"):
        load_recipe(CHAR_RECIPE, ["--lerning_rate=1"])
    with pytest.raises(ConfigError, match="unknown config key 'n_layers'; did you mean n_layer"):
        load_recipe(None, {"n_layers": 3})
    with pytest.raises(ConfigError, match="max_iters='many' is not a valid int"):
        load_recipe(CHAR_RECIPE, ["--max_iters=many"])
    with pytest.raises(ConfigError, match="objective='gan' is not supported"):
        TrainConfig(objective="gan")
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--max_iters"])


def test_unknown_key_in_a_recipe_file(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("model: {preset: nanogpt-char, n_embed: 64}\nmax_iters: 10\n")
    with pytest.raises(ConfigError, match="'n_embed'; did you mean n_embd"):
        load_recipe(f)
    f.write_text("max_iters: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_recipe(f)


def test_lr_schedule_is_warmup_then_cosine_then_floor():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=2000, max_iters=2500)
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 101)
    assert lr_at(99, cfg) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    assert lr_at(1050, cfg) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # half way: cos(pi/2) = 0
    assert lr_at(2000, cfg) == pytest.approx(1e-4) and lr_at(2400, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(100, 2001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(5, cfg.replace(decay_lr=False)) == 1e-3
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.learning_rate)
    sched = WarmupCosine(opt, cfg)
    for step in range(300):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, cfg))
        opt.step()
        sched.step()
    opt2 = torch.optim.AdamW([p], lr=cfg.learning_rate)
    sched2 = WarmupCosine(opt2, cfg)
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(300, cfg))


@pytest.mark.parametrize("preset", ["gpt2", "bert-base", "t5-small"])
def test_no_weight_decay_on_norms_biases_embeddings(preset):
    cfg = ModelConfig.from_name(preset, n_layer=1, n_embd=32, n_head=2, head_dim=16, d_ff=64, vocab_size=100, max_seq_len=16,
                                **({"head": "mlm", "pooler": False} if preset == "bert-base" else {}))  # fmt: skip
    model = build_model(cfg)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed and all(n.endswith(".weight") and "norm" not in n and not n.startswith("embed.") for n in decayed)
    assert "embed.tok.weight" in kept  # the (tied) embedding
    assert any(n.endswith("bias") for n in kept) or preset == "t5-small"
    assert any("norm" in n for n in kept)
    assert len(decayed) + len(kept) == len(list(model.parameters()))
    linear = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight is not model.embed.tok.weight)
    assert len(decayed) == linear
