"""Attention maps (weights, PNG, the HTML viewer in headless Chromium) and the training dashboard."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile

import pytest
import torch

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.eval.viz import attention_maps, save_attention_html, save_attention_png, training_dashboard
from lmforge.models import build_model
from lmforge.tokenizer import CharTokenizer
from lmforge.train.metrics import MetricsLog

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "the cat sat on the mat"


def tiny(preset: str, **kw):
    torch.manual_seed(0)
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,\n")
    cfg = ModelConfig.from_name(preset, vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=4, d_ff=64, max_seq_len=64, **kw)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model, tok


@pytest.mark.parametrize("preset,kw", [("smollm2-135m", {"n_kv_head": 2}), ("gpt2", {})], ids=["llama-gqa-rope", "gpt2"])
def test_weights_are_causal_distributions_that_reproduce_the_output(preset, kw):
    model, tok = tiny(preset, **kw)
    maps = attention_maps(model, tok, PROMPT)
    T = len(PROMPT)
    assert len(maps.weights) == 2 and maps.weights[0].shape == (4, T, T)
    assert "".join(maps.tokens) == PROMPT
    for w in maps.weights:
        torch.testing.assert_close(w.sum(-1), torch.ones(4, T))  # every head's rows sum to 1
        assert (w >= 0).all() and w.triu(1).abs().max() == 0  # causal: nothing from the future
    # the recomputed weights, times V, through the output projection, are what each layer returned
    assert maps.max_error < 1e-5


def test_png_and_standalone_html(tmp_path):
    model, tok = tiny("smollm2-135m", n_kv_head=2)
    maps = attention_maps(model, tok, PROMPT)
    png = save_attention_png(maps, tmp_path / "a.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = save_attention_html(maps, tmp_path / "a.html", title="tiny </script> test").read_text()
    assert "http://" not in page and "https://" not in page and "<script src" not in page  # nothing fetched
    data = json.loads(page.split("const DATA = ")[1].split(";\n")[0])
    assert len(data["weights"]) == 2 and len(data["weights"][0]) == 4 and data["tokens"] == maps.tokens
    assert "</script> test" not in page  # the title is escaped


def test_html_viewer_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (make test installs it)")
    model, tok = tiny("smollm2-135m", n_kv_head=2)
    page = save_attention_html(attention_maps(model, tok, PROMPT), tmp_path / "a.html")
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--window-size=800,700", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, timeout=120, check=True)  # fmt: skip
    import matplotlib.image

    img = matplotlib.image.imread(shot)[..., :3]  # (H, W, 3) in [0, 1]
    # the script ran: the first query attends only to itself (weight 1), drawn as pure blue on the canvas
    pure_blue = (img[..., 0] < 0.05) & (img[..., 1] < 0.05) & (img[..., 2] > 0.95)
    assert pure_blue.sum() > 50


def test_cli_attention_and_prompt_errors(tmp_path, capsys):
    model, tok = tiny("smollm2-135m", n_kv_head=2)
    from lmforge.checkpoints import save_pretrained

    d = save_pretrained(model, tmp_path / "m", tokenizer=tok)
    assert main(["viz", "attention", str(d), "-p", PROMPT, "--out", str(tmp_path / "viz")]) == 0
    assert (tmp_path / "viz" / "attention.png").is_file() and (tmp_path / "viz" / "attention.html").is_file()
    with pytest.raises(UserError, match="more than the model's 64"):
        attention_maps(model, tok, "a" * 65)


def test_dashboard_from_a_runs_metrics(tmp_path, capsys):
    log = MetricsLog(tmp_path, tensorboard=False)  # what the trainer writes
    for step in range(10, 101, 10):
        log.log({"step": step, "loss": 3 - step / 50, "lr": 1e-3 * step / 100, "tok_s": 5000.0, "elapsed_s": step / 10})
        if step % 50 == 0:
            log.log({"step": step, "val_loss": 3.1 - step / 50, "val_ppl": 20.0, "train_loss_eval": 3 - step / 50})
    log.close()
    png = training_dashboard(tmp_path)
    assert png == tmp_path / "dashboard.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["viz", "dashboard", str(empty)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
