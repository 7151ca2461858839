"""Run directories: one owner each, atomic files, and clear errors about them.

A run directory (``semmim train --out DIR``, each ``semmim ablate`` run and the grid directory
itself) is the user's data. This module holds the rules every command follows for it:

- **One owner.** :class:`RunLock` takes an advisory ``fcntl.flock`` on ``DIR/.semmim.lock`` and
  writes the owner (pid, host, command, start time) into it. A second process that tries to take
  it gets :class:`RunDirError` naming that owner. The kernel releases a ``flock`` when the last
  descriptor of the file closes, so every exit path releases it — a normal return, an exception,
  and SIGKILL alike; the lock file itself is never deleted (deleting it would let two processes
  lock two different files of one name).
- **Atomic files.** :func:`atomic_write` (temp file in the same directory, fsync, ``os.replace``,
  fsync of the directory) is the one writer of every run file: checkpoints, ``config.json``,
  ``summary.json``, ``eval.json`` / ``eval.txt``, ``log.csv`` rewrites. :func:`read_json` reads one
  back and names a truncated or unparsable file.
- **What ``--out`` may be.** :func:`prepare_out` refuses a path that is a file, an unwritable
  directory, a directory in use, or one that already holds a run when the command starts a new
  one (``--resume`` continues it; ``--overwrite`` moves it aside to ``DIR.old-<time>``, never
  deletes it).
- **Children die with their parent.** :func:`die_with_parent` (Linux ``PR_SET_PDEATHSIG``) makes
  a child run of a parallel grid receive SIGTERM — checkpoint and stop — when the grid dies, even
  by SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "LOCK_FILE",
    "RunDirError",
    "RunLock",
    "lock_owner",
    "atomic_write",
    "fsync_dir",
    "file_sha256",
    "write_text",
    "write_json",
    "read_json",
    "holds_run",
    "prepare_out",
    "check_output_file",
    "is_no_space",
    "no_space_message",
    "no_space_error",
    "die_with_parent",
]

LOCK_FILE = ".semmim.lock"
# What makes a directory "hold a run": any of these written by a training run.
RUN_FILES = ("config.json", "log.csv", "summary.json", "checkpoints")


_NO_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class RunDirError(ValueError):
    """A run directory (or a file in it) that cannot be used; the message names it and why."""


# ----------------------------------------------------------------------------- atomic writes
def fsync_dir(path: str) -> None:
    """fsync a directory (its entries: a rename into it is durable); a no-op where unsupported."""
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
    """Call ``write(fileobj)`` (binary) on a temp file beside ``path``, fsync it, then rename it
    to ``path``: a reader sees the old file or the new one, never a part of one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in _NO_SPACE_ERRNOS and not err.filename:
            raise OSError(err.errno, err.strerror, path) from err  # name the file
        raise
    fsync_dir(directory)


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: str, missing_ok: bool = False) -> Any:
    """The JSON value in ``path``; None when it is absent and ``missing_ok``.

    Raises :class:`RunDirError` naming the file: ``"runs/x/seed_0/summary.json: truncated JSON
    (...)"``, not UTF-8, not JSON, unreadable.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise RunDirError(f"{path}: missing") from None
    except OSError as err:
        raise RunDirError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RunDirError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if not text.strip():
            what = "empty file (nothing was written)"
        elif err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated"):
            what = "truncated JSON"
        else:
            what = "not valid JSON"
        raise RunDirError(
            f"{path}: {what} ({err.msg} at line {err.lineno} column {err.colno}); it was not "
            "written by this version of semmim, or was cut short: restore it or rerun that run"
        ) from None


# ------------------------------------------------------------------------------------ owners
def _describe_owner(info: dict[str, Any]) -> str:
    since = info.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    return (
        f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {when}: "
        f"{info.get('command', '?')}"
    )


def _read_owner(lock_path: str) -> dict[str, Any]:
    try:
        with open(lock_path, encoding="utf-8", errors="replace") as f:
            return json.loads(f.read(4096) or "{}")
    except (OSError, ValueError):
        return {}


def lock_owner(directory: str) -> str | None:
    """Who holds the lock of ``directory`` now (``"pid 123 on host, since ...: command"``), or
    None when nobody does (no lock file, or its owner has exited)."""
    import fcntl

    path = os.path.join(directory, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            # A shared lock succeeds unless someone holds the exclusive one.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe_owner(_read_owner(path))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """Exclusive ownership of a run (or grid) directory while a command writes into it.

    ``with RunLock(dir, what="run"):`` creates ``dir`` if needed, takes the lock or raises
    :class:`RunDirError` naming the process that holds it. Released on exit from the block, on
    :meth:`release`, and by the OS when the process dies (SIGKILL included). The descriptor is
    not inherited across ``exec`` (Python opens it non-inheritable); forked DataLoader workers
    share it, so the directory stays owned while an orphaned worker still lives.
    """

    def __init__(self, directory: str, what: str = "run", command: str | None = None) -> None:
        self.directory = directory
        self.what = what
        self.command = command or " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])
        self.path = os.path.join(directory, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = _describe_owner(_read_owner(self.path))
            raise RunDirError(
                f"{self.directory} is in use by another semmim process ({owner}); two writers "
                f"would overwrite each other's {self.what}. Wait for it to end (or stop it), or "
                "use another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "since": time.time(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------- what --out is
def holds_run(directory: str) -> list[str]:
    """The run files ``directory`` holds (``config.json``, ``log.csv``, ``summary.json``,
    ``checkpoints``); empty for a new or empty directory."""
    if not os.path.isdir(directory):
        return []
    return [n for n in RUN_FILES if os.path.lexists(os.path.join(directory, n))]


def _check_writable(directory: str, option: str) -> None:
    """RunDirError when ``directory`` (or, if missing, its nearest existing parent) is a file
    or cannot be written."""
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        where = "is" if probe == os.path.abspath(directory) else f"is inside {probe}, which is"
        raise RunDirError(f"{option} {directory}: {where} a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(
            f"{option} {directory}: {probe} is not writable (permissions or a read-only "
            "filesystem); nothing was trained. Give a writable --out"
        )


def prepare_out(
    directory: str,
    resume: bool,
    overwrite: bool = False,
    command: str = "semmim train",
    option: str = "--out",
) -> str | None:
    """Check an output directory before a command trains into it; returns where an old run
    was moved (``--overwrite``) or None.

    Refuses (:class:`RunDirError`) a path that is a file or cannot be written, a directory
    another process holds (naming it), and — unless ``resume`` — one that already holds a run:
    the message names ``--resume`` and another ``--out``, or ``--overwrite``, which moves the
    old run aside to ``DIR.old-<YYYYmmdd-HHMMSS>`` (never deletes it).
    """
    if resume and overwrite:
        raise RunDirError("--overwrite and --resume exclude each other")
    _check_writable(directory, option)
    owner = lock_owner(directory)
    if owner is not None:
        raise RunDirError(
            f"{option} {directory} is in use by another semmim process ({owner}); wait for it "
            "to end (or stop it), or use another --out"
        )
    found = holds_run(directory)
    if resume or not found:
        return None
    if not overwrite:
        raise RunDirError(
            f"{option} {directory} already holds a run ({', '.join(found)}); starting a new one "
            f"there would truncate its log and mix their checkpoints. Continue it with "
            f"'{command} --out {directory} --resume', give another --out, or pass --overwrite "
            f"to move the old run aside to {directory.rstrip(os.sep)}.old-<time> (nothing is "
            "deleted)"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = directory.rstrip(os.sep)
    target, n = f"{base}.old-{stamp}", 1
    while os.path.lexists(target):
        n += 1
        target = f"{base}.old-{stamp}-{n}"
    os.rename(base, target)
    return target


def check_output_file(path: str, option: str = "--json") -> None:
    """Before a long computation: create the folder of ``path`` and check it can be written
    (RunDirError naming ``option`` otherwise), so the result is not lost at the end."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise RunDirError(f"{option} {path}: is a directory; give a file name")
    _check_writable(directory, option)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"{option} {path}: cannot create {directory} ({err.strerror})") from None


