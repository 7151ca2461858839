"""Helpers shared by the op modules: the compiled extension and its limits, backend reasons,
input checks, the autocast rule, and the ONE output allocator (with its test poison hook)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch

# dtype codes understood by semmim._C (csrc/common.h keeps the same numbering)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int32: 3, torch.int64: 4}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Probed once at import (not per call): dispatch reads plain module globals, so torch.compile
# traces the backend choice without calling into pybind11 or importing anything.
def _probe_extension() -> tuple[ModuleType | None, str]:
    try:
        from semmim import _C  # type: ignore[attr-defined]
    except ImportError as e:
        return None, f"semmim._C is not importable ({e})"
    return _C, ""


def _probe_triton() -> str:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # triton may fail with other errors than ImportError on odd setups
        return f"triton is not importable ({type(e).__name__}: {e})"
    return ""


_EXT, _EXT_ERROR = _probe_extension()
_EXT_HAS_CUDA = bool(_EXT.build_info()["cuda"]) if _EXT is not None else False
_LIMITS = dict(_EXT.limits()) if _EXT is not None else {}
_TRITON_ERROR = _probe_triton()


def extension() -> ModuleType | None:
    """The compiled module ``semmim._C``, or None when it is not built."""
    return _EXT


def extension_has_cuda() -> bool:
    """``semmim._C`` was built with its CUDA kernels."""
    return _EXT_HAS_CUDA


def limits() -> dict[str, int]:
    """Size limits owned by the compiled kernels (``semmim._C.limits()``); {} when not built."""
    return _LIMITS


def extension_import_error() -> str:
    return _EXT_ERROR


def triton_import_error() -> str:
    return _TRITON_ERROR


def interpret_mode() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tensors_of(*args: Any) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor)]


def triton_reasons(*args: Any) -> list[str]:
    """Reasons the Triton backend cannot run on these tensors (device and import checks)."""
    err = triton_import_error()
    if err:
        return [err]
    devs = {t.device.type for t in tensors_of(*args)}
    if interpret_mode():
        if devs - {"cpu"}:
            return [f"TRITON_INTERPRET=1 needs CPU tensors, got {sorted(devs)}"]
        return []
    if devs != {"cuda"}:
        return [f"needs CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors), got {sorted(devs)}"]
    return []


def cuda_ext_reasons(*args: Any) -> list[str]:
    """Reasons the CUDA extension backend cannot run on these tensors."""
    ext = extension()
    if ext is None:
        return [extension_import_error()]
    reasons = []
    if not extension_has_cuda():
        reasons.append("semmim._C built without CUDA")
    devs = {t.device.type for t in tensors_of(*args)}
    if devs != {"cuda"}:
        reasons.append(f"needs CUDA tensors, got {sorted(devs)}")
    return reasons


def cpu_ext_reasons(*args: Any) -> list[str]:
    """Reasons the C++ CPU backend cannot run on these tensors."""
    ext = extension()
    if ext is None:
        return [extension_import_error()]
    devs = {t.device.type for t in tensors_of(*args)}
    if devs != {"cpu"}:
        return [f"needs CPU tensors, got {sorted(devs)}"]
    return []


def stream_of(t: torch.Tensor) -> int:
    """Raw handle of the current CUDA stream on ``t``'s device (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def check_same_device(**tensors: torch.Tensor | None) -> None:
    items = {k: v for k, v in tensors.items() if v is not None}
    devs = {v.device for v in items.values()}
    if len(devs) > 1:
        desc = ", ".join(f"{k} on {v.device}" for k, v in items.items())
        raise ValueError(f"all tensors must be on one device, got {desc}")


def check_not_meta(op: str, **tensors: torch.Tensor | None) -> None:
    """ValueError when the tensors are meta tensors: they hold no values to compute on (or to
    validate). torch.compile traces ops with fake tensors, which report a real device and pass."""
    meta = [k for k, v in tensors.items() if v is not None and v.is_meta]
    if meta:
        raise ValueError(
            f"{op}: {', '.join(meta)} {'is a meta tensor' if len(meta) == 1 else 'are meta tensors'}"
            " (shape only, no data); call it on CPU or CUDA tensors"
        )


def check_float(name: str, t: torch.Tensor, allow_double: bool = False) -> None:
    """float32/float16/bfloat16 (plus float64 where the reference path accepts it)."""
    if t.dtype in FLOAT_DTYPES or (allow_double and t.dtype == torch.float64):
        return
    extra = " (or float64)" if allow_double else ""
    raise ValueError(f"{name} must be float32, float16 or bfloat16{extra}, got {t.dtype}")


def check_tensor(name: str, t: Any, dims: str) -> None:
    """ValueError unless ``t`` is a tensor with ``len(dims.split(','))`` dims, e.g. "B, P, D"."""
    want = len(dims.split(","))
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a ({dims}) tensor, got {type(t).__name__}")
    if t.dim() != want:
        raise ValueError(f"{name} must be ({dims}), got shape {tuple(t.shape)}")


# --------------------------------------------------------------------------------------------
# the autocast rule
# --------------------------------------------------------------------------------------------
def cast_to_input(name: str, t: torch.Tensor | None, ref: torch.Tensor, ref_name: str):
    """``t`` in ``ref``'s dtype under autocast on ``ref``'s device; else a dtype mismatch is a
    ValueError. (Autocast leaves parameters such as position embeddings in fp32 while the
    activations they are added to are bf16/fp16; the cast is differentiable.)"""
    if t is None or t.dtype == ref.dtype:
        return t
    if torch.is_autocast_enabled(ref.device.type) and t.is_floating_point():
        return t.to(ref.dtype)
    raise ValueError(f"{name} dtype {t.dtype} != {ref_name} dtype {ref.dtype}")


# --------------------------------------------------------------------------------------------
# the one output allocator and its poison hook
# --------------------------------------------------------------------------------------------
_POISON = [False]


def new_output(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer for a fast backend. Every fast backend allocates what its
    kernels write through this function, so :func:`poisoned_outputs` reaches all of them."""
    if not _POISON[0]:
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if dtype == torch.bool:  # a byte that is neither 0 nor 1: unwritten mask bytes show
        return torch.full(shape, 2, dtype=torch.uint8, device=device).view(torch.bool)
    return torch.full(shape, -7, dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Test hook: inside, :func:`new_output` returns NaN (floats), -7 (ints) or byte 2 (bool)
    filled buffers, so an element a kernel forgets to write fails the comparison."""
    old = _POISON[0]
    _POISON[0] = True
    try:
        yield
    finally:
        _POISON[0] = old
