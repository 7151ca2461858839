"""Image-caption data: ``--data`` specs, records, held-out split, dataset, sampler, collate.

Specs (all read offline):

* ``synthetic[:N[:V]]`` (also the default, no ``--data``): the embedded procedural shapes
  (:mod:`semmim.synthetic`), ``N`` training scenes (default 50000) and ``V`` held-out (default 500).
* ``folder:PATH`` — every image under PATH (recursively) with a same-named ``.txt`` beside it (names
  and extensions matched case-insensitively: ``X.PNG`` + ``x.txt`` is a pair); the first line is the
  caption. When images sit in two or more top-level sub-folders, the sub-folder names are the
  zero-shot classes (e.g. Tux Paint's ``animals``, ``food``, ...).
* ``json:FILE`` — ALBEF-style list of ``{"image": path, "caption": str | [str, ...]}`` (or
  ``"captions"``), or a COCO captions file (``{"images": [...], "annotations": [...]}``); relative paths
  are resolved against the file's folder.
* ``csv:FILE`` / ``tsv:FILE`` — a header row; the image column is one of ``image, image_path, filepath,
  file, filename, path``, the caption column one of ``caption, text, title, sentence``; an optional
  ``label``/``class``/``category`` column gives zero-shot classes.
* ``wds:PATTERN`` — webdataset tar shards (brace ranges like ``shard-{000..009}.tar`` and globs); a
  sample is the members sharing a key, one image (jpg/jpeg/png/webp) and one ``txt``.

Text is UTF-8 (a leading BOM is dropped); only a caption's first line is read, at most
``CAPTION_MAX_BYTES``. Bad samples — missing or corrupt image, a caption that is empty, too long, not
valid UTF-8 or not a string, a truncated shard, a FIFO / device / socket named as an image, caption
or shard (refused from its ``stat``, never opened: :mod:`semmim.paths`), a ``folder:`` caption file
that is a link resolving outside the folder (images may link anywhere: they are only decoded) —
are skipped with a warning and counted (:class:`SkipLog`); listing-time problems are found when the spec is opened, decode failures when the
sample is loaded (in the worker; the collate function drops it and the main process counts it). Images
that need an optional decoder that is not installed (SVG: ``cairosvg``) are counted at listing, by
split, and named in :meth:`DataSource.describe`. :meth:`DataSource.verify` decodes a sample of each
split before training and raises :class:`DataError` when none of it can be read.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import hashlib
import io
import json
import logging
import os
import re
import struct
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from semmim import synthetic
from semmim.paths import NotRegularFile, file_problem, open_regular, require_regular
from semmim.transforms import sample_rng

log = logging.getLogger("semmim.data")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".svg")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGE_COLUMNS = ("image", "image_path", "filepath", "file", "filename", "path")
CAPTION_COLUMNS = ("caption", "text", "title", "sentence")
LABEL_COLUMNS = ("label", "class", "category")
SYNTHETIC_TRAIN = 50_000
SYNTHETIC_VAL = 500
DEFAULT_SPLIT_SEED = 0
# What a corrupt or hostile image file can raise while Pillow opens and decodes it. Anything else is a
# bug and is not swallowed.
DECODE_ERRORS = (
    OSError,  # includes PIL.UnidentifiedImageError and truncated files
    ValueError,
    SyntaxError,  # some Pillow plugins report bad headers this way
    EOFError,
    struct.error,
    IndexError,
    Image.DecompressionBombError,  # more than 2 * Image.MAX_IMAGE_PIXELS pixels
    tarfile.TarError,  # a shard that became unreadable after listing
)
BAD_UTF8 = "caption not valid UTF-8"
# Most bytes of a caption's first line that are read. Far above what any tokenizer keeps (the
# model's text length is tens of tokens), and it bounds what listing reads: a huge ``.txt``
# (a 1.5 GB member of a 1.5 MB compressed shard) costs this much memory, not its size.
CAPTION_MAX_BYTES = 16 * 1024


class DataError(ValueError):
    """The data cannot be used as given (the message says what was found and what to do)."""


class MissingDecoder(ValueError):
    """An image needs an optional decoder that cannot be used here; the message says how to fix it."""


def image_error_reason(err: BaseException) -> str:
    """The skip reason for an image that failed to load with ``err`` (stable, so counts add up)."""
    if isinstance(err, Image.DecompressionBombError):
        return (
            f"image over the decompression-bomb limit ({2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels)"
        )
    if isinstance(err, MissingDecoder):
        return str(err)
    if isinstance(err, NotRegularFile):
        return err.reason
    return f"unreadable image ({type(err).__name__})"


# ---------------------------------------------------------------------------- optional decoders
@functools.cache
def svg_decoder_problem() -> str | None:
    """None when SVGs can be rasterised here, else the skip reason saying what is missing."""
    install = "pip install 'cairosvg>=2.7', semmim's [svg] extra"
    try:
        import cairosvg
    except ImportError:
        return f"SVG image: cairosvg not installed ({install})"
    except OSError:  # cairocffi found no libcairo
        return (
            "SVG image: cairosvg cannot load the cairo library "
            "(install it: apt-get install libcairo2)"
        )
    version = tuple(int(p) for p in re.findall(r"\d+", getattr(cairosvg, "__version__", "0"))[:2])
    if version < (2, 7):
        # Older releases fetch external resources named in an SVG (CVE-2023-27586).
        return f"SVG image: cairosvg {cairosvg.__version__} is older than 2.7 ({install})"
    return None


def missing_decoder(image: ImageRef) -> str | None:
    """The skip reason when ``image`` needs an optional decoder that is not usable, else None."""
    if isinstance(image, str) and image.lower().endswith(".svg"):
        return svg_decoder_problem()
    return None


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


@dataclass
class DataSource:
    """An opened ``--data`` spec: train / held-out records, zero-shot classes, listing-time skips.

    ``ignored`` counts files that were seen but are not samples (an image with no caption file, a
    second format of a listed picture), by what they are; ``decoder_skips`` maps the skip reason of
    each missing optional decoder to the samples it cost per split (``{"train": n, "held-out": m}``).
    """

    spec: str
    train: list[Record]
    val: list[Record]
    class_names: list[str] | None = None
    prompt_template: str | list[str] = "a photo of a {name}"
    skips: SkipLog = field(default_factory=SkipLog)
    # Recommended augmentation (see semmim.transforms.TrainTransform).
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: str = "swap"
    split_seed: int = DEFAULT_SPLIT_SEED
    ignored: Counter[str] = field(default_factory=Counter)
    decoder_skips: dict[str, dict[str, int]] = field(default_factory=dict)
    # What ``val`` is: the "held-out" split, or a "validation" split carved from the training
    # pairs (:meth:`carve_validation`; the held-out pairs are then not in this source at all).
    eval_split: str = "held-out"

    def carve_validation(self, size: float, seed: int) -> DataSource:
        """This source with ``size`` training images (a fraction < 1 or a count) moved into a
        validation split that replaces the held-out one: train on the rest, choose settings on
        the validation pairs, and the held-out pairs stay unseen until the settings are fixed.

        By image key (all captions of an image on one side), by a hash salted apart from the
        held-out split's, so it is fixed for a given ``seed`` whatever the training seed.
        """
        if self.eval_split != "held-out":
            raise DataError("carve_validation: this source already evaluates on a validation split")
        train, val = split_records(self.train, size, seed, salt="validation")
        if not val:
            raise DataError(f"validation={size} carves no images from {len(self.train)} pairs")
        return dataclasses.replace(self, train=train, val=val, eval_split="validation")

    def describe(self) -> str:
        """One line: spec, pair/image counts, classes, split seed, skipped, missing decoders, ignored."""
        n_img = len({r.key for r in self.train}), len({r.key for r in self.val})
        classes = f", {len(self.class_names)} classes" if self.class_names else ""
        # A missing decoder's reason is spelled out below, with its cost per split.
        skipped = self.skips.describe(
            "skipped at listing", lambda r: r.partition(": ")[0] if r in self.decoder_skips else r
        )
        carved = " carved from the training data" if self.eval_split == "validation" else ""
        text = (
            f"{self.spec}: {len(self.train)} train pairs ({n_img[0]} images), {len(self.val)} "
            f"{self.eval_split} pairs ({n_img[1]} images){carved}{classes}, split seed "
            f"{self.split_seed}; {skipped}"
        )
        for reason, by_split in sorted(self.decoder_skips.items()):
            what, _, why = reason.partition(": ")
            text += (
                f"; {sum(by_split.values())} {what}s skipped ({by_split.get('train', 0)} train, "
                f"{by_split.get('held-out', 0)} held-out): {why}"
            )
        if self.ignored:
            text += "; not samples: " + ", ".join(
                f"{n} {what}" for what, n in sorted(self.ignored.items())
            )
        return text

    def check(
        self, limit: int | None = None, skips: SkipLog | None = None, progress: bool = False
    ) -> dict[str, tuple[int, int]]:
        """Decode the images of each split and count failures.

        Args:
            limit: ``None`` decodes every image; ``n`` decodes ``n`` evenly spaced images per split.
            skips: where failures are counted (default: ``self.skips``; pass a fresh :class:`SkipLog`
                for a trial run whose failures the loader will count again later).
            progress: show a progress bar.

        Returns ``{"train": (decoded, tried), "held-out": (decoded, tried)}``.
        """
        skips = self.skips if skips is None else skips
        return {
            split: _decode_images(records, limit, skips, progress, split)
            for split, records in (("train", self.train), ("held-out", self.val))
        }

    def verify(self, sample: int = 16, held_out: bool = True) -> dict[str, tuple[int, int]]:
        """Decode ``sample`` images of each split; raise :class:`DataError` when none decodes.

        Cheap (``2 * sample`` decodes), so it runs before training: data whose every image is bad
        otherwise trains on empty batches, and held-out images that are all bad fail the evaluation
        after training. ``held_out=False`` skips the held-out check (no evaluation planned). Failures
        are not counted in ``self.skips`` (the loader counts them when it meets them).

        Returns ``{"train": (decoded, tried), "held-out": (decoded, tried)}``.
        """
        result: dict[str, tuple[int, int]] = {}
        for split, records, words, consequence in (
            ("train", self.train, "training", "training would see no pairs"),
            ("held-out", self.val, "held-out", "the evaluation would have no images"),
        ):
            trial = SkipLog(max_warnings=0)
            ok, tried = result[split] = _decode_images(records, sample, trial, False, split)
            if tried and not ok and (split == "train" or held_out):
                reasons = ", ".join(f"{r}: {n}" for r, n in sorted(trial.counts.items()))
                advice = (
                    f"Check them with `semmim data {self.spec} --check`"
                    if split == "train"
                    else "Fix them, or train with --no-eval or --val-size 0"
                )
                raise DataError(
                    f"data {self.spec!r}: none of the {tried} {words} images checked can be "
                    f"decoded ({reasons}); {consequence}. {advice}"
                )
        return result


def _decode_images(
    records: Sequence[Record], limit: int | None, skips: SkipLog, progress: bool, desc: str
) -> tuple[int, int]:
    """Decode each image of ``records`` once (or ``limit`` evenly spaced ones); count failures.

    Returns (decoded, tried).
    """
    from tqdm.auto import tqdm

    first: dict[str, Record] = {}
    for r in records:
        first.setdefault(r.key, r)
    images = list(first.values())
    if limit is not None and len(images) > limit:
        images = [images[i * len(images) // limit] for i in range(limit)]
    ok = 0
    for r in tqdm(images, desc=f"decode {desc}", disable=not progress):
        reason = decode_failure(r.image)
        if reason is None:
            ok += 1
        else:
            skips.add(reason, r.key)
    return ok, len(images)


# ------------------------------------------------------------------------------------ spec parsing
def open_data(
    spec: str | None,
    val_size: float = 0.1,
    split_seed: int = DEFAULT_SPLIT_SEED,
    max_val: int = 1000,
) -> DataSource:
    """Open a ``--data`` spec (``None`` = embedded default) and split off the held-out images.

    Args:
        spec: ``synthetic[:N]``, ``folder:PATH``, ``json:FILE``, ``csv:FILE``, ``tsv:FILE``,
            ``wds:PATTERN`` or ``None``.
        val_size: held-out images, a fraction (< 1) or a count (>= 1); ignored for ``synthetic``.
        split_seed: seeds the held-out split (by a hash of each image key, so it is stable as data
            grows) and the embedded scenes. It is not the training seed, so runs with different
            training seeds are evaluated on the same held-out pairs.
        max_val: cap on held-out images when ``val_size`` is a fraction.

    Raises:
        DataError (a ValueError): a bad spec, an unreadable listing file, or no usable pairs.
    """
    if isinstance(split_seed, bool) or not isinstance(split_seed, int):
        raise DataError(f"split_seed must be an int, got {split_seed!r}")
    if spec is None or spec == "synthetic" or spec.startswith("synthetic:"):
        return _open_synthetic(spec or "synthetic", split_seed)
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise DataError(
            f"data spec must look like KIND:PATH (folder, json, csv, tsv, wds) or "
            f"'synthetic[:N]', got {spec!r}"
        )
    skips = SkipLog()
    ignored: Counter[str] = Counter()
    class_names: list[str] | None = None
    if kind == "folder":
        records, class_names = _list_folder(arg, skips, ignored)
        template = "a picture of {name}"
    elif kind == "json":
        records = _list_json(arg, skips, ignored)
        template = "a photo of a {name}"
    elif kind in ("csv", "tsv"):
        records, class_names = _list_table(arg, "," if kind == "csv" else "\t", skips)
        template = "a photo of a {name}"
    elif kind == "wds":
        records = _list_wds(arg, skips)
        template = "a photo of a {name}"
    else:
        raise DataError(
            f"unknown data kind {kind!r} in spec {spec!r}; expected folder, json, csv, "
            f"tsv, wds or synthetic"
        )
    if not records:
        raise DataError(
            f"data spec {spec!r} has no usable image-caption pairs (skipped: {skips.summary()})"
        )
    # Split first, then drop what this machine cannot decode: the held-out images are a function of
    # the listing and the split seed only, not of which optional packages are installed.
    train, val = split_records(records, val_size, split_seed, max_val)
    decoder_skips: dict[str, dict[str, int]] = {}
    kept: dict[str, list[Record]] = {"train": [], "held-out": []}
    for split, part in (("train", train), ("held-out", val)):
        for r in part:
            reason = missing_decoder(r.image)
            if reason is None:
                kept[split].append(r)
                continue
            if (reason, r.key) not in skips.keys:
                counts = decoder_skips.setdefault(reason, {"train": 0, "held-out": 0})
                counts[split] += 1
            skips.add(reason, r.key)
    for reason, by_split in decoder_skips.items():
        log.warning(
            "%d images skipped (%d train, %d held-out): %s",
            sum(by_split.values()),
            by_split["train"],
            by_split["held-out"],
            reason,
        )
    if not kept["train"]:
        raise DataError(
            f"data spec {spec!r} has no usable training pairs (skipped: {skips.summary()})"
        )
    return DataSource(
        spec,
        kept["train"],
        kept["held-out"],
        class_names,
        template,
        skips,
        split_seed=split_seed,
        ignored=ignored,
        decoder_skips=decoder_skips,
    )


def _open_synthetic(spec: str, seed: int) -> DataSource:
    parts = spec.split(":")[1:]
    try:
        n_train = int(parts[0]) if parts and parts[0] else SYNTHETIC_TRAIN
        n_val = int(parts[1]) if len(parts) > 1 else SYNTHETIC_VAL
    except ValueError:
        raise DataError(
            f"synthetic data sizes must be integers (synthetic[:N[:V]]), got {spec!r}"
        ) from None
    if n_train < 1 or n_val < 0 or len(parts) > 2:
        raise DataError(
            f"synthetic spec must be synthetic[:N[:V]] with N >= 1, V >= 0, got {spec!r}"
        )

    def records(split: str, n: int) -> list[Record]:
        out = []
        for i in range(n):
            objects = synthetic.scene(seed, split, i)
            out.append(
                Record(
                    SyntheticRef(seed, split, i),
                    synthetic.caption(objects),
                    f"{split}/{i}",
                    synthetic.label(objects),
                )
            )
        return out

    return DataSource(
        spec,
        records("train", n_train),
        records("val", n_val),
        list(synthetic.SHAPES),
        synthetic.PROMPT_TEMPLATES,
        SkipLog(),
        crop_scale=(0.85, 1.0),
        flip="swap",
        split_seed=seed,
    )


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


def _list_folder(
    root: str, skips: SkipLog, ignored: Counter[str]
) -> tuple[list[Record], list[str] | None]:
    if not os.path.isdir(root):
        raise DataError(f"folder data: {root!r} is not a directory")
    # Files grouped by (folder, lower-case stem): names and extensions match case-insensitively.
    images: dict[tuple[str, str], list[str]] = {}
    captions: dict[tuple[str, str], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            group = (dirpath, stem.lower())
            if ext.lower() in IMAGE_EXTS:
                images.setdefault(group, []).append(os.path.join(dirpath, name))
            elif ext.lower() == ".txt":
                captions.setdefault(group, []).append(os.path.join(dirpath, name))
    for group in sorted(set(captions) - set(images)):
        skips.add("missing image", os.path.relpath(captions[group][0], root))
    chosen: list[tuple[str, tuple[str, str]]] = []
    for group, paths in images.items():
        if group not in captions:
            # Not a sample (thumbnails, masks, pictures without text), but say how many there were.
            ignored["image files without a caption file"] += len(paths)
            continue
        # Prefer a raster file when the same picture also exists as SVG (or in another format).
        paths = sorted(paths, key=lambda p: (p.lower().endswith(".svg"), p))
        if len(paths) > 1:
            ignored["other formats of a listed picture"] += len(paths) - 1
        chosen.append((paths[0], group))
    records: list[tuple[str, str, str]] = []
    # Records in the order of their path without extension: the record index feeds the sampler, so
    # this order is part of what makes a run reproducible.
    for path, group in sorted(chosen, key=lambda c: os.path.splitext(c[0])[0]):
        rel = os.path.relpath(path, root)
        if len(captions[group]) > 1:
            names = [os.path.basename(c) for c in captions[group]]
            skips.add("several caption files (names differ only in case)", rel, ", ".join(names))
            continue
        # Images may be links anywhere (a folder of links into a dataset); they are only decoded.
        # A caption is text that is trained on and printed, so it must resolve inside the folder.
        problem = file_problem(path, "image") or file_problem(
            captions[group][0], "caption file", root
        )
        if problem is None:
            try:
                with open_regular(captions[group][0], "caption file") as f:
                    text, problem = decode_caption(caption_prefix(f))
            except NotRegularFile as err:
                problem = err.reason
            except OSError as err:
                problem = f"unreadable caption file ({type(err).__name__})"
        if problem:
            skips.add(problem, rel)
            continue
        top = rel.split(os.sep)[0] if os.sep in rel else ""
        records.append((path, text, top))
    tops = sorted({t for _, _, t in records if t})
    class_names = tops if len(tops) >= 2 else None
    out = [
        Record(
            p,
            c,
            os.path.relpath(p, root),
            class_names.index(t) if class_names and t in class_names else -1,
        )
        for p, c, t in records
    ]
    return out, class_names


def read_json_file(path: str, what: str = "json data") -> Any:
    """The parsed JSON of ``path`` (UTF-8, a leading BOM dropped): every loader's one reader.

    Raises :class:`DataError` naming ``what`` and the file: unreadable (missing, a FIFO or device:
    never opened), not valid UTF-8 (with the byte offset), truncated (the text ends inside a
    value), or not JSON (with line and column).
    """
    try:
        with open_regular(path, what) as f:
            raw = f.read()
    except NotRegularFile as err:
        raise DataError(str(err)) from None
    except OSError as err:
        raise DataError(f"{what}: cannot read {path!r} ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{what} {path!r} is not valid UTF-8 (byte {err.start}: {err.reason})"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        # The parser stops at the end of the text, or inside a string running to the end.
        ends = err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string")
        cut = " (the file ends early: truncated?)" if ends else ""
        raise DataError(f"{what} {path!r} is not valid JSON{cut}: {err}") from None


def json_type(value: Any) -> str:
    """A JSON value's type as the messages name it: ``null``, ``int``, ``str``, ``list``, ..."""
    return "null" if value is None else type(value).__name__


