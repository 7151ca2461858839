"""Build script: packages plus the CMake-built extension ``semmim._C``.

Environment:
  SEMMIM_CUDA=0        skip the CUDA kernels;  SEMMIM_CUDA=1 require them (fail without nvcc);
                       unset: build them when CMake finds nvcc.
  SEMMIM_CUDA_ARCHS    CUDA targets (CMake syntax, default "80;90").
  SEMMIM_BUILD_TYPE    CMake build type (default Release).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("SEMMIM_CUDA", "").strip().upper()
        cuda_mode = {"0": "OFF", "OFF": "OFF", "1": "ON", "ON": "ON"}.get(cuda, "AUTO")
        cfg = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('SEMMIM_BUILD_TYPE', 'Release')}",
            f"-DSEMMIM_CUDA={cuda_mode}",
            f"-DSEMMIM_CUDA_ARCHS={os.environ.get('SEMMIM_CUDA_ARCHS', '80;90')}",
            "-GNinja",
        ]
        cmake = shutil.which("cmake") or "cmake"
        ninja = _ninja()
        cfg.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        _discard_stale_cache(
            build_dir,
            {
                "CMAKE_GENERATOR": "Ninja",
                "CMAKE_COMMAND": cmake,  # compared only for existence (below)
                "CMAKE_MAKE_PROGRAM": ninja,
                "Python_EXECUTABLE": sys.executable,
                "pybind11_DIR": pybind11.get_cmake_dir(),
            },
        )
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *cfg], check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)


def _ninja() -> str:
    """The ninja of this build environment (pip's isolated env puts the ``ninja`` wheel on PATH)."""
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja

        return str(Path(ninja.BIN_DIR) / "ninja")
    except (ImportError, AttributeError):
        return "ninja"


def _cache_entries(cache: Path) -> dict[str, str]:
    entries = {}
    for line in cache.read_text(errors="replace").splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith(("#", "//")):
            entries[name.partition(":")[0]] = value
    return entries


def _same_path(a: str, b: str) -> bool:
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def _discard_stale_cache(build_dir: Path, expected: dict[str, str]) -> None:
    """Delete CMakeCache.txt and CMakeFiles/ when the cache names other tools than this build's.

    pip builds each ``pip install .`` in a fresh, temporary isolation env and deletes it afterwards;
    the cache of the previous build then points CMAKE_MAKE_PROGRAM, CMAKE_COMMAND, Python and
    pybind11 at files that no longer exist (or at another interpreter), and CMake refuses to
    configure. A cache that disagrees with any of ``expected`` is thrown away: the compiled objects
    stay, so ninja rebuilds only what the new configuration changes.
    """
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return
    recorded = _cache_entries(cache)
    stale = [
        f"{key}: cached {recorded.get(key)!r}, now {want!r}"
        for key, want in expected.items()
        if key not in recorded or not _same_path(recorded[key], want)
    ]
    # CMake rewrites CMAKE_COMMAND itself; it only matters when the cached one is gone.
    if os.path.exists(recorded.get("CMAKE_COMMAND", "")):
        stale = [s for s in stale if not s.startswith("CMAKE_COMMAND:")]
    if stale:
        print(f"semmim setup.py: discarding the stale CMake cache ({'; '.join(stale)})")
        cache.unlink()
        shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)


setup(
    # semmim/assets/ (the tokenizer vocabulary) has no __init__.py: declared as a data package so
    # setuptools neither warns that it "would be ignored" nor leaves vocab.txt out
    packages=find_packages(include=["semmim", "semmim.*"]) + ["semmim.assets", "semmim.kernels"],
    package_dir={"semmim.kernels": "kernels"},
    package_data={"semmim.assets": ["vocab.txt"]},
    ext_modules=[CMakeExtension("semmim._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
