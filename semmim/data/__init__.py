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
* ``wds:PATTERN`` — webdataset tar shards, streamed (:mod:`semmim.data.stream`: nothing is listed,
  the held-out split is a whole shard, resume takes every sample of an epoch once) through the
  ``webdataset`` library (the ``[wds]`` extra): brace ranges like ``shard-{000..009}.tar``, local
  globs, ``pipe:COMMAND`` and URLs. A sample is the consecutive members sharing a key, one image
  (jpg/jpeg/png/webp) and one ``txt``.
* ``wds-map:PATTERN`` — the same shards read whole when the spec is opened into map-style records
  (every sample's bytes in memory: small data, where the exact resume of map-style data matters).

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

Modules: :mod:`~semmim.data.records` (records, skips, caption bytes, the held-out split),
:mod:`~semmim.data.specs` (:func:`open_data`: spec dispatch), :mod:`~semmim.data.source`
(:class:`DataSource`),
:mod:`~semmim.data.listing` (``folder:`` / ``json:`` / ``csv:`` / ``tsv:``), :mod:`~semmim.data.wds`
(reading shards), :mod:`~semmim.data.stream` (``wds:`` streams), :mod:`~semmim.data.images` (decoding and the image cache), :mod:`~semmim.data.loader`
(dataset, collate, sampler, DataLoader). This package re-exports their public names.
"""

from __future__ import annotations

from semmim.data.images import (
    DECODE_ERRORS,
    MissingDecoder,
    decode_failure,
    image_cache_budget,
    image_error_reason,
    load_image,
    missing_decoder,
    svg_decoder_problem,
)
from semmim.data.listing import (
    CAPTION_COLUMNS,
    IMAGE_COLUMNS,
    LABEL_COLUMNS,
    int_of,
    json_type,
    read_json_file,
    texts_of,
)
from semmim.data.loader import (
    Collator,
    PairDataset,
    ResumableBatchSampler,
    image_id,
    load_pair,
    make_loader,
    stop_workers,
)
from semmim.data.records import (
    BAD_UTF8,
    CAPTION_MAX_BYTES,
    DEFAULT_SPLIT_SEED,
    IMAGE_EXTS,
    SYNTHETIC_TRAIN,
    SYNTHETIC_VAL,
    DataError,
    ImageRef,
    MemberBytes,
    Record,
    SkipLog,
    SyntheticRef,
    caption_prefix,
    decode_caption,
    split_records,
)
from semmim.data.source import DataSource
from semmim.data.specs import open_data
from semmim.data.stream import StreamBatches, StreamDataset, StreamSource
from semmim.data.wds import (
    WDS_IMAGE_EXTS,
    expand_braces,
)

__all__ = [
    "BAD_UTF8",
    "CAPTION_COLUMNS",
    "CAPTION_MAX_BYTES",
    "Collator",
    "DECODE_ERRORS",
    "DEFAULT_SPLIT_SEED",
    "DataError",
    "DataSource",
    "IMAGE_COLUMNS",
    "IMAGE_EXTS",
    "ImageRef",
    "LABEL_COLUMNS",
    "MemberBytes",
    "MissingDecoder",
    "PairDataset",
    "Record",
    "ResumableBatchSampler",
    "SYNTHETIC_TRAIN",
    "SYNTHETIC_VAL",
    "SkipLog",
    "StreamBatches",
    "StreamDataset",
    "StreamSource",
    "SyntheticRef",
    "WDS_IMAGE_EXTS",
    "caption_prefix",
    "decode_caption",
    "decode_failure",
    "expand_braces",
    "image_cache_budget",
    "image_error_reason",
    "image_id",
    "int_of",
    "json_type",
    "load_image",
    "load_pair",
    "make_loader",
    "stop_workers",
    "missing_decoder",
    "open_data",
    "read_json_file",
    "split_records",
    "svg_decoder_problem",
    "texts_of",
]
