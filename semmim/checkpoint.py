"""Atomic checkpoints and RNG state capture.

Layout of a run directory::

    RUN/checkpoints/step_00000100.pt   one file per saved step (the newest ``keep`` are kept)
    RUN/checkpoints/latest             text file naming the newest complete checkpoint

Every file is written to a temporary file in the same directory, flushed, fsync'ed and renamed over
the destination with ``os.replace`` (atomic on POSIX), then the directory is fsync'ed. The ``latest``
pointer is replaced the same way *after* the checkpoint it names is complete, so a crash (even
SIGKILL) at any moment leaves ``latest`` naming a loadable checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

LATEST = "latest"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform / filesystem
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync it, then rename it to ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` that never leaves a partial file at ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(state: dict[str, Any], ckpt_dir: str, step: int, keep: int = 2) -> str:
    """Write ``state`` as ``step_<step>.pt``, point ``latest`` at it, prune to the newest ``keep``.

    Returns the checkpoint path.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    _remove_stale_temp_files(ckpt_dir)
    name = f"step_{step:08d}.pt"
    path = os.path.join(ckpt_dir, name)
    atomic_torch_save(state, path)
    atomic_write(os.path.join(ckpt_dir, LATEST), lambda f: f.write(name.encode() + b"\n"))
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        if os.path.basename(old) != name:
            os.unlink(old)
    return path


def _remove_stale_temp_files(ckpt_dir: str) -> None:
    """Delete temp files an interrupted writer left behind (one writer per directory: rank 0)."""
    if not os.path.isdir(ckpt_dir):
        return
    for name in os.listdir(ckpt_dir):
        if name.startswith(".") and name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(ckpt_dir, name))


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """Complete checkpoint files in ``ckpt_dir``, oldest step first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(ckpt_dir) if (m := _STEP_FILE.match(n))]
    return [os.path.join(ckpt_dir, n) for _, n in sorted(found)]


def resolve_checkpoint(path: str) -> str:
    """Map a run dir, a checkpoints dir or a file to the checkpoint file to load.

    A directory resolves through its ``latest`` pointer (``RUN/checkpoints/latest`` or ``DIR/latest``),
    falling back to the newest ``step_*.pt`` when there is no pointer.
    """
    if os.path.isfile(path):
        return path
    for directory in (os.path.join(path, "checkpoints"), path):
        pointer = os.path.join(directory, LATEST)
        if os.path.isfile(pointer):
            with open(pointer, encoding="utf-8") as f:
                name = f.read().strip()
            target = os.path.join(directory, name)
            if os.path.isfile(target):
                return target
        found = list_checkpoints(directory)
        if found:
            return found[-1]
    raise FileNotFoundError(
        f"no checkpoint found at {path!r} (expected a .pt file, or a directory with "
        f"'latest' or step_*.pt, or RUN/checkpoints/)"
    )


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load the checkpoint that :func:`resolve_checkpoint` finds at ``path``."""
    return torch.load(resolve_checkpoint(path), map_location=map_location, weights_only=False)


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA, when present) RNG states, plus named generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(
    state: dict[str, Any], generators: dict[str, torch.Generator] | None = None
) -> None:
    """Restore what :func:`rng_state` captured (CUDA only when present on both sides)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (generators or {}).items():
        if name in state.get("generators", {}):
            gen.set_state(state["generators"][name])
