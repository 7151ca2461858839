"""Atomic, checksummed checkpoints that hold data only, and RNG state capture.

Layout of a run directory::

    RUN/checkpoints/step_00000100.pt        one file per saved step (the newest ``keep`` are kept)
    RUN/checkpoints/step_00000100.pt.json   its sidecar: {"file", "bytes", "sha256", "format"}
    RUN/checkpoints/step_00000100/          or a sharded step (``--fsdp``): a directory whose
                                            manifest.json holds each file's size and sha256
    RUN/checkpoints/latest                  text file naming the newest complete checkpoint

Sharded steps (:mod:`semmim.checkpoint_dcp`: ``torch.distributed.checkpoint`` shards written by
every rank, renamed into place complete) go through the same functions here: found, verified,
named by ``latest``, rotated and opened like the single files, with the same rules below.

Writing: every file goes through :func:`semmim.rundir.atomic_write` (the one writer of run files): a
temporary file in the same directory, flushed, fsync'ed and renamed over the destination with
``os.replace`` (atomic on POSIX), then the directory is fsync'ed. The order
is checkpoint, then its sidecar, then ``latest``, so a crash (even SIGKILL) at any moment leaves
``latest`` naming a checkpoint whose sidecar is complete.

Reading: a checkpoint is data, never code. It is loaded with ``torch.load(weights_only=True)``, which
only rebuilds tensors and plain containers (dict, list, tuple, str, int, float, bool, None) and
refuses any other pickled object, so a crafted file cannot run anything; :func:`save_checkpoint`
checks that what it writes stays within those types. Before loading, the file's size and SHA-256 are
compared with the sidecar, so truncation and flipped bits are caught. Every problem raises
:class:`CheckpointError` naming the file and what is wrong.

One rule for every command that opens a checkpoint (``eval``, ``finetune --ckpt``, ``train
--resume``), all through :func:`open_checkpoint`: the ``latest`` pointer must be a plain file (a
symlink is refused without being read) holding a bare ``step_<N>.pt`` name of a file inside the
directory (no ``..``, no absolute path); a ``step_*.pt`` file that is a symlink resolving outside
its checkpoints directory is refused, whether it is found through the run directory or named
directly; a pointer or sidecar that is a FIFO or device is refused without being opened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from semmim.paths import NotRegularFile, inside, open_regular
from semmim.rundir import atomic_write, file_sha256

log = logging.getLogger("semmim.checkpoint")

LATEST = "latest"
FORMAT = 2  # 2 = weights_only payload + sha256 sidecar
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
_STEP_DIR = re.compile(r"^step_(\d+)$")  # a sharded step (semmim.checkpoint_dcp)
_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.Size)

# What a training checkpoint must hold (``semmim train --resume``), and what evaluation needs.
TRAIN_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "step",
    "epoch",
    "batch_in_epoch",
    "rng",
    "config",
    "train_config",
    "total_steps",
    "world_size",
)
EVAL_KEYS = ("model", "config", "train_config", "step")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` that never leaves a partial file at ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def sidecar_path(path: str) -> str:
    """The checksum sidecar of checkpoint ``path``: ``path + ".json"``."""
    return path + ".json"


def check_plain(obj: Any, where: str = "state") -> None:
    """Raise TypeError naming the first value ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}, not str/int")
            check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(
            f"{where}: a {type(obj).__name__} cannot go into a checkpoint (only tensors, dict, "
            "list, tuple, str, int, float, bool and None load with weights_only=True)"
        )


