"""Test tiers (see CONVENTIONS.md): default (CPU), interpret (TRITON_INTERPRET=1, a separate
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
def poison(monkeypatch):
    """Make the fast backends allocate NaN-filled (or -7 for ints) outputs, so an element a
    kernel forgets to write fails the comparison instead of matching by chance."""
    import importlib

    def poisoned(shape, like, dtype=None):
        dtype = dtype or like.dtype
        value = float("nan") if dtype.is_floating_point else -7
        return torch.full(shape, value, dtype=dtype, device=like.device)

    for module in ("masked_gather", "prototype_cross_entropy"):
        monkeypatch.setattr(
            importlib.import_module(f"semmim.kernels.{module}"), "_new_output", poisoned
        )
    return poisoned


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