def texts_of(
    value: Any, field: str, where: str, skips: SkipLog, empty: str, lists: bool = True
) -> list[tuple[str, str]]:
    """``(name, text)`` of the non-empty stripped strings of a JSON ``field`` value; every other
    value is skipped and counted in ``skips`` under a typed reason (``null`` and numbers are never
    turned into text).

    ``value`` is a string (named ``where``) or, when ``lists``, a list of strings (element i
    named ``{where}.{field}[i]``). ``empty`` is the reason for a blank string ("empty caption").
    """
    if lists and isinstance(value, list):
        named = [(f"{where}.{field}[{i}]", v) for i, v in enumerate(value)]
    else:
        named = [(where, value)]
    kind = "a string or a list of strings" if lists else "a string"
    out = []
    for name, v in named:
        if not isinstance(v, str):
            skips.add(f"'{field}' must be {kind}, got {json_type(v)}", name)
        elif not v.strip():
            skips.add(empty, name)
        else:
            out.append((name, v.strip()))
    return out


def int_of(entry: dict[str, Any], field: str, where: str, skips: SkipLog) -> int | None:
    """``entry[field]`` when it is a JSON integer, else None with the skip counted (a missing
    field, ``null``, a string, a bool and a float such as ``1.0`` or ``3.7``: never truncated)."""
    if field not in entry:
        skips.add(f"entry without '{field}'", where)
        return None
    value = entry[field]
    if isinstance(value, bool) or not isinstance(value, int):
        skips.add(f"'{field}' must be an integer, got {json_type(value)}", where)
        return None
    return value


