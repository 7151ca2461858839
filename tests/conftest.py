"""Test tiers (see CONTRIBUTING.md): default (CPU), interpret (TRITON_INTERPRET=1, a separate
invocation: `TRITON_INTERPRET=1 pytest -m interpret`), cuda (GPU only), build. Nothing here touches
a GPU at import time."""

from __future__ import annotations

import os

import pytest
import torch


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The GPU check's smoke tier (`benchmarks/gpu_check.sh`, first call: `-m "cuda and smoke"`): the
# cuda tests at the model's shapes (`base` at 224 px: P = 196, D = 768, M = 98, Dh = 64, E = 256,
# K = 8192; the tiny model of test_gpu_path.py), one dtype each. "file::test" -> the parameter
# values an item must have (every listed one; unlisted parameters, e.g. the backend, vary).
# tests/test_triton_compiles.py counts the Triton compiles these shapes need.
CUDA_SMOKE = {
    "test_masked_gather.py::test_gpu_backends_match_reference": dict(
        dtype=torch.bfloat16, idx_dtype=torch.int64, P=196, D=768, R=98
    ),
    "test_topk_mask.py::test_gpu_backends_match_reference": dict(
        dtype=torch.bfloat16, P=196, d=256
    ),
    "test_cross_attention.py::test_cuda_matches_reference": dict(dtype=torch.bfloat16, Dh=64),
    "test_prototype_cross_entropy.py::test_gpu_backends_match_reference": dict(
        dtype=torch.bfloat16, N=392, E=256, Kp=8192
    ),
    "test_gpu_path.py::test_cuda_autocast_training_step": dict(
        amp="bf16", overrides={"mim.drop_tokens": True}
    ),
    "test_gpu_path.py::test_cuda_training_step_without_sync": dict(
        overrides={"mim.drop_tokens": True}
    ),
}


def _is_smoke(item) -> bool:
    want = CUDA_SMOKE.get(f"{item.path.name}::{item.originalname}")
    params = getattr(getattr(item, "callspec", None), "params", {})
    return want is not None and all(k in params and params[k] == v for k, v in want.items())


def pytest_collection_modifyitems(config, items):
    gpu = torch.cuda.is_available()
    for item in items:
        if "cuda" in item.keywords and _is_smoke(item):
            item.add_marker(pytest.mark.smoke)
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
