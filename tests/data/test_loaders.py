"""Random-window and sequential loaders over prepared shards: nanoGPT's get_batch, reproducible."""

import numpy as np
import pytest
import torch

from lmforge.data import DataError, RandomWindows, SequentialWindows, generator, mix_seed, prepare


@pytest.fixture(scope="module")
def stream(tmp_path_factory, play_text):
    d = tmp_path_factory.mktemp("loaders")
    (d / "play.txt").write_text(play_text[:30000], encoding="utf-8")
    return prepare(d / "play.txt", d / "out", "char", shard_tokens=4096, progress=False).split("train")


def flat(stream):
    return np.concatenate([np.asarray(a) for a in stream.arrays])


def test_random_windows_are_get_batch(stream):
    data = flat(stream)
    loader = RandomWindows(stream, 65, 12, seed=1)
    x = loader.batch(3, generator(1, 3))
    assert x.shape == (12, 65) and x.dtype == torch.int64
    starts = torch.randint(len(data) - 65 + 1, (12,), generator=generator(1, 3)).numpy()  # nanoGPT: randint(len - block)
    for row, s in zip(x, starts):
        assert row.tolist() == data[s : s + 65].tolist()
    assert torch.equal(loader.batch(3, generator(1, 3)), x)  # batch i is a function of its seed
    assert not torch.equal(loader.batch(4, generator(1, 4)), x)


def test_sequential_windows_walk_the_split_in_order(stream):
    data = flat(stream)
    loader = SequentialWindows(stream, 65, 8, stride=64)
    seen = torch.cat([loader.batch(i) for i in range(len(loader))])
    n = loader.n_windows
    assert n == (len(data) - 65) // 64 + 1
    for w in (0, 1, n // 2, n - 1):
        assert seen[w].tolist() == data[w * 64 : w * 64 + 65].tolist()
    targets = seen[:n, 1:].flatten()  # stride 64 + 1 overlap: every token is a target once
    assert targets.tolist() == data[1 : n * 64 + 1].tolist()
    after = loader.batch(len(loader))  # the next epoch starts again at the first windows
    for j, row in enumerate(after):
        w = (len(loader) * 8 + j) % n
        assert row.tolist() == data[w * 64 : w * 64 + 65].tolist()
    assert loader.state_dict(len(loader))["epoch"] >= 1


def test_too_short_split_is_a_clear_error(stream):
    with pytest.raises(DataError, match="fewer than one window"):
        RandomWindows(stream, len(stream) + 1, 4, seed=0)


def test_mix_seed_is_stable_and_order_sensitive():
    assert mix_seed(1, 2) == mix_seed(1, 2) != mix_seed(2, 1)
    assert 0 <= mix_seed(2**70, -5) < 2**63