def _list_json(path: str, skips: SkipLog, ignored: Counter[str]) -> list[Record]:
    data = read_json_file(path)
    root = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    # (where, image, [(where, field, caption value, lists allowed)]): ``where`` names the entry
    # in warnings, e.g. "data.json[3]"; values are type-checked below (:func:`texts_of`).
    items: list[tuple[str, str, list[tuple[str, str, Any, bool]]]] = []
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        if not isinstance(data["images"], list) or not isinstance(data["annotations"], list):
            raise DataError(f"json data {path!r}: COCO 'images' and 'annotations' must be lists")
        files: dict[Any, tuple[str, str]] = {}
        for n, img in enumerate(data["images"]):
            where = f"{name}:images[{n}]"
            if not isinstance(img, dict) or "id" not in img:
                skips.add("COCO image entry without 'id'", where)
            elif isinstance(img["id"], (dict, list)):
                skips.add(
                    f"COCO 'id' must be a number or string, got {json_type(img['id'])}", where
                )
            elif not isinstance(img.get("file_name"), str) or not img["file_name"]:
                got = json_type(img.get("file_name"))
                skips.add(f"COCO 'file_name' must be a non-empty string, got {got}", where)
            else:
                files[img["id"]] = (where, img["file_name"])
        by_image: dict[Any, list[tuple[str, str, Any, bool]]] = {}
        for n, ann in enumerate(data["annotations"]):
            where = f"{name}:annotations[{n}]"
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            if isinstance(image_id, (dict, list)) or image_id not in files:
                skips.add("COCO annotation for an unknown image id", where)
                continue
            by_image.setdefault(image_id, []).append((where, "caption", ann.get("caption"), False))
        ignored["COCO images without annotations"] += len(set(files) - set(by_image))
        items = [(files[i][0], files[i][1], caps) for i, caps in by_image.items()]
    elif isinstance(data, list):
        for n, entry in enumerate(data):
            where = f"{name}[{n}]"
            if not isinstance(entry, dict) or "image" not in entry:
                skips.add("entry without 'image'", where)
                continue
            image = entry["image"]
            if not isinstance(image, str) or not image:
                skips.add(f"'image' must be a non-empty string, got {json_type(image)}", where)
                continue
            if "caption" not in entry and "captions" not in entry:
                skips.add("entry without 'caption' or 'captions'", where)
                continue
            key = "caption" if "caption" in entry else "captions"
            items.append((where, image, [(where, key, entry[key], True)]))
    else:
        raise DataError(
            f"json data {path!r}: expected a list of {{image, caption}} or a COCO "
            f"captions dict, got {type(data).__name__}"
        )
    records = []
    for where, image, caps in items:
        image_path = image if os.path.isabs(image) else os.path.join(root, image)
        problem = file_problem(image_path, "image")
        if problem:
            skips.add(problem, image, where)
            continue
        for cap_where, key, value, lists in caps:
            for _, cap in texts_of(value, key, cap_where, skips, "empty caption", lists):
                records.append(Record(image_path, cap, image))
    return records


