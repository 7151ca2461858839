"""Triton compiles without a GPU: which kernel variants a set of launches needs on an sm_90 GPU,
and what each variant costs there (registers, spills, shared memory).

``record_launches()`` (TRITON_INTERPRET unset; CPU tensors): every ``kernel[grid](...)`` launch
is replaced by a record of the key a real launch on an H100 would look up in Triton's kernel
cache, and nothing runs (outputs keep whatever they were allocated with). The key comes from
Triton's own binder built for an sm_90 target (``create_function_from_signature``, as
``JITFunction.run`` does): pointer dtypes and 16-byte alignment, int arguments' type (i32 / i64),
value 1 (a constexpr) and divisibility by 16 unless the kernel lists them in
``do_not_specialize``, the constexprs, ``num_warps`` and ``num_stages``. Distinct keys = the
compiles of a cold cache. ``triton_on_cpu()`` lets the ops' Triton backends accept CPU tensors
(and sizes the launch grids for an H100's 132 SMs) so that the public ops reach the launchers.

``compile_sm90(launch)``: compiles one recorded variant ahead of time for sm_90 with the ptxas
that ships with Triton and reads its resource usage with cuobjdump.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator

H100_SMS = 132


@functools.cache
def _backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", 90, 32))


@functools.cache
def _binder(kernel):
    from triton.runtime.jit import create_function_from_signature

    return create_function_from_signature(kernel.signature, kernel.params, _backend())


def launch_key(kernel, args: tuple, kwargs: dict) -> dict:
    """The sm_90 cache key of ``kernel[grid](*args, **kwargs)`` and what compiling it needs."""
    from triton import knobs

    kwargs = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, specialization, options = _binder(kernel)(*args, **kwargs)
    opts, signature, constexprs, attrs = kernel._pack_args(
        _backend(), kwargs, bound, specialization, options
    )
    return {
        "kernel": kernel.fn.__name__,
        "fn": kernel,
        "key": str(specialization) + str(sorted(options.items())),
        "signature": signature,
        "constexprs": constexprs,
        "attrs": attrs,
        "options": {"num_warps": opts.num_warps, "num_stages": opts.num_stages},
        "dtypes": sorted({v for v in signature.values() if v.startswith("*")}),
    }


@contextlib.contextmanager
def record_launches() -> Iterator[list[dict]]:
    """Record every Triton launch instead of running it (see the module docstring)."""
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("record_launches() needs TRITON_INTERPRET unset")
    launches: list[dict] = []
    run = JITFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        launches.append(launch_key(self, args, kwargs))

    JITFunction.run = recording_run
    try:
        yield launches
    finally:
        JITFunction.run = run


def _zeros(shape, *, dtype, device):
    import torch

    return torch.zeros(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def triton_on_cpu(*ops: str) -> Iterator[None]:
    """The Triton backends of ``ops`` (module names under semmim.kernels; default all four)
    accept CPU tensors, their outputs start as zeros (finite values for the code after a
    recorded launch), and the launchers plan for an H100 (132 SMs)."""
    import importlib

    names = ops or ("masked_gather", "topk_mask", "cross_attention", "prototype_cross_entropy")
    saved = []

    def patch(obj, attr, value):
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    for name in names:
        mod = importlib.import_module(f"semmim.kernels.{name}")
        if hasattr(mod, "_DEVICE_REASONS"):
            patch(mod, "_DEVICE_REASONS", {**mod._DEVICE_REASONS, "triton": lambda *a: []})
        patch(mod, "triton_reasons", lambda *a: [])
        if hasattr(mod, "new_output"):  # code after a recorded (not run) launch sees zeros
            patch(mod, "new_output", _zeros)
        if hasattr(mod, "_num_sms"):
            patch(mod, "_num_sms", lambda device: H100_SMS)
    try:
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def distinct(launches: list[dict]) -> dict[tuple[str, str], dict]:
    """(kernel, key) -> one launch of it: the compiles a cold cache does."""
    return {(x["kernel"], x["key"]): x for x in launches}


def compile_sm90(launch: dict) -> dict:
    """Compile one recorded variant for sm_90: {"regs", "spill" (bytes of stack, None without
    cuobjdump), "shared" (bytes)}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(
        fn=launch["fn"],
        signature=launch["signature"],
        constexprs=launch["constexprs"],
        attrs=launch["attrs"],
    )
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch["options"])
    return {"shared": compiled.metadata.shared, **_resource_usage(compiled.asm["cubin"])}


def _resource_usage(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    if not os.path.exists(tool):
        return {"regs": None, "spill": None}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"regs": int(m.group(1)), "spill": int(m.group(2))}
