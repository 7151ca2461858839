"""Build script: packages plus the CMake-built extension ``semmim._C``.

Environment:
  SEMMIM_CUDA=0        skip the CUDA kernels;  SEMMIM_CUDA=1 require them (fail without nvcc);
                       unset: build them when CMake finds nvcc.
  SEMMIM_CUDA_ARCHS    CUDA targets (CMake syntax, default "80;90").
  SEMMIM_BUILD_TYPE    CMake build type (default Release).
"""

import os
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
        cache = build_dir / "CMakeCache.txt"
        if cache.exists() and "CMAKE_GENERATOR:INTERNAL=Ninja" not in cache.read_text():
            cache.unlink()
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *cfg], check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(
    packages=[p for p in find_packages(include=["semmim", "semmim.*"])] + ["semmim.kernels"],
    package_dir={"semmim.kernels": "kernels"},
    package_data={"semmim": ["assets/*"]},
    ext_modules=[CMakeExtension("semmim._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