# ------------------------------------------------------------------------------- disk full
def is_no_space(err: BaseException, directory: str, need_bytes: int) -> bool:
    """Whether a failed write into ``directory`` ran out of space: ENOSPC / EDQUOT, or torch's
    ``[enforce fail at inline_container.cc...] ... file write failed`` while the filesystem has
    less free space than ``need_bytes``."""
    if isinstance(err, OSError) and err.errno in _NO_SPACE_ERRNOS:
        return True
    if isinstance(err, RuntimeError) and (
        "inline_container" in str(err) or "file write failed" in str(err)
    ):
        try:
            return shutil.disk_usage(directory).free < need_bytes
        except OSError:
            return True
    return False


def no_space_error(err: BaseException) -> RunDirError | None:
    """A :class:`RunDirError` naming the file for an OSError that is a full disk or quota
    (``"no space left on DIR writing FILE"``); None for any other error."""
    if isinstance(err, OSError) and err.errno in _NO_SPACE_ERRNOS:
        if not err.filename:
            return RunDirError(f"no space left on the device writing a run file ({err})")
        folder = os.path.dirname(os.path.abspath(err.filename))
        return RunDirError(
            f"no space left on {folder} writing {err.filename} ({err.strerror}); what was "
            "there before is intact (files are replaced atomically)"
        )
    return None


def no_space_message(directory: str, need_bytes: int, what: str = "a checkpoint") -> str:
    """``"no space left on DIR (a checkpoint needs ~N MB, M MB free)"``."""
    try:
        free = f", {shutil.disk_usage(directory).free / 2**20:.0f} MB free"
    except OSError:
        free = ""
    return (
        f"no space left on {directory} ({what} needs ~{max(1, round(need_bytes / 2**20))} MB"
        f"{free}); the previous checkpoint is intact. Free space, then continue with --resume"
    )


# ------------------------------------------------------------------------- child processes
PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux prctl
    ``PR_SET_PDEATHSIG``); if the parent ``parent_pid`` is already gone, exit at once.

    Returns False where the platform has no such call (the per-run lock then makes a rerun
    refuse while an orphan lives). Call it first thing in a child process.
    """
    if not sys.platform.startswith("linux"):
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
        # The parent may have died between our fork and the prctl: then we are orphaned now.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), sig)
        return True
    return False


# --------------------------------------------------------------------------------- resuming
def own_checkpoint_check(
    directory: str, keys: tuple[str, ...]
) -> Callable[[dict[str, Any]], str | None] | None:
    """For ``--resume``: a check that a checkpoint belongs to the run in ``directory``.

    The run's own ``config.json`` (written when it started, and at each resume) records its
    ``keys`` (the resume contract: seed, data, batch size, ...); a checkpoint whose saved values
    differ was made by another run (e.g. a ``step_*.pt`` copied from another seed) and the check
    returns why. None when the directory has no ``config.json`` (nothing to compare with).
    """
    cfg = read_json(os.path.join(directory, "config.json"), missing_ok=True)
    if not isinstance(cfg, dict):
        return None
    want = {**cfg.get("train", {}), "world_size": cfg.get("world_size")}
    path = os.path.join(directory, "config.json")

    def check(state: dict[str, Any]) -> str | None:
        got = {**state.get("train_config", {}), "world_size": state.get("world_size")}
        diffs = [
            f"{k} {got[k]!r} (not {want[k]!r})"
            for k in keys
            if want.get(k) is not None and got.get(k) is not None and got[k] != want[k]
        ]
        if not diffs:
            return None
        return f"made by another run than {path} describes: {', '.join(diffs)}"

    return check


# ------------------------------------------------------------------------- eval results
def run_dir_of(checkpoint: str) -> str:
    """The run directory a checkpoint file belongs to: ``RUN`` for ``RUN/checkpoints/step.pt``,
    else the folder that holds the file."""
    folder = os.path.dirname(os.path.abspath(checkpoint))
    if os.path.basename(folder) == "checkpoints":
        return os.path.dirname(folder)
    return folder


def _slug(spec: str) -> str:
    """A file-name part for a data spec: ``folder:/x/tux`` -> ``folder-tux``."""
    kind, sep, rest = spec.partition(":")
    if sep and "/" in rest:
        spec = f"{kind}-{os.path.basename(rest.rstrip('/').split(',')[0])}"
    keep = "".join(c if c.isalnum() or c == "." else "-" for c in spec)
    return "-".join(p for p in keep.split("-") if p)[:60] or "data"


def eval_json_path(
    checkpoint: str,
    data: str | None,
    run_data: str,
    split: str = "val",
    task: str | None = None,
    saved_task: str = "pretrain",
    latest: str | None = None,
) -> str:
    """Where ``semmim eval`` writes its result without ``--json`` (the rule its --help states).

    Beside the run the checkpoint belongs to (:func:`run_dir_of`). ``eval.json`` only for the
    run's own evaluation — its data, the held-out split, its task, its newest checkpoint — so
    the file ``semmim ablate`` reads is only ever replaced by the same evaluation. Anything else
    gets its own name, ``eval_<data>_<split>_<task>_step<N>.json`` with the parts that differ.
    """
    parts = []
    if data is not None and data != run_data:
        parts.append(_slug(data))
    if split != "val":
        parts.append(split)
    if task is not None and task != saved_task:
        parts.append(task)
    if latest is not None and os.path.realpath(latest) != os.path.realpath(checkpoint):
        digits = "".join(c for c in os.path.basename(checkpoint) if c.isdigit())
        parts.append(f"step{int(digits)}" if digits else _slug(os.path.basename(checkpoint)))
    name = "eval" + "".join(f"_{p}" for p in parts) + ".json"
    return os.path.join(run_dir_of(checkpoint), name)
