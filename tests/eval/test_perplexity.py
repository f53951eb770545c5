import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.eval import perplexity
from lmforge.models import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("smollm2-135m", vocab_size=97, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                                d_ff=64, max_seq_len=64)  # fmt: skip
    return build_model(cfg).eval()


def full_nll(model, ids):
    logits = model(ids[None])[0]
    return F.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()


def test_one_window_is_the_full_context_loss(model):
    ids = torch.randint(0, 97, (50,))
    r = perplexity(model, ids, context=64, stride=64)
    assert r.tokens == 49 and r.windows == 1
    assert r.nll == pytest.approx(full_nll(model, ids), rel=1e-5)


def test_every_token_scored_once_with_the_windows_history(model):
    ids = torch.randint(0, 97, (150,))
    r = perplexity(model, ids, context=32, stride=8)
    assert r.tokens == 149
    # reference: each window scores its tokens past the previous window's end
    nll, prev = 0.0, 0
    for begin in range(0, 149, 8):
        end = min(begin + 32, 150)
        w = ids[begin:end]
        logp = F.log_softmax(model(w[None])[0], -1)
        for j in range(max(prev, begin + 1), end):
            nll -= logp[j - begin - 1, ids[j]].item()
        prev = end
        if end == 150:
            break
    assert r.nll == pytest.approx(nll, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(nll / 149), rel=1e-5)
    # more history can only be scored differently than disjoint windows
    assert perplexity(model, ids, context=32, stride=32).nll != pytest.approx(r.nll, rel=1e-6)


def test_bad_arguments(model):
    ids = list(range(10))
    with pytest.raises(UserError, match="stride"):
        perplexity(model, ids, context=16, stride=32)
    with pytest.raises(UserError, match="context"):
        perplexity(model, ids, context=128)
    with pytest.raises(UserError, match="two tokens"):
        perplexity(model, [1])
