"""Listers of local image-caption data: ``folder:``, ``json:`` (ALBEF list or COCO captions) and
``csv:`` / ``tsv:`` tables, plus the JSON helpers the downstream loaders reuse
(:func:`read_json_file`, :func:`texts_of`, :func:`int_of`, :func:`json_type`)."""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from semmim.data.records import (
    BAD_UTF8,
    IMAGE_EXTS,
    DataError,
    Record,
    SkipLog,
    caption_prefix,
    decode_caption,
)
from semmim.paths import NotRegularFile, file_problem, open_regular

IMAGE_COLUMNS = ("image", "image_path", "filepath", "file", "filename", "path")
CAPTION_COLUMNS = ("caption", "text", "title", "sentence")
LABEL_COLUMNS = ("label", "class", "category")


def list_folder(
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


def list_json(path: str, skips: SkipLog, ignored: Counter[str]) -> list[Record]:
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


def list_table(path: str, delimiter: str, skips: SkipLog) -> tuple[list[Record], list[str] | None]:
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