def save_checkpoint(
    state: dict[str, Any],
    ckpt_dir: str,
    step: int,
    keep: int = 2,
    shards: dict[str, torch.Tensor] | None = None,
    is_main: bool = True,
) -> str | None:
    """Write ``state`` as ``step_<step>.pt`` + sidecar, point ``latest`` at it, keep the newest ``keep``.

    ``state`` may hold only tensors and plain containers (checked first: TypeError otherwise).
    Returns the checkpoint path.

    With ``shards`` (``--fsdp``: :func:`semmim.checkpoint_dcp.flat_tensors` of this rank) the step
    is a sharded directory ``step_<step>/`` instead: every rank calls this with its shards, rank 0
    (``is_main``) with ``state`` too; the path is returned on rank 0 only.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if is_main:
        check_plain(state)
        _remove_stale_temp_files(ckpt_dir)
    if shards is not None:
        from semmim import checkpoint_dcp

        path = checkpoint_dcp.write_sharded(state, shards, ckpt_dir, step, is_main)
        if path is None:
            return None
        name = os.path.basename(path)
    else:
        name = f"step_{step:08d}.pt"
        path = os.path.join(ckpt_dir, name)
        atomic_torch_save(state, path)
        meta = {
            "file": name,
            "bytes": os.path.getsize(path),
            "sha256": file_sha256(path),
            "format": FORMAT,
        }
        atomic_write(sidecar_path(path), lambda f: f.write(json.dumps(meta).encode() + b"\n"))
    atomic_write(os.path.join(ckpt_dir, LATEST), lambda f: f.write(name.encode() + b"\n"))
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        if os.path.basename(old) != name:
            _remove_step(old)
    return path


def _remove_step(path: str) -> None:
    """Delete an old step: a file and its sidecar, or a sharded step directory."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    for p in (path, sidecar_path(path)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def _remove_stale_temp_files(ckpt_dir: str) -> None:
    """Delete temp files (and sharded steps' temp directories) an interrupted writer left
    behind (one writer per directory: rank 0)."""
    if not os.path.isdir(ckpt_dir):
        return
    for name in os.listdir(ckpt_dir):
        if name.startswith(".") and name.endswith(".tmp"):
            path = os.path.join(ckpt_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _step_of(name: str) -> int | None:
    """The step of a checkpoint name (``step_<N>.pt`` or a sharded ``step_<N>``), else None."""
    m = _STEP_FILE.match(name) or _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def is_sharded_step(path: str) -> bool:
    """Whether ``path`` is a sharded step directory (``step_<N>/``, :mod:`semmim.checkpoint_dcp`)."""
    return bool(_STEP_DIR.match(os.path.basename(os.path.normpath(path)))) and os.path.isdir(path)


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """Checkpoints in ``ckpt_dir`` (files ``step_*.pt`` and sharded ``step_*/`` directories),
    oldest step first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [(n_step, n) for n in os.listdir(ckpt_dir) if (n_step := _step_of(n)) is not None]
    return [os.path.join(ckpt_dir, n) for _, n in sorted(found)]


def _read_latest(directory: str) -> str | None:
    """The file ``directory/latest`` names (validated), or None when there is no pointer."""
    pointer = os.path.join(directory, LATEST)
    if os.path.islink(pointer):
        # Not followed, not read: its target's content must not reach an error message.
        raise CheckpointError(
            f"{pointer}: a symlink; refusing to follow it (semmim writes 'latest' as a plain "
            "file naming a step_<N>.pt file; delete it to load the newest step file)"
        )
    if not os.path.lexists(pointer):
        return None
    try:
        with open_regular(pointer, "checkpoint pointer") as f:
            raw = f.read(4096)
    except OSError as err:
        raise CheckpointError(f"{pointer}: cannot read the pointer ({err})") from None
    name = raw.decode("utf-8", errors="replace").strip()
    target = os.path.join(directory, name)
    if _step_of(name) is None or not inside(target, directory):
        shown = repr(name) if len(name) <= 120 and name.isprintable() else f"{len(raw)} bytes"
        raise CheckpointError(
            f"{pointer}: names {shown}, which is not a step_<N>.pt file (or step_<N> directory) inside "
            f"{directory}; refusing to follow it (the pointer may have been tampered with)"
        )
    return target


def _run_dir_candidates(path: str) -> tuple[str, list[str]] | None:
    """(checkpoint dir, files newest first: ``latest``'s target, then the other step files)."""
    for directory in (os.path.join(path, "checkpoints"), path):
        if not os.path.isdir(directory):
            continue
        latest = _read_latest(directory)
        files = list(reversed(list_checkpoints(directory)))
        if latest is not None and os.path.exists(latest):
            files = [latest] + [f for f in files if f != latest]
        if files:
            return directory, files
    return None


def _candidates(path: str) -> tuple[str | None, list[str]]:
    """(the directory the files must lie in, or None; files to try, newest first).

    A file named directly is the only candidate; when it is a ``step_*.pt`` file its own folder
    is its checkpoints directory (so a link out of it is refused as through the run directory).
    """
    if is_sharded_step(path):
        return os.path.dirname(os.path.abspath(os.path.normpath(path))), [path]
    if os.path.isdir(path):
        found = _run_dir_candidates(path)
        if found:
            return found
    elif os.path.lexists(path):
        own = os.path.dirname(os.path.abspath(path))
        return (own if _STEP_FILE.match(os.path.basename(path)) else None), [path]
    raise FileNotFoundError(
        f"no checkpoint found at {path!r} (expected a .pt file, or a directory with "
        f"'latest' or step_*.pt, or RUN/checkpoints/)"
    )


def _check_own(file: str, directory: str | None) -> None:
    """CheckpointError when ``file`` resolves outside its checkpoints ``directory``."""
    if directory is not None and not inside(file, directory):
        raise CheckpointError(
            f"{file}: a link to a file outside {directory}; refused (a run's checkpoints are its "
            "own files: copy a checkpoint in rather than linking to it)"
        )


def resolve_checkpoint(path: str) -> str:
    """Map a run dir, a checkpoints dir or a file to the checkpoint file to load.

    A directory resolves through its ``latest`` pointer (``RUN/checkpoints/latest`` or ``DIR/latest``),
    falling back to the newest ``step_*.pt`` when there is no pointer (or it names a missing file).
    Raises FileNotFoundError when there is none, CheckpointError for an unsafe pointer or a step
    file linked from outside its directory (the rule of :func:`open_checkpoint`).
    """
    directory, files = _candidates(path)
    _check_own(files[0], directory)
    return files[0]


def _verify(path: str) -> None:
    """Compare ``path`` with its sidecar: present, same size, same SHA-256."""
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path}: zero-length file (nothing was written)")
    side = sidecar_path(path)
    try:
        with open_regular(side, "checksum sidecar") as f:
            meta = json.loads(f.read(1 << 16).decode("utf-8"))
        want_bytes, want_sha = int(meta["bytes"]), str(meta["sha256"])
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: no checksum sidecar {os.path.basename(side)} (semmim writes it right after "
            "the checkpoint: the write was interrupted, or the file was not written by semmim)"
        ) from None
    except NotRegularFile as err:
        raise CheckpointError(str(err)) from None
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise CheckpointError(f"{side}: unreadable checksum sidecar ({err})") from None
    if size != want_bytes:
        raise CheckpointError(
            f"{path}: {size} bytes, but {want_bytes} were written ("
            f"{'truncated' if size < want_bytes else 'bytes appended'})"
        )
    sha = file_sha256(path)
    if sha != want_sha:
        raise CheckpointError(
            f"{path}: checksum mismatch (sha256 {sha[:16]}..., recorded {want_sha[:16]}...): "
            "the file changed after it was written (corrupt disk or copy, flipped bits)"
        )


def read_checkpoint(
    path: str,
    map_location: str | torch.device = "cpu",
    required: Iterable[str] = (),
    verify: bool = True,
) -> dict[str, Any]:
    """Load one checkpoint file: checksum, then ``weights_only`` unpickling, then required keys.

    Raises :class:`CheckpointError` (a ValueError) naming the file and the problem.
    """
    if is_sharded_step(path):
        from semmim import checkpoint_dcp

        try:
            state = checkpoint_dcp.read_sharded(path, verify)
        except checkpoint_dcp.ShardedCheckpointError as err:
            raise CheckpointError(str(err)) from None
        missing = [k for k in required if k not in state]
        if missing:
            raise CheckpointError(f"{path}: missing key(s) {missing} (have {sorted(state)})")
        return state
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a file")
    if verify:
        _verify(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        code = [ln for ln in lines if "GLOBAL" in ln or "Unsupported global" in ln]
        if code:
            raise CheckpointError(
                f"{path}: refused: it pickles a reference to code ({code[0]}), which could run "
                "when loaded; a checkpoint holds only tensors and plain data"
            ) from None
        detail = next((ln for ln in lines if "Unsupported" in ln), lines[-1] if lines else "")
        raise CheckpointError(
            f"{path}: not a torch checkpoint (the safe loader stopped at: {detail[:200]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(
            f"{path}: unreadable, truncated or not a torch checkpoint "
            f"({type(err).__name__}: {str(err)[:300]})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a checkpoint dict")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {missing} (have {sorted(state)})")
    return state


def open_checkpoint(
    path: str,
    map_location: str | torch.device = "cpu",
    required: Iterable[str] = (),
    fallback: bool = False,
    accept: Callable[[dict[str, Any]], str | None] | None = None,
) -> tuple[dict[str, Any], str]:
    """Open the checkpoint at ``path`` (run dir, checkpoints dir or file): ``(state, file)``.

    The one way every command opens a checkpoint (``eval``, ``finetune --ckpt``, ``train
    --resume``), so the rules of the module docstring hold for all of them. A directory
    resolves through its ``latest`` pointer, else its newest ``step_*.pt``. With ``fallback``
    (resume), a damaged file is reported with a warning and the next older one is tried;
    without it the first problem is the error. ``accept(state)`` returns None for a checkpoint
    of this run, else why not (e.g. a file copied from another run: refused like a damaged one,
    by name, never resumed).

    Raises FileNotFoundError when there is no checkpoint, CheckpointError (a ValueError) naming
    the file and the problem otherwise (with ``fallback``: when none is intact, listing each).
    """
    required = tuple(required)
    directory, files = _candidates(path)
    problems = []
    for file in files:
        try:
            _check_own(file, directory)
            state = read_checkpoint(file, map_location, required)
            reason = accept(state) if accept is not None else None
            if reason:
                raise CheckpointError(f"{file}: {reason}; refused")
        except CheckpointError as err:
            if not fallback:
                raise
            log.warning("checkpoint unusable: %s", err)
            problems.append(str(err))
            continue
        if problems:
            log.warning(
                "falling back to %s, the newest intact checkpoint (%d newer one%s damaged)",
                file,
                len(problems),
                "" if len(problems) == 1 else "s",
            )
        return state, file
    where = directory or os.path.dirname(os.path.abspath(path))
    raise CheckpointError(f"no intact checkpoint in {where}:\n  " + "\n  ".join(problems))


def load_checkpoint(
    path: str, map_location: str | torch.device = "cpu", required: Iterable[str] = ()
) -> dict[str, Any]:
    """The state of :func:`open_checkpoint` at ``path`` (no fallback)."""
    return open_checkpoint(path, map_location, required)[0]


def load_latest_intact(
    path: str,
    map_location: str | torch.device = "cpu",
    required: Iterable[str] = TRAIN_KEYS,
    accept: Callable[[dict[str, Any]], str | None] | None = None,
) -> tuple[dict[str, Any], str]:
    """The newest checkpoint of a run that loads and verifies (and that ``accept`` takes):
    :func:`open_checkpoint` with ``fallback=True`` (what ``--resume`` uses)."""
    return open_checkpoint(path, map_location, required, fallback=True, accept=accept)


# ------------------------------------------------------------------------------------ RNG states
def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA, when present) RNG states, plus named generators.

    Only tensors and plain types (NumPy's key array becomes an int64 tensor), so the state loads
    with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
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
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (generators or {}).items():
        if name in state.get("generators", {}):
            gen.set_state(state["generators"][name])
