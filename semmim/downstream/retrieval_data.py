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
``image_root`` (default: the JSON file's folder). The file is read by
:func:`semmim.data.read_json_file` and every field is type-checked as ``json:`` data is: images
whose file is missing (or not a regular file), malformed entries and captions that are not
non-empty strings are skipped and counted by reason with the entry named
(:class:`semmim.data.SkipLog`); captions are kept verbatim (whitespace stripped; the WordPiece
tokenizer is uncased). Karpathy split names match in any case.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from semmim.data import DataError, Record, SkipLog, int_of, json_type, read_json_file, texts_of
from semmim.paths import file_problem

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
        """One line: source, split, images, captions and the skips by reason."""
        n_cap = sum(len(im.captions) for im in self.images)
        return (
            f"{self.source} [{self.split}]: {len(self.images)} images, {n_cap} captions, "
            f"{self.skips.describe()}"
        )


# (where, path relative to the image root, image key, [(where, caption)])
_Entry = tuple[str, str, str, list[tuple[str, str]]]


def _karpathy_entries(data: dict, splits: Sequence[str], file: str, skips: SkipLog) -> list[_Entry]:
    """The well-formed entries in ``splits``; malformed ones are skipped and counted."""
    name = os.path.basename(file)
    out = []
    for n, im in enumerate(data["images"]):
        where = f"{name}:images[{n}]"
        if not isinstance(im, dict):
            skips.add(f"entry must be an object, got {json_type(im)}", where)
            continue
        split = im.get("split")
        if "split" not in im:
            skips.add("entry without 'split'", where)
            continue
        if not isinstance(split, str) or split.strip().lower() not in KARPATHY_SPLITS:
            skips.add("unknown split name", where, f"split {split!r}")
            continue
        if split.strip().lower() not in splits:
            continue
        filename, filepath = im.get("filename"), im.get("filepath", "")
        if not isinstance(filename, str) or not filename:
            skips.add(f"'filename' must be a non-empty string, got {json_type(filename)}", where)
            continue
        if not isinstance(filepath, str):
            skips.add(f"'filepath' must be a string, got {json_type(filepath)}", where)
            continue
        rel = os.path.join(filepath, filename)
        id_field = next((f for f in ("cocoid", "imgid") if f in im), None)
        image_id = int_of(im, id_field, where, skips) if id_field else None
        if id_field and image_id is None:
            continue
        sentences = im.get("sentences")
        if not isinstance(sentences, list):
            skips.add(f"'sentences' must be a list, got {json_type(sentences)}", where)
            continue
        caps = []
        for i, sentence in enumerate(sentences):
            at = f"{where}.sentences[{i}]"
            if not isinstance(sentence, dict):
                skips.add(f"sentence must be an object with 'raw', got {json_type(sentence)}", at)
            elif "raw" in sentence:
                caps += texts_of(sentence["raw"], "raw", at, skips, "empty caption", lists=False)
            elif isinstance(sentence.get("tokens"), list) and all(
                isinstance(t, str) for t in sentence["tokens"]
            ):
                caps += texts_of(" ".join(sentence["tokens"]), "tokens", at, skips, "empty caption")
            else:
                skips.add("sentence without 'raw'", at)
        out.append((where, rel, str(image_id) if id_field else rel, caps))
    return out


def _albef_entries(data: list, file: str, skips: SkipLog) -> list[_Entry]:
    name = os.path.basename(file)
    out = []
    for n, entry in enumerate(data):
        where = f"{name}[{n}]"
        if not isinstance(entry, dict):
            skips.add(f"entry must be an object, got {json_type(entry)}", where)
            continue
        image = entry.get("image")
        if not isinstance(image, str) or not image:
            skips.add(f"'image' must be a non-empty string, got {json_type(image)}", where)
            continue
        if "caption" not in entry:
            skips.add("entry without 'caption'", where)
            continue
        key = entry.get("image_id", image)
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            skips.add(f"'image_id' must be a string or an integer, got {json_type(key)}", where)
            continue
        caps = texts_of(entry["caption"], "caption", where, skips, "empty caption")
        out.append((where, image, str(key), caps))
    return out


def load_retrieval_split(
    file: str | os.PathLike,
    split: str | Sequence[str] | None = None,
    image_root: str | os.PathLike | None = None,
    check_files: bool = True,
    skips: SkipLog | None = None,
) -> RetrievalSplit:
    """Read a Karpathy or ALBEF retrieval JSON (see the module docstring).

    Args:
        file: the JSON file.
        split: Karpathy split name(s) to keep: "train", "restval", "val", "test", or several
            (``("train", "restval")``), in any case; required for Karpathy files, must be None
            for ALBEF lists (one file per split).
        image_root: folder the image paths are relative to (default: the file's folder).
        check_files: skip (and count) images whose file is missing or not a regular file.
        skips: where skips are counted (default: a new :class:`semmim.data.SkipLog`); pass one
            log to several calls on one file to count each bad entry once.

    Malformed entries are skipped and counted with the entry named (``dataset.json:images[3]``),
    as ``json:`` data does: a caption that is ``null``, a number or empty; a float or ``null``
    image id; an unknown split name; ``sentences`` that are not objects with ``raw``; the second
    entry of an image already listed (Karpathy), a caption an image already has (ALBEF). Raises
    :class:`semmim.data.DataError` (a ValueError) naming the file and the problem: unreadable,
    truncated, not UTF-8 or not JSON, unknown layout, unknown split, no usable image.
    """
    file = os.fspath(file)
    data = read_json_file(file, "retrieval file")
    root = (
        os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(file))
    )
    skips = skips if skips is not None else SkipLog()
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        splits = (split,) if isinstance(split, str) else tuple(split or ())
        names = [s.strip().lower() if isinstance(s, str) else s for s in splits]
        bad = [s for s in names if s not in KARPATHY_SPLITS]
        if not splits or bad:
            raise DataError(
                f"split: a Karpathy file ({file}) needs split names from {list(KARPATHY_SPLITS)}, "
                f"got {split!r}"
            )
        entries = _karpathy_entries(data, names, file, skips)
        name = "+".join(names)
        merge = False  # one entry per image: a second entry of an image is a mistake
    elif isinstance(data, list):
        if split is not None:
            raise DataError(
                f"split: {file} is an ALBEF per-split list (the file is the split); got "
                f"split={split!r}, pass None"
            )
        entries = _albef_entries(data, file, skips)
        name = os.path.splitext(os.path.basename(file))[0]
        merge = True  # the train files list an image once per caption
    else:
        raise DataError(
            f"{file}: expected a Karpathy dict with 'images' or an ALBEF list of "
            f"{{image, caption}}, got {type(data).__name__}"
        )

    order: dict[str, int] = {}  # key → position in ``grouped``
    grouped: list[tuple[str, str, str, list[str]]] = []  # (where, path, key, captions)
    for where, rel, key, caps in entries:
        path = rel if os.path.isabs(rel) else os.path.join(root, rel)
        problem = file_problem(path, "image") if check_files else None
        if problem:
            skips.add(problem, rel, where)
            continue
        if key in order:
            first_where, first_path, _, kept = grouped[order[key]]
            if first_path != path:
                skips.add("image id already names another file", where, f"{key!r}: {first_path}")
                continue
            if not merge:
                skips.add("image listed twice", where, f"first at {first_where}")
                continue
        else:
            order[key] = len(grouped)
            grouped.append((where, path, key, []))
        kept = grouped[order[key]][3]
        for at, cap in caps:
            if cap in kept:
                skips.add("caption listed twice for one image", at)
            else:
                kept.append(cap)
    images = [
        RetrievalImage(i, path, tuple(caps), key)
        for i, (_, path, key, caps) in enumerate(g for g in grouped if g[3])
    ]
    for where, _, _, caps in grouped:
        if not caps:
            skips.add("no caption", where)
    if not images:
        raise DataError(
            f"{file}: no usable image in split {name!r} (skipped: {skips.summary()}; "
            f"image_root={root})"
        )
    return RetrievalSplit(file, name, images, skips)
