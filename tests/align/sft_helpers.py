"""A tiny chat model (SmolLM2's tokenizer and chat template on a 2-layer LLaMA) and chat data for
the SFT / LoRA / CAI tests (a module name unique in tests/)."""

import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
FAST = ["--progress=false", "--tensorboard=false"]


def tiny_config(vocab_size: int, **over):
    from lmforge import ModelConfig

    values = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, d_ff=64, vocab_size=vocab_size, max_seq_len=128)
    return ModelConfig.from_name("smollm2-135m", **{**values, **over})


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tiny_chat_tokenizer(work: Path, template: str | None = CHATML):
    """A 300-id byte-level BPE with ChatML's control tokens, trained here in a moment."""
    from lmforge.tokenizer import train_bpe

    corpus = work / "corpus.txt"
    lines = [f"user: what is {a} plus {b}? assistant: it is {a + b}. system: you are a helpful assistant."
             for a in range(10) for b in range(10)]
    corpus.write_text("\n".join(lines * 3), encoding="utf-8")
    tok = train_bpe([str(corpus)], 300, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tok.chat_template = template
    return tok


def make_tiny_chat_model(directory: Path, seed: int = 0, template: str | None = CHATML, **over) -> Path:
    """A random tiny LLaMA saved by lmforge (Hugging Face format) with a tiny ChatML tokenizer."""
    from lmforge import build_model

    directory.mkdir(parents=True, exist_ok=True)
    tok = tiny_chat_tokenizer(directory, template)
    (directory / "corpus.txt").unlink()
    torch.manual_seed(seed)
    model = build_model(tiny_config(tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, **over))
    model.save_pretrained(directory, tokenizer=tok)
    return directory


def arithmetic_chats(n: int, seed: int = 0) -> list[dict]:
    """Conversations with a learnable answer: "a+b" -> the sum."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append({"messages": [{"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": str(a + b)}]})
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def sft_recipe(tmp_path: Path, model_dir: Path, **keys) -> Path:
    import yaml

    values = dict(model=str(model_dir), finetune="lora", lora_r=4, lora_alpha=8, lora_targets=["q_proj", "v_proj"],
                  max_iters=6, batch_size=4, block_size=64, learning_rate=1e-2, warmup_iters=0, eval_interval=3,
                  eval_iters=4, log_interval=1, checkpoint_interval=3, weight_decay=0.0)  # fmt: skip
    values.update(keys)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path

