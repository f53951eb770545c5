"""`lmforge sft` on a tiny chat model: LoRA and full fine-tuning learn, files and curves are written,
--resume continues exactly, and bad input is one sentence with exit status 2 and nothing written."""

import json

import pytest
import torch

from lmforge import load_model, load_tokenizer
from lmforge.align.lora import load_adapter, merge_lora
from lmforge.align.sft import load_sft_recipe, sft
from lmforge.cli import main
from lmforge.train import read_metrics
from sft_helpers import FAST, arithmetic_chats, make_tiny_chat_model, sft_recipe, write_jsonl


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    make_tiny_chat_model(d / "model")
    make_tiny_chat_model(d / "plain", template=None)
    write_jsonl(d / "train.jsonl", arithmetic_chats(48))
    return d


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def test_lora_sft_learns_and_writes_a_peft_adapter(work, tmp_path):
    recipe = load_sft_recipe(sft_recipe(tmp_path, work / "model", max_iters=12, eval_interval=6, lora_targets="all-linear",
                                               learning_rate=2e-2), FAST)
    result = sft(recipe, work / "train.jsonl", tmp_path / "run")
    vals = [r["val_loss"] for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0] - 0.2, vals
    out = tmp_path / "run"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()  # an adapter run exports the adapter only
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert result.steps == 12 and result.final_val_loss == pytest.approx(vals[-1])
    # the saved adapter is the trained one: merged onto the base it changes the logits
    x = torch.arange(12)[None]
    base = load_model(work / "model")
    tuned = merge_lora(load_adapter(load_model(work / "model"), out))
    assert (tuned(x) - base(x)).abs().max() > 1e-2
    assert load_tokenizer(out).vocab_size == base.config.vocab_size


def test_resume_continues_exactly(work, tmp_path):
    keys = dict(max_iters=6, lr_decay_iters=6, checkpoint_interval=3, eval_interval=0)
    full = tmp_path / "full"
    sft(load_sft_recipe(sft_recipe(tmp_path, work / "model", **keys), FAST), work / "train.jsonl", full)
    part = tmp_path / "part"
    sft(load_sft_recipe(sft_recipe(tmp_path, work / "model", **{**keys, "max_iters": 3}), FAST), work / "train.jsonl", part)
    sft(load_sft_recipe(sft_recipe(tmp_path, work / "model", **keys), FAST), work / "train.jsonl", part, resume=True)
    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-6, (a, b)


def test_full_finetuning_with_packing_exports_a_checkpoint(work, tmp_path):
    recipe = load_sft_recipe(sft_recipe(tmp_path, work / "model", finetune="full", packing=True, learning_rate=3e-3,
                                        max_iters=6, eval_interval=6), FAST)  # fmt: skip
    sft(recipe, work / "train.jsonl", tmp_path / "run")
    vals = [r["val_loss"] for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert vals[-1] < vals[0], vals
    trained, base = load_model(tmp_path / "run"), load_model(work / "model")
    x = torch.arange(10)[None]
    assert (trained(x) - base(x)).abs().max() > 1e-3
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert state["data"]["packing"] is True and state["data"]["batch_index"] == 6


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_messages", r"bad\.jsonl:2: the line has no 'messages'"),
        ("unknown_role", r"bad\.jsonl:1: message 0 has the unknown role 'human'"),
        ("no_assistant", r"bad\.jsonl:1: the conversation has no assistant turn"),
        ("no_template", r"is chat data but the tokenizer of .*plain has no chat template; set chat_template"),
        ("bad_target", r"lora_targets: 'qkv_proj' names no module of this llama model"),
        ("bad_key", r"unknown config key 'lora_rank'; did you mean lora_r"),
        ("answer_prefix", r"answer_prefix weighs a pretraining corpus; SFT already takes its loss on the assistant tokens"),
    ],
)  # fmt: skip
def test_bad_input_is_one_sentence_exit_2_nothing_written(work, tmp_path, capsys, case, message):
    good = {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}
    lines = {"no_messages": [good, {"prompt": "1+1"}],
             "unknown_role": [{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "2"}]}],
             "no_assistant": [{"messages": [{"role": "user", "content": "hi"}]}]}.get(case, [good] * 4)  # fmt: skip
    data = write_jsonl(tmp_path / "bad.jsonl", lines)
    model = work / ("plain" if case == "no_template" else "model")
    extra = {"bad_target": ["--lora_targets=qkv_proj"], "bad_key": ["--lora_rank=4"],
             "answer_prefix": ["--answer_prefix=A: "]}.get(case, [])  # fmt: skip
    recipe = sft_recipe(tmp_path, model)
    code = main(["sft", str(recipe), "--data", str(data), "--out", str(tmp_path / "out"), *FAST, *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("lmforge sft: error: ") and err.count("\n") == 1, err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_qlora_style_int8_base(work, tmp_path):
    recipe = load_sft_recipe(sft_recipe(tmp_path, work / "model", quantize_base="int8", lora_targets="all-linear",
                                        learning_rate=2e-2, max_iters=8, eval_interval=8), FAST)  # fmt: skip
    sft(recipe, work / "train.jsonl", tmp_path / "run")
    vals = [r["val_loss"] for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert vals[-1] < vals[0] - 0.1, vals
    # reloaded onto the int8 base it was trained against, then merged: plain linear layers again
    model = merge_lora(load_adapter(load_model(work / "model"), tmp_path / "run", quantize_base="int8"))
    assert all(type(b.attn.qkv) is torch.nn.Linear for b in model.stack.layers)


def test_recipe_keys_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("finetune: lora\nlora_targets: [q_proj]\nmax_iters: 7\nlearning_rate: 1e-3\n", encoding="utf-8")
    r = load_sft_recipe(path, ["--lora_targets=q_proj,o_proj", "--lora_r", "4", "--packing=yes", "--batch_size=3"])
    assert r.method.lora_targets == ["q_proj", "o_proj"] and r.method.lora_r == 4 and r.method.packing is True
    assert r.train.max_iters == 7 and r.train.batch_size == 3 and r.train.learning_rate == 1e-3
    from lmforge.config import ConfigError

    with pytest.raises(ConfigError, match="quantize_base=int8 freezes the base weights, so it needs finetune=lora"):
        load_sft_recipe(path, ["--finetune=full", "--quantize_base=int8"])
