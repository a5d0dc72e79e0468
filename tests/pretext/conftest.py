"""Fixtures shared by the pretext tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Every pretext test on one intra-op thread, then the setting restored: ops on 32-64 px inputs have little
    to split, and on the shared 2-core machine two threads wait for each other at every op (the synthetic
    overfit test took about 5 s on one thread and 15-47 s on two)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
