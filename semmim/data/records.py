"""Records, skip counting, caption bytes and the held-out split: what every loader shares.

A :class:`Record` is one image-caption pair; a :class:`SkipLog` counts the samples a loader drops,
by reason. :func:`caption_prefix` / :func:`decode_caption` are the one bounded reader of caption
bytes (files and tar members alike); :func:`split_records` is the held-out split by image key.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("semmim.data")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".svg")
SYNTHETIC_TRAIN = 50_000
SYNTHETIC_VAL = 500
DEFAULT_SPLIT_SEED = 0
BAD_UTF8 = "caption not valid UTF-8"
# Most bytes of a caption's first line that are read. Far above what any tokenizer keeps (the
# model's text length is tens of tokens), and it bounds what listing reads: a huge ``.txt``
# (a 1.5 GB member of a 1.5 MB compressed shard) costs this much memory, not its size.
CAPTION_MAX_BYTES = 16 * 1024


class DataError(ValueError):
    """The data cannot be used as given (the message says what was found and what to do)."""


# ----------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class TarMember:
    """An image stored in a tar shard: ``size`` bytes at ``offset`` of the (decompressed) tar stream.

    Uncompressed shards are read directly at the file offset; compressed ones (``compressed``) are
    decompressed up to it. Either way a read never depends on the rest of the shard, so the whole
    members of a truncated shard stay readable.
    """

    path: str
    name: str
    offset: int
    size: int
    compressed: bool = False


@dataclass(frozen=True)
class SyntheticRef:
    """Scene ``index`` of the embedded procedural data."""

    seed: int
    split: str
    index: int
    size: int = 128


ImageRef = str | TarMember | SyntheticRef


@dataclass(frozen=True)
class Record:
    """One image-caption pair. ``key`` identifies the image (pairs sharing it share the image)."""

    image: ImageRef
    caption: str
    key: str
    label: int = -1


class SkipLog:
    """Counts skipped samples by reason; warns for the first ``max_warnings``, then once more.

    ``max_warnings=0`` counts silently.
    """

    def __init__(self, max_warnings: int = 20) -> None:
        self.counts: Counter[str] = Counter()
        self.keys: set[tuple[str, str]] = set()
        self.max_warnings = max_warnings

    def add(self, reason: str, key: str, detail: str = "") -> None:
        """Record that sample ``key`` was skipped for ``reason`` (each (reason, key) counted once).

        ``reason`` is the counted category (keep it free of per-sample text); ``detail`` is shown in
        the warning only.
        """
        if (reason, key) in self.keys:
            return
        self.keys.add((reason, key))
        self.counts[reason] += 1
        shown = len(self.keys)
        if shown <= self.max_warnings:
            log.warning("skipped %s: %s%s", key, reason, f" ({detail})" if detail else "")
        elif shown == self.max_warnings + 1 and self.max_warnings > 0:
            log.warning("more samples skipped; further warnings suppressed (see the final count)")

    def state(self) -> dict[str, Any]:
        """Picklable state (for checkpoints)."""
        return {"counts": dict(self.counts), "keys": sorted(self.keys)}

    def load(self, state: dict[str, Any]) -> None:
        """Replace the counts with a :meth:`state` snapshot (no warnings re-emitted)."""
        if state:
            self.counts = Counter(state["counts"])
            self.keys = {tuple(k) for k in state["keys"]}

    @property
    def total(self) -> int:
        """Number of skipped samples."""
        return sum(self.counts.values())

    def summary(self) -> dict[str, int]:
        """Counts by reason plus ``"total"``."""
        return {**dict(sorted(self.counts.items())), "total": self.total}

    def describe(self, what: str = "skipped", shorten: Callable[[str], str] | None = None) -> str:
        """``"3 skipped (empty caption: 1, missing image: 2)"``: the summary every loader prints;
        ``shorten`` rewrites a reason for display."""
        text = f"{self.total} {what}"
        if self.total:
            parts = [f"{shorten(r) if shorten else r}: {n}" for r, n in sorted(self.counts.items())]
            text += f" ({', '.join(parts)})"
        return text


def split_records(
    records: Sequence[Record], val_size: float, seed: int, max_val: int = 1000, salt: str = ""
) -> tuple[list[Record], list[Record]]:
    """Split by image key (all captions of an image on one side), deterministically by hash.

    ``seed`` is the split seed (see :func:`open_data`); ``salt`` makes another split from the
    same seed (the validation split carved from the training pairs uses ``"validation"``).
    """
    keys = sorted({r.key for r in records})
    if val_size < 0:
        raise DataError(f"val_size must be >= 0, got {val_size}")
    n_val = int(val_size) if val_size >= 1 else min(max_val, int(round(val_size * len(keys))))
    if n_val >= len(keys):
        raise DataError(f"val_size={val_size} leaves no training images ({len(keys)} images)")

    def rank(key: str) -> bytes:
        text = f"{seed}:{key}" if not salt else f"{salt}:{seed}:{key}"
        return hashlib.blake2b(text.encode(), digest_size=8).digest()

    val_keys = set(sorted(keys, key=rank)[:n_val])
    train = [r for r in records if r.key not in val_keys]
    val = [r for r in records if r.key in val_keys]
    return train, val


def caption_prefix(f) -> bytes:
    """What a caption file (or tar member) ``f`` needs read: at most ``CAPTION_MAX_BYTES + 1``
    bytes, enough for :func:`decode_caption` to take the first line or say it is too long."""
    return f.read(CAPTION_MAX_BYTES + 1)


def decode_caption(raw: bytes) -> tuple[str, str | None]:
    """The first line of a caption file's bytes, stripped: ``(text, None)``, or ``("", reason)``.

    Decoding is strict (a caption with invalid UTF-8 is a skip, not U+FFFD text); a UTF-8 BOM is
    dropped. Only the first line is decoded: later lines (e.g. Tux Paint's translations) are unused.
    ``raw`` may be a prefix (:func:`caption_prefix`): a first line longer than
    ``CAPTION_MAX_BYTES`` is a skip.
    """
    first = raw.split(b"\n", 1)[0]
    if len(first) > CAPTION_MAX_BYTES:
        return "", f"caption over {CAPTION_MAX_BYTES} bytes"
    try:
        text = first.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return "", BAD_UTF8
    return (text, None) if text else ("", "empty caption")
