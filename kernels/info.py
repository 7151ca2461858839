"""``python -m semmim.kernels.info``: the build, every op x backend with "ok" or the reasons it
cannot run, and which backend each op would pick now and why (the reasons of the higher-priority
backends it passed over), on small example inputs on CPU and, when a GPU is present, on CUDA.
``SEMMIM_BACKEND`` and ``TRITON_INTERPRET`` are honoured as a call would honour them."""

from __future__ import annotations

import sys

import torch

from . import OPS
from ._common import (
    extension,
    extension_import_error,
    interpret_mode,
    limits,
    triton_import_error,
)
from .registry import ENV_VAR, env_backend


def build_lines() -> list[str]:
    ext = extension()
    lines = [
        f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}",
        f"triton: {triton_import_error() or 'importable'}"
        + (" (TRITON_INTERPRET=1)" if interpret_mode() else ""),
    ]
    if ext is None:
        lines.append(f"semmim._C: {extension_import_error()}")
    else:
        info = ext.build_info()
        lines.append("semmim._C: " + ", ".join(f"{k}={v}" for k, v in info.items()))
        lines.append("semmim._C limits: " + ", ".join(f"{k}={v}" for k, v in limits().items()))
    lines.append(f"{ENV_VAR}: {env_backend() or '(unset: automatic dispatch)'}")
    return lines


def availability(device: str) -> list[tuple[str, str, str]]:
    """(op, backend, "ok" or reasons) for each registered op's example inputs on ``device``."""
    rows = []
    for name, op in sorted(OPS.items()):
        if op.example is None:
            for b in op.ordered():
                rows.append((name, b.name, "no example inputs registered"))
            continue
        args, kwargs = op.example(torch.device(device))
        for b, why in op.reasons(*args, **kwargs).items():
            rows.append((name, b, "ok" if not why else "; ".join(why)))
    return rows


def choices(device: str) -> list[str]:
    """One line per op: ``op -> backend (not higher: reasons | ...)`` on the example inputs."""
    lines = []
    for name, op in sorted(OPS.items()):
        if op.example is None:
            lines.append(f"{name} -> ? (no example inputs registered)")
            continue
        args, kwargs = op.example(torch.device(device))
        chosen, passed_over = op.explain(*args, **kwargs)
        why = f" (not {' | not '.join(passed_over)})" if passed_over else ""
        lines.append(f"{name} -> {chosen or 'nothing can run'}{why}")
    return lines


def main(argv: list[str] | None = None) -> int:
    try:
        env_backend()
    except ValueError as e:  # e.g. a misspelled SEMMIM_BACKEND: the same error a call raises
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in build_lines():
        print(line)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        print(f"\n[{dev} inputs]")
        rows = availability(dev)
        w_op = max((len(r[0]) for r in rows), default=2)
        w_b = max((len(r[1]) for r in rows), default=7)
        for op, b, status in rows:
            print(f"  {op:<{w_op}}  {b:<{w_b}}  {status}")
        print(f"\n[{dev} inputs: the backend each op picks now]")
        for line in choices(dev):
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
