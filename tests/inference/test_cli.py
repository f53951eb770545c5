"""`lmforge generate` and `lmforge chat` on a tiny model saved with SmolLM2's tokenizer."""

from __future__ import annotations

import io
import re

import pytest

from lmforge.cli import main
from lmforge.inference import generate


def test_generate_streams_the_completion(tiny_chat, smol_tokenizer, capsys):
    path, model = tiny_chat
    assert main(["generate", str(path), "-p", "Hello there", "--max-new-tokens", "12"]) == 0  # greedy by default
    out, err = capsys.readouterr()
    assert out == generate(model, smol_tokenizer, "Hello there", max_new_tokens=12, temperature=0) + "\n"
    assert re.fullmatch(r"\[12 tokens, first token after [\d.]+ s, then [\d.]+ tokens/s\]\n", err)


@pytest.mark.slow  # compiles a tiny model
def test_generate_compile_reports_the_rate_after_compiling(tiny_chat, smol_tokenizer, capsys):
    path, model = tiny_chat
    assert main(["generate", str(path), "-p", "Hello there", "--max-new-tokens", "12", "--compile"]) == 0
    out, err = capsys.readouterr()
    assert out == generate(model, smol_tokenizer, "Hello there", max_new_tokens=12, temperature=0) + "\n"
    # the first decode step (where compilation happens) is left out of the rate, and named when it is long
    assert re.fullmatch(r"\[12 tokens, first token after [\d.]+ s(, step compiled in [\d.]+ s)?, then [\d.]+ tokens/s\]\n", err)


def test_generate_chat_uses_the_template(tiny_chat, smol_tokenizer, capsys):
    path, model = tiny_chat
    args = ["generate", str(path), "--chat", "-p", "Hi", "--system", "Be brief.", "--max-new-tokens", "8", "--temperature", "0"]
    assert main(args) == 0
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert capsys.readouterr().out == generate(model, smol_tokenizer, messages, max_new_tokens=8, temperature=0) + "\n"


def test_chat_keeps_history_and_resets(tiny_chat, smol_tokenizer, capsys, monkeypatch):
    path, model = tiny_chat
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nHow are you?\n/reset\nHow are you?\n"))
    kw = dict(max_new_tokens=6, temperature=1.0, seed=3)
    assert main(["chat", str(path), "--max-new-tokens", "6", "--temperature", "1", "--top-p", "1", "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    first = generate(model, smol_tokenizer, [{"role": "user", "content": "Hello"}], **kw)
    second = generate(model, smol_tokenizer, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                                              {"role": "user", "content": "How are you?"}], **kw)  # fmt: skip
    fresh = generate(model, smol_tokenizer, [{"role": "user", "content": "How are you?"}], **kw)
    assert second != fresh  # the history does change the reply, so the check below means something
    assert out == f"> {first}\n> {second}\n> > {fresh}\n> "  # input() prints the "> " prompts
    assert "history cleared" in err and err.count("tokens/s") == 3


def test_bad_arguments_exit_2_with_one_line(tiny_chat, capsys):
    path, _ = tiny_chat
    assert main(["generate", str(path), "-p", "", "--max-new-tokens", "4"]) == 2
    assert main(["generate", str(path), "-p", "x", "--top-p", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "empty" in err[0] and "top_p" in err[1]
