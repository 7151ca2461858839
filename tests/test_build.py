"""Build tier: what `pip install .` compiled into semmim._C."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from semmim.kernels._common import extension


def test_extension_imports_and_reports_build_info():
    ext = extension()
    assert ext is not None, "semmim._C is not importable: the package was installed without it"
    info = ext.build_info()
    for key in ("cuda", "cuda_archs", "cuda_compiler", "openmp", "cxx_compiler", "pybind11"):
        assert key in info


@pytest.mark.skipif(
    not (shutil.which("nvcc") or os.environ.get("CI")) or os.environ.get("SEMMIM_CUDA") == "0",
    reason="no nvcc on this machine and not on CI",
)
def test_cuda_sources_were_compiled():
    info = extension().build_info()
    assert info["cuda"] is True, "nvcc is present but semmim._C was built without CUDA"
    archs = info["cuda_archs"].split(",")
    assert "80" in archs and "90" in archs, info


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cuda_entry_point_without_gpu_raises_clear_error():
    ext = extension()
    if not ext.build_info()["cuda"]:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            ext.mg_build_inverse_cuda(0, 4, 0, 1, 1, 1, 0)
    else:
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            ext.mg_build_inverse_cuda(0, 4, 0, 1, 1, 1, 0)
