"""Map-style dataset, collate, the resumable batch sampler and the DataLoader factory."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from semmim.data.images import DECODE_ERRORS, image_error_reason, load_image
from semmim.data.records import Record
from semmim.transforms import sample_rng


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset over records. Index with an int or with ``(epoch, index)``.

    Augmentation randomness comes from ``sample_rng(seed, epoch, index)`` only, so it does not depend on
    worker count, worker assignment, or whether the run was resumed. A sample whose image cannot be
    loaded comes back as ``{"bad": reason, "key": key}`` (reason from :func:`image_error_reason`);
    :class:`Collator` drops it. ``alpha``: items of images with an alpha channel also carry it,
    transformed with the image (``"alpha"`` (S, S) in [0, 1]; the transform's ``apply``), for
    the object-coverage diagnostics.
    """

    def __init__(
        self, records: Sequence[Record], transform, seed: int = 0, alpha: bool = False
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.seed = seed
        self.alpha = alpha

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        return load_pair(
            self.records[index],
            self.transform,
            sample_rng(self.seed, epoch, index),
            index,
            alpha=self.alpha,
        )


def load_pair(
    record: Record, transform, rng, index: int, cache: bool = True, alpha: bool = False
) -> dict[str, Any]:
    """One training item: ``{"image": (3,H,W), "caption", "index", "label"}`` from ``record``
    transformed with ``rng``, or ``{"bad": reason, "key"}`` when its image cannot be loaded;
    with ``alpha``, an image's alpha channel too (``"alpha"`` (H,W), see :class:`PairDataset`).

    The one decode path of every training dataset (map-style and streamed); ``cache`` False for
    images seen once (a stream) so they do not fill the decoded-image cache.
    """
    try:
        image = load_image(record.image, cache)
        if alpha:
            tensor, caption, mask = transform.apply(image, record.caption, rng, True)
        else:
            (tensor, caption), mask = transform(image, record.caption, rng), None
    except DECODE_ERRORS as err:
        return {"bad": image_error_reason(err), "key": record.key}
    item = {"image": tensor, "caption": caption, "index": index, "label": record.label}
    if mask is not None:
        item["alpha"] = mask
    return item


def image_id(key: str) -> int:
    """A record key's image id: the first 63 bits of its BLAKE2b-64, so the same image has the
    same id in every process, rank and run (the model's ITC queue keeps ids across batches)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


class Collator:
    """Stacks images, tokenises captions (padding to the longest, truncating at ``max_len``).

    Returns ``images (B,3,H,W)``, ``input_ids (B,T)``, ``attention_mask (B,T)``, ``index (B,)``,
    ``label (B,)``, ``captions`` and ``bad`` — a list of (key, reason) for dropped samples; given
    the dataset's ``records``, also ``image_ids (B,)`` (:func:`image_id` of each pair's key: the
    model never treats two pairs of one image as each other's negatives); ``alpha (B,H,W)``
    when every pair of the batch carries its image's alpha channel (:class:`PairDataset`).
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
        if all("alpha" in it for it in good):
            batch["alpha"] = torch.stack([it["alpha"] for it in good])
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


def worker_init(worker_id: int) -> None:
    """A loader worker's start: one intra-op thread."""
    # Decoding is per-sample work; intra-op threads in every worker would oversubscribe the CPU.
    torch.set_num_threads(1)


def stop_workers(it: Any) -> None:
    """Stop the worker processes of a DataLoader iterator ``it`` (None or a single-process
    iterator: nothing to stop)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


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
        worker_init_fn=worker_init if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )
