"""Opening files that a listing, a data spec or a run directory names: regular files only.

Every loader that reads a file because something else named it (a caption beside an image, an
image path in a JSON / CSV listing, a VQA image folder, a checkpoint's ``latest`` pointer and
sidecar) goes through this module, so one rule holds everywhere:

* A FIFO, a device, a socket or a directory named where a file is expected is refused from its
  ``stat`` alone, never opened: opening a FIFO for reading blocks until a writer appears, and a
  device such as ``/dev/zero`` never ends. :func:`open_regular` also opens non-blocking and checks
  the descriptor again, so a FIFO swapped in after the ``stat`` cannot block either.
* :func:`inside` says whether a path, with its symlinks resolved, lies inside a folder; callers use
  it where a file must belong to that folder (a caption file of ``folder:`` data, a checkpoint of a
  run directory), so a link to ``/etc/passwd`` is never read as one of them.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

__all__ = ["NotRegularFile", "file_problem", "inside", "open_regular", "require_regular"]

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str | None:
    """None for a regular file, else what the mode says it is ("a FIFO", ...)."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a file")


class NotRegularFile(OSError):
    """``path`` names a FIFO, device, socket or directory where a file of ``what`` is expected.

    ``reason`` is the stable skip reason ("image is not a regular file (a FIFO)"), the message
    also names the path.
    """

    def __init__(self, path: str, what: str, kind: str) -> None:
        self.path, self.what, self.kind = path, what, kind
        self.reason = f"{what} is not a regular file ({kind})"
        super().__init__(f"{path}: {self.reason}; refusing to read it")


def inside(path: str, directory: str) -> bool:
    """True when ``path`` (symlinks resolved) lies strictly inside ``directory`` (resolved)."""
    real, root = os.path.realpath(path), os.path.realpath(directory)
    return real != root and os.path.commonpath([real, root]) == root


def file_problem(path: str, what: str, root: str | None = None) -> str | None:
    """None when ``path`` may be read as a ``what`` file, else the skip reason (never opens it).

    Reasons: ``"missing {what}"`` (also a dangling link), ``"unreadable {what} (PermissionError)"``,
    ``"{what} is not a regular file (a FIFO)"`` (device, socket, directory), and, when ``root``
    is given, ``"{what} links outside the data folder"`` for a path whose resolved location is
    not inside ``root``.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"missing {what}"
    except OSError as err:
        return f"unreadable {what} ({type(err).__name__})"
    kind = _kind(mode)
    if kind is not None:
        return f"{what} is not a regular file ({kind})"
    if root is not None and not inside(path, root):
        return f"{what} links outside the data folder"
    return None


def require_regular(path: str, what: str = "file") -> None:
    """:class:`NotRegularFile` unless ``path`` is a regular file (from its ``stat``; the usual
    OSError when it cannot be stat'ed), for readers that open the path themselves."""
    kind = _kind(os.stat(path).st_mode)
    if kind is not None:
        raise NotRegularFile(path, what, kind)


def open_regular(path: str, what: str = "file") -> BinaryIO:
    """``open(path, "rb")`` for a regular file; :class:`NotRegularFile` for anything else.

    Raises the usual OSError (FileNotFoundError, PermissionError, ...) when the path cannot be
    opened. Nothing is read before the checks, and the open itself cannot block on a FIFO.
    """
    require_regular(path, what)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        kind = _kind(os.fstat(fd).st_mode)  # the file opened, not the one stat'ed before
        if kind is not None:
            raise NotRegularFile(path, what, kind)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
