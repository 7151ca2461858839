"""Backend registry shared by every op in :mod:`semmim.kernels`.

Each op registers its backends (``reference``, ``triton``, ``cuda``, ``cpu``, ``sdpa``,
``chunked``) with a priority and a ``supports(*args, **kwargs) -> list[str]`` function: an empty
list means the backend can run on these inputs, otherwise each string is a reason why not. The
public op dispatches:

1. an explicit ``backend=`` argument;
2. else the ``SEMMIM_BACKEND`` environment variable, when the op has a backend of that name;
3. else the highest-priority backend whose reasons list is empty.

An explicitly requested backend (1 or 2) that cannot run raises :class:`NotImplementedError` with a
description of the inputs and the reasons, never a silent fallback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

BACKENDS = ("reference", "triton", "cuda", "cpu", "sdpa", "chunked")
ENV_VAR = "SEMMIM_BACKEND"


def describe(*args: Any, **kwargs: Any) -> str:
    """One-line description of call arguments: tensors as dtype[shape] device, others by repr."""

    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)} {v.device}"
        if isinstance(v, (tuple, list)) and len(v) > 8:
            return f"{type(v).__name__}(len={len(v)})"
        return repr(v)

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


@dataclass(frozen=True)
class Backend:
    """One implementation of an op. ``fn`` has the public op's signature without ``backend``."""

    name: str
    fn: Callable[..., Any]
    supports: Callable[..., list[str]]
    priority: int


@dataclass
class Op:
    """A public op and its registered backends."""

    name: str
    backends: dict[str, Backend] = field(default_factory=dict)
    # device -> (args, kwargs): small valid inputs, used by `python -m semmim.kernels.info`
    example: Callable[[torch.device], tuple[tuple, dict]] | None = None
    # input validation raising ValueError; run before reporting that no backend can run, so bad
    # inputs get a ValueError naming the argument rather than a list of backend reasons
    check: Callable[..., None] | None = None

    def register(
        self, name: str, fn: Callable[..., Any], supports: Callable[..., list[str]], priority: int
    ) -> None:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
        self.backends[name] = Backend(name, fn, supports, priority)

    def ordered(self) -> list[Backend]:
        return sorted(self.backends.values(), key=lambda b: -b.priority)

    def reasons(self, *args: Any, **kwargs: Any) -> dict[str, list[str]]:
        """Backend name -> reasons it cannot run on these inputs (empty list = can run)."""
        return {b.name: list(b.supports(*args, **kwargs)) for b in self.ordered()}

    def select(self, backend: str | None, *args: Any, **kwargs: Any) -> Backend:
        requested = backend
        if requested is None:
            env = os.environ.get(ENV_VAR, "").strip()
            if env and env in self.backends:
                requested = env
        if requested is not None:
            if requested not in self.backends:
                raise ValueError(
                    f"{self.name}: backend must be one of {sorted(self.backends)}, got {requested!r}"
                )
            chosen = self.backends[requested]
            why = chosen.supports(*args, **kwargs)
            if why:
                if self.check is not None:
                    self.check(*args, **kwargs)
                raise NotImplementedError(
                    f"{self.name}: backend {requested!r} cannot run on ({describe(*args, **kwargs)}): "
                    + "; ".join(why)
                )
            return chosen
        tried = []
        for b in self.ordered():
            why = b.supports(*args, **kwargs)
            if not why:
                return b
            tried.append(f"{b.name}: {'; '.join(why)}")
        if self.check is not None:
            self.check(*args, **kwargs)
        raise NotImplementedError(
            f"{self.name}: no backend can run on ({describe(*args, **kwargs)}): "
            + " | ".join(tried)
        )

    def __call__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
        return self.select(backend, *args, **kwargs).fn(*args, **kwargs)


OPS: dict[str, Op] = {}


def get_op(name: str) -> Op:
    """The op named ``name``, created on first use."""
    if name not in OPS:
        OPS[name] = Op(name)
    return OPS[name]


def register(
    op: str, backend: str, fn: Callable[..., Any], supports: Callable[..., list[str]], priority: int
) -> None:
    """Register ``fn`` as ``backend`` of ``op``; higher priority is tried first by auto-dispatch."""
    get_op(op).register(backend, fn, supports, priority)


def set_example(op: str, fn: Callable[[torch.device], tuple[tuple, dict]]) -> None:
    """Register ``fn(device) -> (args, kwargs)``, small valid inputs of ``op`` for the info table."""
    get_op(op).example = fn


def set_check(op: str, fn: Callable[..., None]) -> None:
    """Register ``fn(*args, **kwargs)``, raising ValueError on invalid inputs of ``op``."""
    get_op(op).check = fn
