"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster, and immune to a busy machine (2 threads spin-wait).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the thread count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
