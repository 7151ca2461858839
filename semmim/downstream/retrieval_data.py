"""Image–text retrieval splits (COCO / Flickr30K, Karpathy split) for fine-tuning and evaluation.

Two JSON layouts are read, recognised by their shape:

* **Karpathy** (``dataset_coco.json``, ``dataset_flickr30k.json``): ``{"images": [{"filepath":
  "val2014", "filename": "COCO_val2014_….jpg", "split": "train" | "restval" | "val" | "test",
  "sentences": [{"raw": "A man …"}, …], "cocoid": 391895, "imgid": 0}, …]}``; Flickr30K entries
  have no ``filepath``. ``split`` selects the entries (COCO's usual training set is
  ``("train", "restval")``, 113,287 images; test 5,000 / Flickr30K 1,000).
* **ALBEF** per-split lists (``coco_train.json``, ``flickr30k_test.json``): ``[{"image":
  "val2014/COCO_….jpg", "caption": "…" | ["…", …], "image_id": "coco_391895"}, …]``; the train
  files have one entry per caption, grouped here by image. The file is the split: ``split``
  must be None.

An image's identity is its ``cocoid`` / ``imgid`` (Karpathy), its ``image_id`` (ALBEF) or else its
path; images are numbered 0..N−1 in order of first appearance (:attr:`RetrievalImage.index`),
which is what the model's ``image_ids=`` argument takes. Paths are resolved against
``image_root`` (default: the JSON file's folder). Images whose file is missing and empty captions
are skipped and counted (:class:`semmim.data.SkipLog`); captions are kept verbatim (whitespace
stripped; the WordPiece tokenizer is uncased).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from semmim.data import Record, SkipLog

__all__ = ["RetrievalImage", "RetrievalSplit", "load_retrieval_split"]

KARPATHY_SPLITS = ("train", "restval", "val", "test")


@dataclass(frozen=True)
class RetrievalImage:
    """One image of a split: ``index`` 0..N−1 in the split, resolved ``path``, its captions and
    the dataset's own id (``key``: e.g. "391895" for COCO, the ALBEF ``image_id``)."""

    index: int
    path: str
    captions: tuple[str, ...]
    key: str


@dataclass
class RetrievalSplit:
    """The images of one split with their captions.

    ``texts`` lists every caption image by image; ``txt2img[t]`` is caption t's image index and
    ``img2txt[i]`` the caption indices of image i (ALBEF's evaluation maps).
    """

    source: str
    split: str
    images: list[RetrievalImage]
    skips: SkipLog = field(default_factory=SkipLog)

    @property
    def texts(self) -> list[str]:
        return [c for im in self.images for c in im.captions]

    @property
    def txt2img(self) -> list[int]:
        return [im.index for im in self.images for _ in im.captions]

    @property
    def img2txt(self) -> list[list[int]]:
        out, t = [], 0
        for im in self.images:
            out.append(list(range(t, t + len(im.captions))))
            t += len(im.captions)
        return out

    def records(self) -> list[Record]:
        """One :class:`semmim.data.Record` per caption (``key`` = the image's key), in
        :attr:`texts` order: the input of ``semmim.data.PairDataset`` and ``semmim.eval.evaluate``."""
        return [Record(im.path, c, im.key) for im in self.images for c in im.captions]

    def record_image_ids(self) -> torch.Tensor:
        """(number of records,) int64: each record's image index. A batch's ``image_ids`` is
        ``split.record_image_ids()[batch["index"]]`` (``index`` = record positions)."""
        return torch.tensor(self.txt2img, dtype=torch.long)

    def describe(self) -> str:
        n_cap = sum(len(im.captions) for im in self.images)
        return (
            f"{self.source} [{self.split}]: {len(self.images)} images, {n_cap} captions, "
            f"{self.skips.total} skipped"
        )