def _pick_column(
    header: Sequence[str], candidates: Sequence[str], path: str, what: str, required: bool = True
) -> str | None:
    lower = {h.strip().lower(): h for h in header}
    for c in candidates:
        if c in lower:
            return lower[c]
    if required:
        raise DataError(
            f"table data {path!r}: no {what} column; header is {list(header)}, expected "
            f"one of {list(candidates)}"
        )
    return None


def _valid_utf8(text: str) -> bool:
    """False when ``text`` holds bytes that were not UTF-8 (read with ``errors="surrogateescape"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _list_table(path: str, delimiter: str, skips: SkipLog) -> tuple[list[Record], list[str] | None]:
    root = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    # surrogateescape: one row with bad bytes is a skip of that row, not a failure of the file.
    try:
        raw = open_regular(path, "table data")
    except NotRegularFile as err:
        raise DataError(str(err)) from None
    except OSError as err:
        raise DataError(f"table data: cannot read {path!r} ({err.strerror or err})") from None
    f = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
    with f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            header = reader.fieldnames or []
            image_col = _pick_column(header, IMAGE_COLUMNS, path, "image")
            caption_col = _pick_column(header, CAPTION_COLUMNS, path, "caption")
            label_col = _pick_column(header, LABEL_COLUMNS, path, "label", required=False)
            # The line number must be read while iterating: after list(reader) it is the last line.
            rows = [(reader.line_num, row) for row in reader]
        except csv.Error as err:
            raise DataError(f"table data {path!r}, line {reader.line_num}: {err}") from None

    def cell(row: dict[str, Any], col: str | None) -> str:
        value = row.get(col) if col else None
        return value.strip() if isinstance(value, str) else ""

    good: list[tuple[str, str, str, str]] = []
    for line, row in rows:
        where = f"{name} line {line}"
        image, cap, lab = cell(row, image_col), cell(row, caption_col), cell(row, label_col)
        if not image:
            skips.add("empty image cell", where)
            continue
        image_path = image if os.path.isabs(image) else os.path.join(root, image)
        problem = file_problem(image_path, "image")
        if problem:
            skips.add(problem, where, image)
            continue
        if not _valid_utf8(cap):
            skips.add(BAD_UTF8, where)
            continue
        if not cap:
            skips.add("empty caption", where)
            continue
        if not _valid_utf8(lab):
            skips.add("label not valid UTF-8", where)
            continue
        good.append((image_path, cap, image, lab))
    # Classes from every row's label (as before skipping): a class whose images were all skipped
    # still takes part in zero-shot classification.
    labels = {cell(row, label_col) for _, row in rows} if label_col else set()
    class_names = sorted(lab for lab in labels if lab and _valid_utf8(lab)) if label_col else None
    records = [
        Record(p, c, image, class_names.index(lab) if class_names and lab else -1)
        for p, c, image, lab in good
    ]
    return records, class_names or None


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


def _list_wds(pattern: str, skips: SkipLog) -> list[Record]:
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


# ------------------------------------------------------------------------------------ image loading
_TAR_CACHE: dict[tuple[int, str], tarfile.TarFile] = {}


def image_cache_budget() -> int:
    """Bytes of decoded images each process keeps (``SEMMIM_IMAGE_CACHE_MB``, default 512; 0 = off)."""
    raw = os.environ.get("SEMMIM_IMAGE_CACHE_MB", "512")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"SEMMIM_IMAGE_CACHE_MB must be a number of MiB, got {raw!r}") from None
    if mb < 0:
        raise ValueError(f"SEMMIM_IMAGE_CACHE_MB must be >= 0, got {raw!r}")
    return int(mb * 2**20)


class _ImageCache:
    """Decoded images of this process, keyed by reference and file identity (mtime, size,
    inode), up to a byte budget.

    Decoding is a pure function of the file, so a cached image is the image a new decode would
    give: caching changes speed, never a pixel. Filled first come, first kept (no eviction), so a
    dataset larger than the budget caches a fixed part of itself; per process (each DataLoader
    worker has its own). Worth it for SVGs (cairosvg takes ~60 ms per 384 px raster) and small
    datasets seen for many epochs.
    """

    def __init__(self) -> None:
        self.images: dict[Any, Image.Image] = {}
        self.bytes = 0

    def get(self, key: Any) -> Image.Image | None:
        return self.images.get(key)

    def put(self, key: Any, image: Image.Image) -> None:
        size = image.width * image.height * max(1, len(image.getbands()))
        if self.bytes + size <= image_cache_budget():
            self.images[key] = image
            self.bytes += size


_IMAGE_CACHE = _ImageCache()


def load_image(ref: ImageRef, cache: bool = True) -> Image.Image:
    """Load an image reference (file path, tar member or synthetic scene) as a decoded PIL image.

    Raises one of :data:`DECODE_ERRORS` on a missing, corrupt or oversized image, and
    :class:`MissingDecoder` when an optional decoder is not installed (the dataset turns these into
    skips; :func:`image_error_reason` names them). File and tar images are kept decoded in this
    process's cache (:class:`_ImageCache`) unless ``cache`` is False: callers must not modify the
    returned image in place.
    """
    if isinstance(ref, SyntheticRef):
        return synthetic.render(ref.seed, ref.split, ref.index, ref.size)
    if not cache:
        return _decode(ref)
    try:  # the file's identity: a rewritten file is decoded again
        st = os.stat(ref.path if isinstance(ref, TarMember) else ref)
    except OSError:
        return _decode(ref)  # raises the decoder's own error for a missing file
    key = (ref, st.st_mtime_ns, st.st_size, st.st_ino)
    cached = _IMAGE_CACHE.get(key)
    if cached is not None:
        return cached
    image = _decode(ref)
    _IMAGE_CACHE.put(key, image)
    return image


def _decode(ref: ImageRef) -> Image.Image:
    if isinstance(ref, TarMember):
        if ref.compressed:
            cache_key = (os.getpid(), ref.path)
            if cache_key not in _TAR_CACHE:
                f = open_regular(ref.path, "shard")
                try:
                    _TAR_CACHE[cache_key] = tarfile.open(ref.path, "r:*", fileobj=f)
                except BaseException:
                    f.close()
                    raise
            stream = _TAR_CACHE[cache_key].fileobj  # seekable decompressed view of the tar
            stream.seek(ref.offset)
            data = stream.read(ref.size)
        else:
            with open_regular(ref.path, "shard") as f:
                f.seek(ref.offset)
                data = f.read(ref.size)
        if len(data) != ref.size:
            raise OSError(f"truncated tar member {ref.name}")
        image = Image.open(io.BytesIO(data))
    elif ref.lower().endswith(".svg"):
        image = _rasterise_svg(ref)
    else:
        with open_regular(ref, "image") as f:
            image = Image.open(f)
            image.load()  # decode now, so corrupt files fail here and not in a transform
        return image
    image.load()
    return image


def decode_failure(ref: ImageRef) -> str | None:
    """Try to decode ``ref``: None when it loads, else the skip reason (:func:`image_error_reason`)."""
    try:
        load_image(ref, cache=False)  # a check of every image must not fill the cache
    except DECODE_ERRORS as err:
        return image_error_reason(err)
    return None


def _rasterise_svg(path: str, size: int = 384) -> Image.Image:
    problem = svg_decoder_problem()
    if problem is not None:
        raise MissingDecoder(problem)
    require_regular(path, "image")  # cairosvg opens the path itself
    import cairosvg

    # cairosvg >= 2.7 neither resolves XML entities nor fetches external resources unless unsafe=True.
    return Image.open(io.BytesIO(cairosvg.svg2png(url=path, output_width=size)))


# ----------------------------------------------------------------------------- dataset and sampler
class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset over records. Index with an int or with ``(epoch, index)``.

    Augmentation randomness comes from ``sample_rng(seed, epoch, index)`` only, so it does not depend on
    worker count, worker assignment, or whether the run was resumed. A sample whose image cannot be
    loaded comes back as ``{"bad": reason, "key": key}`` (reason from :func:`image_error_reason`);
    :class:`Collator` drops it.
    """

    def __init__(self, records: Sequence[Record], transform, seed: int = 0) -> None:
        self.records = list(records)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        record = self.records[index]
        try:
            image = load_image(record.image)
            tensor, caption = self.transform(
                image, record.caption, sample_rng(self.seed, epoch, index)
            )
        except DECODE_ERRORS as err:
            return {"bad": image_error_reason(err), "key": record.key}
        return {"image": tensor, "caption": caption, "index": index, "label": record.label}


