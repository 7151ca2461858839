"""An opened ``--data`` spec (:class:`DataSource`): its splits, summary and decode checks.

:func:`semmim.data.specs.open_data` makes one from a spec."""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from semmim.data.images import decode_failure
from semmim.data.records import DEFAULT_SPLIT_SEED, DataError, Record, SkipLog, split_records


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
    # A stream (semmim.data.stream.StreamSource) has no list of training records.
    streaming = False

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

    def listing(self) -> dict[str, Any] | None:
        """What a run reads, for the resume check: the pair counts of both splits and a digest
        of every (image key, caption) in order. Two openings of the same data give the same
        listing; one that lists other pairs (a decoder missing now, files added or removed, a
        caption edited) does not. None for a stream (it has no list)."""
        if self.streaming:
            return None
        h = hashlib.blake2b(digest_size=16)
        for records in (self.train, self.val):
            for r in records:
                for text in (r.key, r.caption):
                    h.update(text.encode("utf-8", "surrogatepass") + b"\0")
            h.update(b"\1")
        return {
            "train_pairs": len(self.train),
            "eval_pairs": len(self.val),
            "eval_split": self.eval_split,
            "digest": h.hexdigest(),
        }

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
            split: decode_images(records, limit, skips, progress, split)
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
            ok, tried = result[split] = decode_images(records, sample, trial, False, split)
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


def decode_images(
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
