"""Test tiers (see CONTRIBUTING.md): default (CPU), interpret (TRITON_INTERPRET=1, a separate
invocation: `TRITON_INTERPRET=1 pytest -m interpret`), cuda (GPU only), build. Nothing here touches
a GPU at import time."""

from __future__ import annotations

import os

import pytest
import torch


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    gpu = torch.cuda.is_available()
    for item in items:
        if "interpret" in item.keywords and not _interpret():
            item.add_marker(
                pytest.mark.skip(reason="interpret tier: run with TRITON_INTERPRET=1 -m interpret")
            )
        if "cuda" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="cuda tier: no CUDA GPU on this machine"))


@pytest.fixture
def poison():
    """Make every fast backend of every op allocate NaN-filled (floats), -7 (ints) or byte-2
    (bool) outputs through the one allocator, so an element a kernel forgets to write fails the
    comparison instead of matching by chance."""
    from semmim.kernels._common import poisoned_outputs

    with poisoned_outputs():
        yield


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test (deterministic and faster on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
