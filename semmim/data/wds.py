"""``wds:`` data: webdataset tar shards listed into records (brace ranges and globs)."""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
import zlib

from semmim.data.records import (
    DataError,
    Record,
    SkipLog,
    TarMember,
    caption_prefix,
    decode_caption,
)
from semmim.paths import file_problem, open_regular

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` alternatives and ``{000..009}`` numeric ranges (zero padding kept)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [p for option in options for p in expand_braces(head + option + tail)]


def _scan_shard(path: str) -> tuple[list[tarfile.TarInfo], dict[str, bytes], str | None, bool]:
    """A shard's file members, the first bytes of its ``txt`` members (:func:`caption_prefix`: a
    huge member is skipped over, never held), why it is incomplete (or None), and whether it is
    compressed (told by its content, not its name).

    A shard is complete when it is read to an end-of-archive block. A truncated shard keeps the
    members that lie wholly before the cut; the reason says where the cut is.
    """
    members: list[tarfile.TarInfo] = []
    texts: dict[str, bytes] = {}
    problem: str | None = None
    size = os.path.getsize(path)
    with open_regular(path, "shard") as f, tarfile.open(path, "r:*", fileobj=f) as tar:
        compressed = not isinstance(tar.fileobj, io.BufferedReader)  # else gzip / bz2 / xz file
        try:
            for info in tar:
                if not info.isfile():
                    continue
                if not compressed and info.offset_data + info.size > size:
                    raise tarfile.ReadError("unexpected end of data")
                if os.path.basename(info.name).partition(".")[2].lower() == "txt":
                    member = tar.extractfile(info)
                    texts[info.name] = caption_prefix(member) if member else b""
                members.append(info)
            # tarfile stops quietly at a missing or cut header; a whole archive ends with zero blocks.
            tar.fileobj.seek(tar.offset)
            end = tar.fileobj.read(tarfile.BLOCKSIZE)
            if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
                problem = f"no end-of-archive block after byte {tar.offset}"
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            # The member being read when the data ran out is incomplete; the ones before are whole.
            if members and (compressed or members[-1].offset_data + members[-1].size > size):
                members.pop()
            whole = {m.name for m in members}
            texts = {k: v for k, v in texts.items() if k in whole}
            problem = f"{type(err).__name__}: {err}"
    return members, texts, problem, compressed


def list_wds(pattern: str, skips: SkipLog) -> list[Record]:
    paths: list[str] = []
    for p in expand_braces(pattern):
        found = sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else [p]
        paths.extend(found)
    if not paths:
        raise DataError(f"wds data: pattern {pattern!r} matches no files")
    records = []
    for path in paths:
        reason = file_problem(path, "shard")
        if reason:
            skips.add(reason, path)
            continue
        try:
            infos, texts, problem, compressed = _scan_shard(path)
        except (tarfile.TarError, OSError, EOFError) as err:
            skips.add(f"unreadable shard ({type(err).__name__})", path, str(err))
            continue
        if problem:
            skips.add("truncated shard", path, f"{problem}; read {len(infos)} whole members")
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        for info in infos:
            dirname, base = os.path.split(info.name)
            stem, _, ext = base.partition(".")
            samples.setdefault(os.path.join(dirname, stem), {})[ext.lower()] = info
        for key in sorted(samples):
            members = samples[key]
            image_ext = next((e for e in WDS_IMAGE_EXTS if e in members), None)
            name = f"{os.path.basename(path)}/{key}"
            if image_ext is None:
                skips.add("missing image", name)
                continue
            if "txt" not in members:
                skips.add("missing caption", name)
                continue
            text, reason = decode_caption(texts.get(members["txt"].name, b""))
            if reason:
                skips.add(reason, name)
                continue
            info = members[image_ext]
            ref = TarMember(path, info.name, info.offset_data, info.size, compressed)
            records.append(Record(ref, text, name))
    return records
