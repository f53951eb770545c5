"""lm-evaluation-harness through the `lmforge` model: a harness task YAML over a local JSONL file gives
the accuracy (and the very answers) of lmforge's own evaluator on the same file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lmforge.checkpoints import save_pretrained
from lmforge.config import ModelConfig
from lmforge.eval.tasks import evaluate_task, load_task
from lmforge.models import build_model
from lmforge.tokenizer import CharTokenizer

lm_eval = pytest.importorskip("lm_eval")

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-=:,.;!?'\n"

MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GEN_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random char-level LLaMA-style model with its tokenizer, saved as a Hugging Face directory."""
    torch.manual_seed(0)
    tok = CharTokenizer.from_text(ALPHABET)
    cfg = ModelConfig.from_name("smollm2-135m", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                                d_ff=64, max_seq_len=64)  # fmt: skip
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return save_pretrained(model, tmp_path_factory.mktemp("tiny"), tokenizer=tok)


@pytest.mark.slow  # ~40 s: the harness's start-up (datasets, task building) dominates
def test_harness_command_line_gives_lmforge_evaluator_accuracy(tiny_dir, tmp_path):
    """`python -m lmforge.eval.harness --model lmforge ...` (the harness's own command line, with our model
    registered) on two harness task YAMLs over local JSONL files."""
    from lmforge.checkpoints import load_model
    from lmforge.tokenizer import load_tokenizer

    mc = [{"context": f"w{i} is", "choices": [" ab", " cde", " f", " gh"], "gold": i % 4} for i in range(12)]
    gen = [{"context": f"{i} + {i} =", "target": f" {2 * i}", "until": ["\n"]} for i in range(6)]
    for name, docs, yaml in (("lmf_mc", mc, MC_YAML), ("lmf_gen", gen, GEN_YAML)):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (tmp_path / f"{name}.yaml").write_text(yaml.format(name=name, data=data))

    cmd = [sys.executable, "-m", "lmforge.eval.harness", "--model", "lmforge", "--model_args", f"pretrained={tiny_dir}",
           "--tasks", "lmf_mc,lmf_gen", "--include_path", str(tmp_path), "--num_fewshot", "0",
           "--output_path", str(tmp_path / "out"), "--log_samples"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"HF_DATASETS_OFFLINE": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    theirs = json.loads(results_file.read_text())["results"]

    def samples(task):
        (f,) = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        return {s["doc_id"]: s for s in map(json.loads, f.read_text().splitlines())}

    model, tok = load_model(tiny_dir), load_tokenizer(tiny_dir)
    ours_mc = evaluate_task(model, tok, load_task(tmp_path / "lmf_mc.jsonl"))
    ours_gen = evaluate_task(model, tok, load_task(tmp_path / "lmf_gen.jsonl"), max_new_tokens=6)
    assert theirs["lmf_mc"]["acc,none"] == pytest.approx(ours_mc.metrics["acc"])
    assert theirs["lmf_mc"]["acc_norm,none"] == pytest.approx(ours_mc.metrics["acc_norm"])
    assert 0 < ours_mc.metrics["acc"] < 1  # a random model: some right, some wrong, so agreement means something
    mc_samples = samples("lmf_mc")  # the harness's per-example log-likelihoods and generations are ours
    for i, ours in enumerate(ours_mc.samples):
        got = [float(r[0]) for r in mc_samples[i]["filtered_resps"]]
        assert got == pytest.approx(ours["loglikelihoods"], abs=1e-5)
    gen_samples = samples("lmf_gen")
    assert [gen_samples[i]["filtered_resps"][0] for i in range(6)] == [s["output"] for s in ours_gen.samples]
    assert theirs["lmf_gen"]["exact_match,none"] == pytest.approx(ours_gen.metrics["exact_match"])
