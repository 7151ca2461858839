"""An opened ``--data`` spec (:class:`DataSource`) and :func:`open_data`, which dispatches a
spec to its lister (:mod:`semmim.data.listing`, :mod:`semmim.data.wds`) or to the embedded
synthetic scenes, splits off the held-out images and drops what this machine cannot decode."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from semmim import synthetic
from semmim.data.images import decode_failure, missing_decoder
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
from semmim.data.wds import list_wds


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
        records, class_names = list_folder(arg, skips, ignored)
        template = "a picture of {name}"
    elif kind == "json":
        records = list_json(arg, skips, ignored)
        template = "a photo of a {name}"
    elif kind in ("csv", "tsv"):
        records, class_names = list_table(arg, "," if kind == "csv" else "\t", skips)
        template = "a photo of a {name}"
    elif kind == "wds":
        records = list_wds(arg, skips)
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
