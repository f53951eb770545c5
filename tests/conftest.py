"""Fixtures every test folder may use."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models spend their time in per-op overhead, which a second thread only adds to on a busy
    2-core machine (10x slower measured): tests of tiny models run single-threaded. Folders that want
    it for every test depend on it from an autouse fixture of their conftest."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
