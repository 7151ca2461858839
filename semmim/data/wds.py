"""Webdataset shards read through the ``webdataset`` library (the ``[wds]`` extra).

A shard is a tar file; a sample is the consecutive members sharing a key (the name up to its
first dot, webdataset's convention), one image (jpg/jpeg/png/webp) and one ``txt``. Shards are
named by a pattern: brace ranges and alternatives (``shard-{000..099}.tar``, webdataset's
expansion), globs for local paths, ``pipe:COMMAND`` (the command's stdout is the shard) and URLs
(``http(s)://``, and whatever else ``webdataset.gopen`` opens).

:func:`shard_samples` is the one reader of a shard's samples, for both ways of using them: a
``wds-map:`` spec lists every sample into records (:func:`list_wds`: small data, map-style, exact
resume); a ``wds:`` spec streams them (:mod:`semmim.data.stream`). Either way a ``txt`` member is
read to at most ``CAPTION_MAX_BYTES + 1`` bytes (:func:`~semmim.data.records.caption_prefix`), the
caption and skip rules are :func:`~semmim.data.records.decode_caption`'s, and a shard that is cut
short keeps the samples that lie wholly before the cut (counted: ``truncated shard``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any, NamedTuple
from urllib.parse import urlparse
from urllib.request import url2pathname

from semmim.data.records import (
    DataError,
    MemberBytes,
    Record,
    SkipLog,
    caption_prefix,
    decode_caption,
)
from semmim.paths import file_problem

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
INSTALL_HINT = "pip install 'semmim[wds]'"


def webdataset() -> Any:
    """The ``webdataset`` module; :class:`DataError` naming the extra when it is not installed."""
    try:
        import webdataset
    except ImportError:
        raise DataError(
            f"wds data is read with the webdataset library, which is not installed ({INSTALL_HINT})"
        ) from None
    return webdataset


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` alternatives and ``{000..009}`` numeric ranges (zero padding kept), with
    webdataset's own expansion (``::`` separates patterns)."""
    return list(webdataset().shardlists.expand_urls(pattern))


