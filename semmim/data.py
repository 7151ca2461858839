"""Image-caption data: ``--data`` specs, records, held-out split, dataset, sampler, collate.

Specs (all read offline):

* ``synthetic[:N[:V]]`` (also the default, no ``--data``): the embedded procedural shapes
  (:mod:`semmim.synthetic`), ``N`` training scenes (default 50000) and ``V`` held-out (default 500).
* ``folder:PATH`` — every image under PATH (recursively) with a same-named ``.txt`` beside it; the first
  line is the caption. When images sit in two or more top-level sub-folders, the sub-folder names are
  the zero-shot classes (e.g. Tux Paint's ``animals``, ``food``, ...).
* ``json:FILE`` — ALBEF-style list of ``{"image": path, "caption": str | [str, ...]}`` (or
  ``"captions"``), or a COCO captions file (``{"images": [...], "annotations": [...]}``); relative paths
  are resolved against the file's folder.
* ``csv:FILE`` / ``tsv:FILE`` — a header row; the image column is one of ``image, image_path, filepath,
  file, filename, path``, the caption column one of ``caption, text, title, sentence``; an optional
  ``label``/``class``/``category`` column gives zero-shot classes.
* ``wds:PATTERN`` — webdataset tar shards (brace ranges like ``shard-{000..009}.tar`` and globs); a
  sample is the members sharing a key, one image (jpg/jpeg/png/webp) and one ``txt``.

Bad samples — missing or corrupt image, empty caption — are skipped with a warning and counted
(:class:`SkipLog`); listing-time problems are found when the spec is opened, decode failures when the
sample is loaded (in the worker; the collate function drops it and the main process counts it).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from semmim import synthetic
from semmim.transforms import sample_rng

log = logging.getLogger("semmim.data")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".svg")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGE_COLUMNS = ("image", "image_path", "filepath", "file", "filename", "path")
CAPTION_COLUMNS = ("caption", "text", "title", "sentence")
LABEL_COLUMNS = ("label", "class", "category")
SYNTHETIC_TRAIN = 50_000
SYNTHETIC_VAL = 500


# ----------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class TarMember:
    """An image stored in a tar shard: raw bytes at ``offset`` (uncompressed tars) or by ``name``."""

    path: str
    name: str
    offset: int = -1
    size: int = -1


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
    """Counts skipped samples by reason; warns for the first ``max_warnings``, then once more."""

    def __init__(self, max_warnings: int = 20) -> None:
        self.counts: Counter[str] = Counter()
        self.keys: set[tuple[str, str]] = set()
        self.max_warnings = max_warnings

    def add(self, reason: str, key: str) -> None:
        """Record that sample ``key`` was skipped for ``reason`` (each (reason, key) counted once)."""
        if (reason, key) in self.keys:
            return
        self.keys.add((reason, key))
        self.counts[reason] += 1
        shown = len(self.keys)
        if shown <= self.max_warnings:
            log.warning("skipped %s: %s", key, reason)
        elif shown == self.max_warnings + 1:
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


@dataclass
class DataSource:
    """An opened ``--data`` spec: train / held-out records, zero-shot classes, listing-time skips."""

    spec: str
    train: list[Record]
    val: list[Record]
    class_names: list[str] | None = None
    prompt_template: str | list[str] = "a photo of a {name}"
    skips: SkipLog = field(default_factory=SkipLog)
    # Recommended augmentation (see semmim.transforms.TrainTransform).
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: str = "swap"

    def describe(self) -> str:
        """One line: spec, pair/image counts, classes, skipped."""
        n_img = len({r.key for r in self.train}), len({r.key for r in self.val})
        classes = f", {len(self.class_names)} classes" if self.class_names else ""
        return (
            f"{self.spec}: {len(self.train)} train pairs ({n_img[0]} images), {len(self.val)} held-out "
            f"pairs ({n_img[1]} images){classes}, {self.skips.total} skipped at listing"
        )


# ------------------------------------------------------------------------------------ spec parsing
def open_data(
    spec: str | None, val_size: float = 0.1, seed: int = 0, max_val: int = 1000
) -> DataSource:
    """Open a ``--data`` spec (``None`` = embedded default) and split off the held-out images.

    Args:
        spec: ``synthetic[:N]``, ``folder:PATH``, ``json:FILE``, ``csv:FILE``, ``tsv:FILE``,
            ``wds:PATTERN`` or ``None``.
        val_size: held-out images, a fraction (< 1) or a count (>= 1); ignored for ``synthetic``.
        seed: seeds the split (by a hash of each image key, so it is stable as data grows).
        max_val: cap on held-out images when ``val_size`` is a fraction.
    """
    if spec is None or spec == "synthetic" or spec.startswith("synthetic:"):
        return _open_synthetic(spec or "synthetic", seed)
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise ValueError(
            f"data spec must look like KIND:PATH (folder, json, csv, tsv, wds) or "
            f"'synthetic[:N]', got {spec!r}"
        )
    skips = SkipLog()
    class_names: list[str] | None = None
    if kind == "folder":
        records, class_names = _list_folder(arg, skips)
        template = "a picture of {name}"
    elif kind == "json":
        records = _list_json(arg, skips)
        template = "a photo of a {name}"
    elif kind in ("csv", "tsv"):
        records, class_names = _list_table(arg, "," if kind == "csv" else "\t", skips)
        template = "a photo of a {name}"
    elif kind == "wds":
        records = _list_wds(arg, skips)
        template = "a photo of a {name}"
    else:
        raise ValueError(
            f"unknown data kind {kind!r} in spec {spec!r}; expected folder, json, csv, "
            f"tsv, wds or synthetic"
        )
    if not records:
        raise ValueError(
            f"data spec {spec!r} has no usable image-caption pairs (skipped: {skips.summary()})"
        )
    train, val = split_records(records, val_size, seed, max_val)
    return DataSource(spec, train, val, class_names, template, skips)


def _open_synthetic(spec: str, seed: int) -> DataSource:
    parts = spec.split(":")[1:]
    try:
        n_train = int(parts[0]) if parts and parts[0] else SYNTHETIC_TRAIN
        n_val = int(parts[1]) if len(parts) > 1 else SYNTHETIC_VAL
    except ValueError:
        raise ValueError(
            f"synthetic data sizes must be integers (synthetic[:N[:V]]), got {spec!r}"
        ) from None
    if n_train < 1 or n_val < 0 or len(parts) > 2:
        raise ValueError(
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
    )


def split_records(
    records: Sequence[Record], val_size: float, seed: int, max_val: int = 1000
) -> tuple[list[Record], list[Record]]:
    """Split by image key (all captions of an image on one side), deterministically by hash."""
    keys = sorted({r.key for r in records})
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    n_val = int(val_size) if val_size >= 1 else min(max_val, int(round(val_size * len(keys))))
    if n_val >= len(keys):
        raise ValueError(f"val_size={val_size} leaves no training images ({len(keys)} images)")

    def rank(key: str) -> bytes:
        return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()

    val_keys = set(sorted(keys, key=rank)[:n_val])
    train = [r for r in records if r.key not in val_keys]
    val = [r for r in records if r.key in val_keys]
    return train, val


def _first_line(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.readline().strip()


def _list_folder(root: str, skips: SkipLog) -> tuple[list[Record], list[str] | None]:
    if not os.path.isdir(root):
        raise ValueError(f"folder data: {root!r} is not a directory")
    stems: dict[str, list[str]] = {}
    captions: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            stem, ext = os.path.splitext(os.path.join(dirpath, name))
            if ext.lower() in IMAGE_EXTS:
                stems.setdefault(stem, []).append(ext)
            elif ext == ".txt":
                captions.add(stem)
    for stem in sorted(captions - set(stems)):
        skips.add("missing image", os.path.relpath(stem + ".txt", root))
    records: list[tuple[str, str, str]] = []
    for stem in sorted(stems):
        if stem not in captions:
            continue  # an image with no caption file is not a sample (e.g. thumbnails, masks)
        # Prefer a raster file when the same picture also exists as SVG.
        exts = sorted(stems[stem], key=lambda e: (e.lower() == ".svg", e))
        path = stem + exts[0]
        rel = os.path.relpath(path, root)
        text = _first_line(stem + ".txt")
        if not text:
            skips.add("empty caption", rel)
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


def _list_json(path: str, skips: SkipLog) -> list[Record]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    root = os.path.dirname(os.path.abspath(path))
    items: list[tuple[str, Any]] = []
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        files = {img["id"]: img["file_name"] for img in data["images"]}
        by_image: dict[Any, list[str]] = {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann.get("caption", ""))
        items = [(files[i], caps) for i, caps in by_image.items() if i in files]
    elif isinstance(data, list):
        for n, entry in enumerate(data):
            if not isinstance(entry, dict) or "image" not in entry:
                skips.add("entry without 'image'", f"{path}[{n}]")
                continue
            items.append((entry["image"], entry.get("caption", entry.get("captions", ""))))
    else:
        raise ValueError(
            f"json data {path!r}: expected a list of {{image, caption}} or a COCO "
            f"captions dict, got {type(data).__name__}"
        )
    records = []
    for image, caps in items:
        image_path = image if os.path.isabs(image) else os.path.join(root, image)
        if not os.path.exists(image_path):
            skips.add("missing image", image)
            continue
        for cap in [caps] if isinstance(caps, str) else list(caps):
            cap = str(cap).strip()
            if not cap:
                skips.add("empty caption", image)
                continue
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
        raise ValueError(
            f"table data {path!r}: no {what} column; header is {list(header)}, expected "
            f"one of {list(candidates)}"
        )
    return None


def _list_table(path: str, delimiter: str, skips: SkipLog) -> tuple[list[Record], list[str] | None]:
    root = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        image_col = _pick_column(header, IMAGE_COLUMNS, path, "image")
        caption_col = _pick_column(header, CAPTION_COLUMNS, path, "caption")
        label_col = _pick_column(header, LABEL_COLUMNS, path, "label", required=False)
        rows = list(reader)
    class_names = (
        sorted({r[label_col].strip() for r in rows if r.get(label_col)}) if label_col else None
    )
    records = []
    for row in rows:
        image = (row.get(image_col) or "").strip()
        image_path = image if os.path.isabs(image) else os.path.join(root, image)
        if not image or not os.path.exists(image_path):
            skips.add("missing image", image or f"{path}:row{reader.line_num}")
            continue
        cap = (row.get(caption_col) or "").strip()
        if not cap:
            skips.add("empty caption", image)
            continue
        lab = (row.get(label_col) or "").strip() if label_col else ""
        records.append(Record(image_path, cap, image, class_names.index(lab) if lab else -1))
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


def _list_wds(pattern: str, skips: SkipLog) -> list[Record]:
    paths: list[str] = []
    for p in expand_braces(pattern):
        found = sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else [p]
        paths.extend(found)
    if not paths:
        raise ValueError(f"wds data: pattern {pattern!r} matches no files")
    records = []
    for path in paths:
        if not os.path.exists(path):
            skips.add("missing shard", path)
            continue
        compressed = not path.endswith(".tar")
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        texts: dict[str, str] = {}
        try:
            with tarfile.open(path, "r:*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    dirname, base = os.path.split(info.name)
                    stem, _, ext = base.partition(".")
                    key = os.path.join(dirname, stem)
                    samples.setdefault(key, {})[ext.lower()] = info
                    if ext.lower() == "txt":
                        member = tar.extractfile(info)
                        texts[key] = member.read().decode("utf-8", "replace") if member else ""
        except (tarfile.TarError, OSError, EOFError) as err:
            skips.add(f"unreadable shard ({type(err).__name__})", path)
            continue
        for key in sorted(samples):
            members = samples[key]
            image_ext = next((e for e in WDS_IMAGE_EXTS if e in members), None)
            name = f"{os.path.basename(path)}/{key}"
            if image_ext is None:
                skips.add("missing image", name)
                continue
            text = texts.get(key, "").strip().splitlines()
            if not text or not text[0].strip():
                skips.add("empty caption", name)
                continue
            info = members[image_ext]
            ref = TarMember(path, info.name, -1 if compressed else info.offset_data, info.size)
            records.append(Record(ref, text[0].strip(), name))
    return records


# ------------------------------------------------------------------------------------ image loading
_TAR_CACHE: dict[tuple[int, str], tarfile.TarFile] = {}


def load_image(ref: ImageRef) -> Image.Image:
    """Load an image reference (file path, tar member or synthetic scene) as a decoded PIL image.

    Raises OSError / ValueError on a missing or corrupt image (the dataset turns this into a skip).
    """
    if isinstance(ref, SyntheticRef):
        return synthetic.render(ref.seed, ref.split, ref.index, ref.size)
    if isinstance(ref, TarMember):
        if ref.offset >= 0:
            with open(ref.path, "rb") as f:
                f.seek(ref.offset)
                data = f.read(ref.size)
            if len(data) != ref.size:
                raise OSError(f"truncated tar member {ref.name}")
        else:
            cache_key = (os.getpid(), ref.path)
            if cache_key not in _TAR_CACHE:
                _TAR_CACHE[cache_key] = tarfile.open(ref.path, "r:*")
            member = _TAR_CACHE[cache_key].extractfile(ref.name)
            if member is None:
                raise OSError(f"no member {ref.name} in {ref.path}")
            data = member.read()
        image = Image.open(io.BytesIO(data))
    elif ref.lower().endswith(".svg"):
        image = _rasterise_svg(ref)
    else:
        image = Image.open(ref)
    image.load()  # decode now, so corrupt files fail here and not in a transform
    return image


def _rasterise_svg(path: str, size: int = 384) -> Image.Image:
    try:
        import cairosvg  # optional: SVGs are skipped (and counted) without it
    except ImportError:
        raise ValueError("SVG needs the optional 'cairosvg' package") from None
    return Image.open(io.BytesIO(cairosvg.svg2png(url=path, output_width=size)))


# ----------------------------------------------------------------------------- dataset and sampler
class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset over records. Index with an int or with ``(epoch, index)``.

    Augmentation randomness comes from ``sample_rng(seed, epoch, index)`` only, so it does not depend on
    worker count, worker assignment, or whether the run was resumed. A sample whose image cannot be
    loaded comes back as ``{"bad": reason, "key": key}``; :class:`Collator` drops it.
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
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return {"bad": f"unreadable image ({type(err).__name__}: {err})", "key": record.key}
        return {"image": tensor, "caption": caption, "index": index, "label": record.label}


class Collator:
    """Stacks images, tokenises captions (padding to the longest, truncating at ``max_len``).

    Returns ``images (B,3,H,W)``, ``input_ids (B,T)``, ``attention_mask (B,T)``, ``index (B,)``,
    ``label (B,)``, ``captions`` and ``bad`` — a list of (key, reason) for dropped samples.
    """

    def __init__(self, tokenizer, max_len: int) -> None:
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        self.tokenizer = tokenizer
        self.max_len = max_len

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