def _karpathy_entries(data: dict, splits: Sequence[str], file: str) -> list[tuple[str, str, Any]]:
    """(relative path, key, captions) of the entries in ``splits``."""
    out = []
    for n, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "filename" not in im or "sentences" not in im:
            raise ValueError(
                f"{file}: images[{n}] needs 'filename' and 'sentences', got {im!r:.120}"
            )
        if im.get("split") not in splits:
            continue
        rel = os.path.join(im.get("filepath", ""), im["filename"])
        key = str(im.get("cocoid", im.get("imgid", rel)))
        caps = [s.get("raw", " ".join(s.get("tokens", []))) for s in im["sentences"]]
        out.append((rel, key, caps))
    return out


def _albef_entries(data: list, file: str) -> list[tuple[str, str, Any]]:
    out = []
    for n, entry in enumerate(data):
        if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
            raise ValueError(
                f"{file}: entry [{n}] needs 'image' and 'caption' (ALBEF layout), got {entry!r:.120}"
            )
        caps = entry["caption"]
        out.append((entry["image"], str(entry.get("image_id", entry["image"])), caps))
    return out


def load_retrieval_split(
    file: str | os.PathLike,
    split: str | Sequence[str] | None = None,
    image_root: str | os.PathLike | None = None,
    check_files: bool = True,
) -> RetrievalSplit:
    """Read a Karpathy or ALBEF retrieval JSON (see the module docstring).

    Args:
        file: the JSON file.
        split: Karpathy split name(s) to keep: "train", "restval", "val", "test", or several
            (``("train", "restval")``); required for Karpathy files, must be None for ALBEF
            lists (one file per split).
        image_root: folder the image paths are relative to (default: the file's folder).
        check_files: skip (and count) images whose file does not exist.

    Raises ValueError naming the file and the problem (unknown layout, unknown split, no images).
    """
    file = os.fspath(file)
    with open(file, encoding="utf-8") as f:
        data = json.load(f)
    root = (
        os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(file))
    )
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        splits = (split,) if isinstance(split, str) else tuple(split or ())
        bad = [s for s in splits if s not in KARPATHY_SPLITS]
        if not splits or bad:
            raise ValueError(
                f"split: a Karpathy file ({file}) needs split names from {list(KARPATHY_SPLITS)}, "
                f"got {split!r}"
            )
        entries = _karpathy_entries(data, splits, file)
        name = "+".join(splits)
    elif isinstance(data, list):
        if split is not None:
            raise ValueError(
                f"split: {file} is an ALBEF per-split list (the file is the split); got "
                f"split={split!r}, pass None"
            )
        entries = _albef_entries(data, file)
        name = os.path.splitext(os.path.basename(file))[0]
    else:
        raise ValueError(
            f"{file}: expected a Karpathy dict with 'images' or an ALBEF list of "
            f"{{image, caption}}, got {type(data).__name__}"
        )

    skips = SkipLog()
    order: dict[str, int] = {}  # key → position in ``grouped``
    grouped: list[tuple[str, str, list[str]]] = []  # (path, key, captions)
    for rel, key, caps in entries:
        path = rel if os.path.isabs(rel) else os.path.join(root, rel)
        if check_files and not os.path.exists(path):
            skips.add("missing image", rel)
            continue
        caps = [caps] if isinstance(caps, str) else list(caps)
        clean = [str(c).strip() for c in caps]
        if any(not c for c in clean):
            skips.add("empty caption", rel)
        clean = [c for c in clean if c]
        if key not in order:
            order[key] = len(grouped)
            grouped.append((path, key, []))
        elif grouped[order[key]][0] != path:
            raise ValueError(
                f"{file}: image id {key!r} names two files: {grouped[order[key]][0]} and {path}"
            )
        grouped[order[key]][2].extend(clean)
    images = [
        RetrievalImage(i, path, tuple(caps), key)
        for i, (path, key, caps) in enumerate(g for g in grouped if g[2])
    ]
    for path, _, caps in grouped:
        if not caps:
            skips.add("no caption", os.path.relpath(path, root))
    if not images:
        raise ValueError(
            f"{file}: no usable image in split {name!r} (skipped: {skips.summary()}; "
            f"image_root={root})"
        )
    return RetrievalSplit(file, name, images, skips)