def local_path(url: str) -> str | None:
    """The file path of a local shard (a plain path or ``file:`` URL); None for ``pipe:`` and
    remote URLs."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    return url if parsed.scheme == "" else None


def shard_urls(pattern: str) -> list[str]:
    """The shards a ``wds:`` pattern names, in pattern order (a local glob sorted).

    Raises :class:`DataError` when it names none.
    """
    urls: list[str] = []
    for url in expand_braces(pattern):
        path = local_path(url)
        if path is not None and any(ch in path for ch in "*?["):
            urls.extend(sorted(glob.glob(path)))
        else:
            urls.append(url)
    if not urls:
        raise DataError(f"wds data: pattern {pattern!r} matches no files")
    return urls


def shard_name(url: str) -> str:
    """The shard's file name (the last word of a ``pipe:`` command): the prefix of its sample
    names, e.g. ``shard-003.tar/000123``."""
    text = url.split()[-1] if url.startswith("pipe:") else (urlparse(url).path or url)
    return os.path.basename(text.rstrip("/")) or url


class ShardSample(NamedTuple):
    """One entry of :func:`shard_samples`: a sample (``offset`` = its position in the shard,
    counting skipped samples) with its ``record`` or its skip ``reason``; or a problem of the
    whole shard (``offset`` None, ``name`` = the shard's URL)."""

    offset: int | None
    name: str
    record: Record | None
    reason: str | None
    detail: str = ""


def _members(tar: tarfile.TarFile) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the file members; ``txt`` members cut to :func:`caption_prefix`."""
    for info in tar:
        if not info.isfile():
            continue
        f = tar.extractfile(info)
        ext = os.path.basename(info.name).partition(".")[2].lower()
        data = b"" if f is None else caption_prefix(f) if ext == "txt" else f.read()
        if ext != "txt" and len(data) != info.size:
            raise tarfile.ReadError("unexpected end of data")
        yield info.name, data
        tar.members = []  # webdataset's trick: a streamed shard's member list never grows


def _ends_cleanly(tar: tarfile.TarFile) -> bool:
    """Whether the archive ended at an end-of-archive (zero) block, not at a cut."""
    stream = tar.fileobj
    if hasattr(stream, "seekable") and stream.seekable():
        stream.seek(tar.offset)
        end = stream.read(tarfile.BLOCKSIZE)
        return len(end) == tarfile.BLOCKSIZE and end.count(0) == tarfile.BLOCKSIZE
    # A stream cannot be re-read: tarfile consumed a whole block at the end only if one was there.
    return getattr(stream, "pos", 0) >= tar.offset + tarfile.BLOCKSIZE


def _sample(prefix: str, members: dict[str, bytes], offset: int) -> ShardSample:
    image_ext = next((e for e in WDS_IMAGE_EXTS if e in members), None)
    if image_ext is None:
        return ShardSample(offset, prefix, None, "missing image")
    if "txt" not in members:
        return ShardSample(offset, prefix, None, "missing caption")
    text, reason = decode_caption(members["txt"])
    if reason:
        return ShardSample(offset, prefix, None, reason)
    ref = MemberBytes(f"{prefix}.{image_ext}", members[image_ext])
    return ShardSample(offset, prefix, Record(ref, text, prefix), None)


def shard_samples(url: str) -> Iterator[ShardSample]:
    """The samples of shard ``url`` in order, read through ``webdataset.gopen``.

    A local shard that is not a regular file (a FIFO, a device) is refused from its ``stat``,
    never opened. A shard that cannot be opened as a tar is one ``unreadable shard`` entry; one
    that is cut short yields its samples from the members wholly before the cut, then a
    ``truncated shard`` entry.
    """
    gopen = webdataset().gopen
    base = shard_name(url)
    path = local_path(url)
    reason = file_problem(path, "shard") if path is not None else None
    if reason:
        yield ShardSample(None, url, None, reason)
        return
    try:
        stream = gopen(path if path is not None else url, "rb")
    except (OSError, ValueError) as err:
        yield ShardSample(None, url, None, f"unreadable shard ({type(err).__name__})", str(err))
        return
    offset, members, prefix = 0, 0, None
    current: dict[str, bytes] = {}
    problem = ""
    unreadable: tuple[str, str] | None = None  # (exception type, message)
    try:
        seekable = hasattr(stream, "seekable") and stream.seekable()
        try:
            tar = tarfile.open(fileobj=stream, mode="r:*" if seekable else "r|*")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            unreadable, tar = (type(err).__name__, str(err)), None
        with tar or contextlib.nullcontext():
            try:
                for name, data in _members(tar) if tar is not None else ():
                    members += 1
                    dirname, stem = os.path.split(name)
                    key = os.path.join(dirname, stem.partition(".")[0])
                    ext = stem.partition(".")[2].lower()
                    if key != prefix and prefix is not None:
                        yield _sample(f"{base}/{prefix}", current, offset)
                        offset, current = offset + 1, {}
                    prefix = key
                    current.setdefault(ext, data)
                if tar is not None and not _ends_cleanly(tar):
                    problem = f"no end-of-archive block after byte {tar.offset}"
            except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
                # The member being read when the data ran out is lost; the ones before are whole.
                problem = f"{type(err).__name__}: {err}"
    finally:
        try:
            stream.close()  # a pipe: command's exit status is checked here
        except OSError as err:
            # A failed command or download: its exit status says more than the empty stream.
            unreadable = (type(err).__name__, str(err))
    if unreadable and not members:
        kind, message = unreadable
        yield ShardSample(None, url, None, f"unreadable shard ({kind})", message)
        return
    if unreadable:
        problem = problem or ": ".join(unreadable)
    if current:
        yield _sample(f"{base}/{prefix}", current, offset)
    if problem:
        yield ShardSample(None, url, None, "truncated shard", f"{problem}; read {members} members")


def list_wds(pattern: str, skips: SkipLog) -> list[Record]:
    """Every sample of the shards ``pattern`` names, as records (``wds-map:``); skips counted."""
    records = []
    for url in shard_urls(pattern):
        for s in shard_samples(url):
            if s.record is None:
                skips.add(s.reason or "", s.name, s.detail)
            else:
                records.append(s.record)
    return records
