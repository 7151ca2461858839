"""``--data`` specs: :func:`open_data` dispatches a spec to its lister (:mod:`semmim.data.listing`,
:mod:`semmim.data.wds`), to a stream (:mod:`semmim.data.stream`) or to the embedded synthetic
scenes, splits off the held-out images and drops what this machine cannot decode."""

from __future__ import annotations

from collections import Counter

from semmim import synthetic
from semmim.data.images import missing_decoder
from semmim.data.listing import list_folder, list_json, list_table
from semmim.data.records import (
    DEFAULT_SPLIT_SEED,
    SYNTHETIC_TRAIN,
    SYNTHETIC_VAL,
    DataError,
    Record,
    SkipLog,
    SyntheticRef,
    log,
    split_records,
)
from semmim.data.source import DataSource
from semmim.data.stream import open_stream
from semmim.data.wds import list_wds


def open_data(
    spec: str | None,
    val_size: float = 0.1,
    split_seed: int = DEFAULT_SPLIT_SEED,
    max_val: int = 1000,
) -> DataSource:
    """Open a ``--data`` spec (``None`` = embedded default) and split off the held-out images.

    Args:
        spec: ``synthetic[:N]``, ``folder:PATH``, ``json:FILE``, ``csv:FILE``, ``tsv:FILE``,
            ``wds:PATTERN`` (a stream: :class:`semmim.data.stream.StreamSource`, held out by
            whole shard), ``wds-map:PATTERN`` or ``None``.
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
            f"data spec must look like KIND:PATH (folder, json, csv, tsv, wds, wds-map) or "
            f"'synthetic[:N]', got {spec!r}"
        )
    skips = SkipLog()
    ignored: Counter[str] = Counter()
    class_names: list[str] | None = None
    if kind == "folder":
        records, class_names = list_folder(arg, skips, ignored)
        template = "a picture of {name}"
    elif kind == "json":
        records = list_json(arg, skips, ignored)
        template = "a photo of a {name}"
    elif kind in ("csv", "tsv"):
        records, class_names = list_table(arg, "," if kind == "csv" else "\t", skips)
        template = "a photo of a {name}"
    elif kind == "wds":
        return open_stream(spec, arg, val_size, split_seed, max_val)
    elif kind == "wds-map":
        records = list_wds(arg, skips)
        template = "a photo of a {name}"
    else:
        raise DataError(
            f"unknown data kind {kind!r} in spec {spec!r}; expected folder, json, csv, "
            f"tsv, wds, wds-map or synthetic"
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
