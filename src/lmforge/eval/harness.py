"""An lm-evaluation-harness model: harness tasks (YAML + local data) scored by lmforge models.

The harness finds models in its own registry; importing this module registers ``lmforge`` there.
Its command line with the model registered:

    python -m lmforge.eval.harness --model lmforge --model_args pretrained=PATH \\
        --tasks my_task --include_path tasks/ --num_fewshot 0

(every ``lm_eval`` option works; ``pretrained`` is a Hugging Face directory or a .gguf file, left out
for the bundled SmolLM2). From Python: ``lm_eval.simple_evaluate(model="lmforge", ...)`` after
``import lmforge.eval.harness``. Scores come from the same functions as ``lmforge eval tasks``
(``loglikelihood``, greedy decoding through ``lmforge.generate``), so a task gives the same accuracy
through either door.

Needs the ``lm_eval`` package (``pip install lm_eval``): it is not a dependency of lmforge.
"""

from __future__ import annotations

import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from lmforge.eval.perplexity import perplexity
from lmforge.eval.tasks import greedy_until, loglikelihood


@register_model("lmforge")
class LmforgeLM(LM):
    """``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until`` over an lmforge decoder."""

    def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None, batch_size: int | str = 16,
                 max_gen_toks: int = 256, **_harness_options) -> None:  # fmt: skip
        super().__init__()
        from lmforge.checkpoints import load_model
        from lmforge.tokenizer import load_tokenizer

        self.model = model if model is not None else load_model(pretrained, dtype=torch.float32, quantize="none")
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(pretrained)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto": our default
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        return loglikelihood(self.model, self.tokenizer, pairs, batch_size=self.batch_size, progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's whole log-likelihood after a beginning-of-text token, in disjoint context windows."""
        prefix = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id
        out = []
        for r in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            ids = ([] if prefix is None else [prefix]) + self.tokenizer.encode(r.args[0], add_special_tokens=False)
            ctx = self.model.config.max_seq_len
            out.append(-perplexity(self.model, ids, context=ctx, stride=ctx).nll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for r in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = r.args
            eos = self.tokenizer.eos_id
            until = gen_kwargs.get("until") or ([self.tokenizer.decode([eos])] if eos is not None else [])
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            outputs += greedy_until(self.model, self.tokenizer, [context], [until], max_new_tokens=max_new)
        return outputs


def main() -> None:
    """The harness's own command line, with ``--model lmforge`` available."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    sys.exit(main())
