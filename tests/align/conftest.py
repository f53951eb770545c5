"""Shared by every alignment test: tiny models run far faster on one thread when the cores are
shared (no oversubscription)."""

import pytest


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    """Every test here runs single-threaded (tests/conftest.py: one_thread)."""
