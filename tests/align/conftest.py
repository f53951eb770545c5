"""Shared by every alignment test: tiny models run far faster on one thread when the cores are
shared (no oversubscription)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
