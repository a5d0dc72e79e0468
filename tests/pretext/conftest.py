"""Fixtures shared by the pretext tests."""

import pytest


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every pretext test runs on one intra-op thread (see ``one_thread`` in tests/conftest.py)."""