def image_id(key: str) -> int:
    """A record key's image id: the first 63 bits of its BLAKE2b-64, so the same image has the
    same id in every process, rank and run (the model's ITC queue keeps ids across batches)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


class Collator:
    """Stacks images, tokenises captions (padding to the longest, truncating at ``max_len``).

    Returns ``images (B,3,H,W)``, ``input_ids (B,T)``, ``attention_mask (B,T)``, ``index (B,)``,
    ``label (B,)``, ``captions`` and ``bad`` — a list of (key, reason) for dropped samples; given
    the dataset's ``records``, also ``image_ids (B,)`` (:func:`image_id` of each pair's key: the
    model never treats two pairs of one image as each other's negatives).
    """

    def __init__(self, tokenizer, max_len: int, records: Sequence[Record] | None = None) -> None:
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.image_ids = (
            None if records is None else torch.tensor([image_id(r.key) for r in records])
        )

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        good = [it for it in items if "bad" not in it]
        bad = [(it["key"], it["bad"]) for it in items if "bad" in it]
        batch: dict[str, Any] = {"bad": bad, "captions": [it["caption"] for it in good]}
        if not good:
            return batch
        tokens = self.tokenizer(
            [it["caption"] for it in good],
            padding="longest",
            truncation=True,
            max_length=self.max_len,
            return_tensors="pt",
        )
        batch.update(
            images=torch.stack([it["image"] for it in good]),
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            index=torch.tensor([it["index"] for it in good]),
            label=torch.tensor([it["label"] for it in good]),
        )
        if self.image_ids is not None:
            batch["image_ids"] = self.image_ids[batch["index"]]
        return batch


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Deterministic, shardable, resumable batch sampler yielding lists of ``(epoch, index)``.

    Epoch ``e`` uses the permutation of ``torch.Generator().manual_seed(seed + e)``; rank ``r`` of
    ``world_size`` takes ``perm[r::world_size]`` (truncated so all ranks have the same number of batches),
    cut into batches of ``batch_size`` (last partial batch dropped). ``set_epoch(e, start_batch)`` makes
    the next iteration start at batch ``start_batch`` of epoch ``e`` — that is the saved data position.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        if len(self) == 0:
            raise ValueError(
                f"{num_samples} samples give no full batch of batch_size={batch_size} per rank "
                f"(world_size={world_size}); lower --batch-size"
            )
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return (self.num_samples // self.world_size) // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch and the first batch of the next iteration."""
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            order = torch.randperm(
                self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch)
            )
        else:
            order = torch.arange(self.num_samples)
        per_rank = self.num_samples // self.world_size
        mine = order[self.rank :: self.world_size][:per_rank].tolist()
        for b in range(self.start_batch, len(self)):
            yield [(self.epoch, i) for i in mine[b * self.batch_size : (b + 1) * self.batch_size]]


def _worker_init(worker_id: int) -> None:
    # Decoding is per-sample work; intra-op threads in every worker would oversubscribe the CPU.
    torch.set_num_threads(1)


def make_loader(
    dataset: PairDataset, batch_sampler, collate: Collator, num_workers: int, seed: int = 0
) -> torch.utils.data.DataLoader:
    """A DataLoader with worker processes that never touches the global torch RNG.

    The loader gets its own ``torch.Generator`` (DataLoader otherwise draws worker base seeds from the
    global RNG each time an iterator is created, which would break exact resume).
    """
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_worker_init if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )
