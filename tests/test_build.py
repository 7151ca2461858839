"""Build tier: what `pip install .` compiled into semmim._C."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_clone_root_imports_source_with_kernels_and_installed_extension(tmp_path):
    """From a clone's root the source folder semmim/ shadows the installed package (issue 20):
    semmim.kernels must come from the clone's kernels/ and semmim._C, after a non-editable
    install, from the installed distribution (found through its RECORD)."""
    root = Path(__file__).resolve().parent.parent
    clone, site = tmp_path / "clone", tmp_path / "site"
    skip = shutil.ignore_patterns("_C*", "__pycache__")
    shutil.copytree(root / "semmim", clone / "semmim", ignore=skip)
    shutil.copytree(root / "kernels", clone / "kernels", ignore=skip)
    built = Path(extension().__file__)
    (site / "semmim").mkdir(parents=True)
    shutil.copy2(built, site / "semmim" / built.name)
    dist_info = site / "semmim-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: semmim\nVersion: 0.1.0\n")
    (dist_info / "RECORD").write_text(f"semmim/{built.name},,\nsemmim/__init__.py,,\n")
    probe = (
        "import semmim, semmim.kernels, semmim._C\n"
        "print(semmim.__file__, semmim.kernels.__file__, semmim._C.__file__, sep='\\n')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=clone, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [
        str(clone / "semmim" / "__init__.py"),
        str(clone / "kernels" / "__init__.py"),
        str(site / "semmim" / built.name),
    ]


def test_clone_root_without_any_build_says_what_to_run(tmp_path, monkeypatch):
    import semmim

    (tmp_path / "semmim").mkdir()
    finder = semmim._SourceCheckoutFinder(tmp_path / "semmim", tmp_path / "kernels")
    monkeypatch.setattr(semmim, "_installed_extension", lambda: None)
    with pytest.raises(ImportError, match=r"pip install \.` or `pip install -e \."):
        finder.find_spec("semmim._C")
    assert finder.find_spec("semmim.model") is None  # answers for its two names only


def _checkout_copy(dest: str) -> None:
    """Copy the tracked files of this checkout (with uncommitted edits) to ``dest``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = os.path.join(root, name)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, name))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the checkout's files")
def test_two_consecutive_pip_installs_in_one_checkout(tmp_path):
    """README quick start: `pip install .` twice in one clone (issue 10 §1).

    The first build leaves build/.../CMakeCache.txt pointing at the ninja, cmake and pybind11 of
    pip's deleted isolation env; setup.py must discard it. C++ only, Debug: short compiles.
    """
    clone = tmp_path / "clone"
    _checkout_copy(str(clone))
    env = {**os.environ, "SEMMIM_CUDA": "0", "SEMMIM_BUILD_TYPE": "Debug"}
    for i in (1, 2):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-v",  # the build backend's warnings reach the output
                "--no-deps",
                "--target",
                str(tmp_path / f"t{i}"),
                ".",
            ],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, (
            f"install {i} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
        assert (clone / "build").is_dir()
        out = proc.stdout + proc.stderr
        assert "would be ignored" not in out and "semmim.assets" not in out.replace(
            "semmim/assets", ""
        ), f"install {i}: setuptools warns about semmim.assets:\n{out[-3000:]}"
        vocab = tmp_path / f"t{i}" / "semmim" / "assets" / "vocab.txt"
        assert vocab.is_file(), f"install {i} lost the tokenizer vocabulary"
        built = [p for p in os.listdir(tmp_path / f"t{i}" / "semmim") if p.startswith("_C")]
        assert built, f"install {i} has no semmim._C"
