"""semmim.kernels: the hot ops of SemMIM, each with a PyTorch reference and faster backends.

Every public op takes ``backend=`` (explicit backend; else ``SEMMIM_BACKEND``; else the first
backend that can run) and ``validate=`` (False skips the checks that read tensor values on the
host). The contract and the op list (``OP_SPECS``) are in :mod:`semmim.kernels.registry` and
``kernels/README.md``; ``record_dispatch()`` records which backend each op ran; ``python -m
semmim.kernels.info`` prints which backend can run where, which one each op would pick now, and
why.

Importing this package is light: it reads the op list, not the ops. ``semmim.kernels.<op>``
imports the op's module (torch, Triton, ``semmim._C``) the first time it is asked for.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from .registry import BACKENDS, OP_NAMES, OP_SPECS, OPS, get_op, record_dispatch

# public function -> the module defining it: every op of OP_SPECS, and the helpers beside them
_FUNCTIONS = {name: spec.module for name, spec in OP_SPECS.items()} | {"gumbel_noise": "topk_mask"}

__all__ = ["BACKENDS", "OP_NAMES", "OP_SPECS", "OPS", "get_op", "record_dispatch", *_FUNCTIONS]


def __getattr__(name: str) -> Any:
    module = _FUNCTIONS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    fn = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = fn  # later lookups skip __getattr__
    return fn


class _Package(types.ModuleType):
    """Importing the submodule ``semmim.kernels.topk_mask`` (by anyone, first) binds it as this
    package's attribute ``topk_mask``, the name of the public function: bind the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _FUNCTIONS:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
