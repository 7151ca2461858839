"""The op contract shared by every op in :mod:`semmim.kernels` (see ``kernels/README.md``).

An :class:`Op` is one public op. A call ``op(*args, backend=None, validate=True, **kwargs)``:

1. ``prepare(*args, validate=..., **kwargs) -> (args, kwargs)`` — the op's ONE validator. Shape,
   dtype and device checks always run (they cost nothing); checks that read tensor VALUES on the
   host (index range, uniqueness, ...: a device->host sync each) run only when ``validate``. It
   also normalises the call: the autocast rule (``cast_to_input``), dense small operands, the
   default scale, ... The backends receive exactly what ``prepare`` returns and never validate.
2. Backend selection (:meth:`Op.select`): an explicit ``backend=`` argument; else the
   ``SEMMIM_BACKEND`` environment variable when the op has a backend of that name (a name that
   is no backend of any op is a ValueError listing the valid names); else the highest-priority
   backend whose ``supports(*args, **kwargs)`` returns no reasons. ``supports`` gets only the
   prepared arguments, i.e. what decides capability (no per-call options such as ``validate``).
   An explicitly requested backend that cannot run raises NotImplementedError with the inputs
   and the reasons, never a silent fallback.
3. ``backend.fn(*args, **kwargs)``, then optionally ``finish(out, args, kwargs, validate)``
   (e.g. topk_mask's finiteness check, which reads a per-row count the kernel computed).

Every call is reported to the active :func:`record_dispatch` contexts. The fast backends run as
``torch.library`` custom ops made by :func:`custom_op` (fake impl for torch.compile, optional
autograd), and allocate their outputs with :func:`semmim.kernels._common.new_output` (the one
allocator, which tests poison through :func:`semmim.kernels._common.poisoned_outputs`).

The op list itself is :data:`OP_SPECS`: each op's name, the module that defines it and its
backends by name, highest priority first. It is the one list: ``semmim.config.KernelsConfig``
has a backend field per op and ``semmim.layers.OpCalls`` a method per op from it, config
validation checks backend names against it, and :meth:`Op.register` refuses a backend it does not
declare. This module imports neither torch, Triton nor ``semmim._C`` (only the functions that
work on tensors import torch), so reading the list and building a config stay light; an op's
module is imported the first time :data:`OPS` (or ``semmim.kernels.<op>``) is asked for it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class OpSpec:
    """One op as the rest of the package sees it before its module is imported."""

    module: str  # the module of semmim.kernels that defines the op (kernels/<module>.py)
    backends: tuple[str, ...]  # every backend it registers, highest priority first


# THE op list (see the module docstring). Adding an op: kernels/README.md, "Module layout".
# "chunked" is prototype_cross_entropy's blockwise PyTorch backend.
OP_SPECS: dict[str, OpSpec] = {
    "masked_gather": OpSpec("masked_gather", ("cuda", "triton", "cpu", "reference")),
    "masked_scatter_fill": OpSpec("masked_gather", ("cuda", "triton", "cpu", "reference")),
    "topk_mask": OpSpec("topk_mask", ("cuda", "triton", "cpu", "reference")),
    "cross_attention": OpSpec("cross_attention", ("triton", "sdpa", "reference")),
    "prototype_cross_entropy": OpSpec(
        "prototype_cross_entropy", ("triton", "chunked", "reference")
    ),
}
OP_NAMES: tuple[str, ...] = tuple(OP_SPECS)
# every backend name of any op (SEMMIM_BACKEND must be one of them)
BACKENDS: tuple[str, ...] = tuple(dict.fromkeys(b for s in OP_SPECS.values() for b in s.backends))
ENV_VAR = "SEMMIM_BACKEND"

Prepared = tuple[tuple, dict]


def describe(*args: Any, **kwargs: Any) -> str:
    """One-line description of call arguments: tensors as dtype[shape] device, others by repr."""

    import torch

    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)} {v.device}"
        if isinstance(v, (tuple, list)) and len(v) > 8:
            return f"{type(v).__name__}(len={len(v)})"
        return repr(v)

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# record_dispatch
# --------------------------------------------------------------------------------------------
_RECORDERS: list[dict[str, set[str]]] = []


@contextlib.contextmanager
def record_dispatch() -> Iterator[dict[str, set[str]]]:
    """Record which backend each op ran: ``with record_dispatch() as ran: ...`` and afterwards
    ``ran == {"masked_gather": {"cpu"}, "cross_attention": {"sdpa"}, ...}``.

    Nested contexts each see every call. Dispatch happens in Python, so under ``torch.compile``
    calls are recorded while the graph is traced, not on each replay of a compiled graph.
    """
    ran: dict[str, set[str]] = {}
    _RECORDERS.append(ran)
    try:
        yield ran
    finally:
        _RECORDERS.remove(ran)


def _record(op: str, backend: str) -> None:
    for ran in _RECORDERS:
        ran.setdefault(op, set()).add(backend)


def env_backend() -> str | None:
    """The ``SEMMIM_BACKEND`` value, or None when unset/empty; ValueError for an unknown name."""
    env = os.environ.get(ENV_VAR, "").strip()
    if not env:
        return None
    if env not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {list(BACKENDS)} (or unset), got {env!r}")
    return env


# --------------------------------------------------------------------------------------------
# ops and backends
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """One implementation of an op: ``fn(*args, **kwargs)`` and ``supports(*args, **kwargs)``
    both take the prepared arguments (see :class:`Op`)."""

    name: str
    fn: Callable[..., Any]
    supports: Callable[..., list[str]]


def _no_prepare(*args: Any, validate: bool = True, **kwargs: Any) -> Prepared:
    return args, kwargs


@dataclass
class Op:
    """A public op: its validator, its backends, optional post-processing and example inputs."""

    name: str
    prepare: Callable[..., Prepared] = _no_prepare
    finish: Callable[[Any, tuple, dict, bool], Any] | None = None
    # device -> (args, kwargs): small valid inputs, used by `python -m semmim.kernels.info`
    example: Callable[[torch.device], Prepared] | None = None
    backends: dict[str, Backend] = field(default_factory=dict)

    def register(
        self, name: str, fn: Callable[..., Any], supports: Callable[..., list[str]]
    ) -> None:
        """Add backend ``name``, one of the op's declared backends (:data:`OP_SPECS`, whose order
        is the priority order of auto-dispatch)."""
        declared = OP_SPECS[self.name].backends
        if name not in declared:
            raise ValueError(
                f"{self.name}: backend {name!r} is not declared in semmim.kernels.registry."
                f"OP_SPECS (declared: {list(declared)}): add it there"
            )
        self.backends[name] = Backend(name, fn, supports)

    def ordered(self) -> list[Backend]:
        """The registered backends, highest priority (first declared) first."""
        return [self.backends[b] for b in OP_SPECS[self.name].backends if b in self.backends]

    def reasons(self, *args: Any, **kwargs: Any) -> dict[str, list[str]]:
        """Backend name -> reasons it cannot run on these (raw) inputs (empty list = can run).

        The inputs are prepared first (without value checks), as a call would prepare them."""
        args, kwargs = self.prepare(*args, validate=False, **kwargs)
        return {b.name: list(b.supports(*args, **kwargs)) for b in self.ordered()}

    def explain(self, *args: Any, **kwargs: Any) -> tuple[str | None, list[str]]:
        """(backend auto-dispatch would pick now or None, ["higher: reason; reason", ...]).

        Honours ``SEMMIM_BACKEND`` like a call does."""
        args, kwargs = self.prepare(*args, validate=False, **kwargs)
        env = env_backend()
        if env is not None and env in self.backends:
            why = self.backends[env].supports(*args, **kwargs)
            return (None, [f"{ENV_VAR}={env}: {'; '.join(why)}"]) if why else (env, [])
        skipped = []
        for b in self.ordered():
            why = b.supports(*args, **kwargs)
            if not why:
                return b.name, skipped
            skipped.append(f"{b.name}: {'; '.join(why)}")
        return None, skipped

    def select(self, backend: str | None, *args: Any, **kwargs: Any) -> Backend:
        """The backend that runs on these PREPARED arguments (see the module docstring)."""
        requested = backend
        if requested is None:
            env = env_backend()
            if env is not None and env in self.backends:
                requested = env
        if requested is not None:
            if requested not in self.backends:
                raise ValueError(
                    f"{self.name}: backend must be one of {sorted(self.backends)}, got {requested!r}"
                )
            chosen = self.backends[requested]
            why = chosen.supports(*args, **kwargs)
            if why:
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
        raise NotImplementedError(
            f"{self.name}: no backend can run on ({describe(*args, **kwargs)}): "
            + " | ".join(tried)
        )

    def __call__(
        self, *args: Any, backend: str | None = None, validate: bool = True, **kwargs: Any
    ) -> Any:
        if backend is not None and not isinstance(backend, str):
            raise ValueError(f"backend must be a str or None, got {type(backend).__name__}")
        if not isinstance(validate, bool):
            raise ValueError(f"validate must be a bool, got {type(validate).__name__}")
        args, kwargs = self.prepare(*args, validate=validate, **kwargs)
        chosen = self.select(backend, *args, **kwargs)
        _record(self.name, chosen.name)
        out = chosen.fn(*args, **kwargs)
        if self.finish is not None:
            out = self.finish(out, args, kwargs, validate)
        return out


_DEFINED: dict[str, Op] = {}  # the ops whose module has been imported


def define_op(
    name: str,
    *,
    prepare: Callable[..., Prepared],
    finish: Callable[[Any, tuple, dict, bool], Any] | None = None,
    example: Callable[[torch.device], Prepared] | None = None,
) -> Op:
    """Create and register the public op ``name`` (once per process, from its module); ``name``
    must be declared in :data:`OP_SPECS`."""
    if name not in OP_SPECS:
        raise ValueError(
            f"op {name!r} is not declared in semmim.kernels.registry.OP_SPECS "
            f"{list(OP_SPECS)}: add it there"
        )
    if name in _DEFINED:
        raise ValueError(f"op {name!r} is already defined")
    _DEFINED[name] = Op(name, prepare=prepare, finish=finish, example=example)
    return _DEFINED[name]


def _load(name: str) -> Op:
    """The op ``name``, importing its module the first time (Triton, ``semmim._C``)."""
    if name not in _DEFINED:
        spec = OP_SPECS[name]
        importlib.import_module(f"{__package__}.{spec.module}")
        op = _DEFINED.get(name)
        if op is None:
            raise RuntimeError(f"semmim.kernels.{spec.module} defines no op {name!r} (OP_SPECS)")
        missing = [b for b in spec.backends if b not in op.backends]
        if missing:
            raise RuntimeError(
                f"semmim.kernels.{spec.module}: op {name!r} registers no backend {missing} "
                "although OP_SPECS declares it"
            )
    return _DEFINED[name]


class _Ops(Mapping):
    """Op name -> :class:`Op` for every op of :data:`OP_SPECS`; reading an op imports its module
    (iterating over the names does not)."""

    def __getitem__(self, name: str) -> Op:
        if name not in OP_SPECS:
            raise KeyError(f"no op named {name!r}; ops: {sorted(OP_SPECS)}")
        return _load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(OP_SPECS)

    def __len__(self) -> int:
        return len(OP_SPECS)

    def __repr__(self) -> str:
        return f"OPS({list(OP_SPECS)})"


OPS: Mapping[str, Op] = _Ops()


def get_op(name: str) -> Op:
    """The op named ``name``; KeyError listing the ops when there is none."""
    return OPS[name]


# --------------------------------------------------------------------------------------------
# the custom-op factory
# --------------------------------------------------------------------------------------------
def custom_op(
    name: str,
    impl: Callable[..., Any],
    *,
    fake: Callable[..., Any],
    backward: Callable[..., Any] | None = None,
    setup_context: Callable[..., None] | None = None,
) -> Any:
    """Register ``impl`` as the torch.library custom op ``semmim::<name>`` and return it.

    ``impl`` carries type annotations (torch infers the schema from them) and must not mutate
    its inputs. ``fake(*same args)`` returns empty outputs of the right shapes/dtypes (what
    torch.compile and meta tensors see). ``backward(ctx, *grads)`` with
    ``setup_context(ctx, inputs, output)`` make the op differentiable; without them it has no
    autograd formula (fine for integer outputs or ops that are called on detached inputs).
    Custom ops cannot return None: return ``no_grad_placeholder(ref)`` instead.
    """
    import torch

    op = torch.library.custom_op(f"semmim::{name}", impl, mutates_args=())
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    elif setup_context is not None:
        raise ValueError("setup_context without backward")
    return op


def no_grad_placeholder(ref: torch.Tensor) -> torch.Tensor:
    """The 0-element tensor a custom op returns where its result is "none" (it cannot return
    None)."""
    return ref.new_empty((0,))
