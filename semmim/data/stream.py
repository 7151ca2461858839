"""``wds:`` data as a stream: shards read once per epoch by the loader's workers, nothing listed.

Opening a ``wds:`` spec expands its shard names and reads the held-out shard only; training
samples are read, decoded and batched in the DataLoader's workers (:class:`StreamDataset`), so
every process holds the shard names, its shuffle buffer and a few in-flight batches whatever the
dataset's size. What is shared with the map-style loaders: the sample rules and skip reasons
(:func:`semmim.data.wds.shard_samples`), the decode path (:func:`semmim.data.loader.load_pair`),
the :class:`Collator` and the :class:`SkipLog` summary (skips travel in the batches, as decode
failures do).

**Shards per epoch.** Epoch ``e`` orders the training shards by ``torch.randperm`` seeded with
``seed + e`` (the same on every rank); rank ``r`` of ``W`` reads ``order[r::W]`` (truncated so
every rank reads as many shards), and DataLoader worker ``k`` of ``K`` reads slots ``k, k + K,
...`` of its rank's list. With ``resampled`` each epoch draws ``n // W`` shards per rank with
replacement (``torch.randint``, the same seed rule) instead: an epoch is as many shard reads as
one pass, so epochs are defined by the samples seen. A worker shuffles samples through a buffer
of :data:`SHUFFLE_BUFFER` samples (undecoded) and cuts batches; the stream does not end (the
run's length is ``--steps``).

**Resume.** Each item carries its position (epoch, slot, offset in the shard) and each shard read
ends with its sample count; the main process (:class:`StreamPosition`) records the positions of
the batches the loop took. A checkpoint saves them; on resume the workers skip finished shards
without opening them and, in partly read shards, the samples already taken. Within every epoch
each sample is therefore trained on exactly once across an interruption: none repeated, none
missed (tested). What is not kept is the order: batches after the resume point mix the remaining
samples differently than an uninterrupted run would (the shuffle buffers restart), so losses
after a resume are not bit-identical to an uninterrupted run's (they are on map-style data).

**Held-out split.** A stream's held-out split is a whole shard, the one whose name ranks first by
BLAKE2b of ``"{split_seed}:{name}"``: its first ``val_size`` pairs (a count) or ``max_val`` pairs
(a fraction) are read when the spec is opened and evaluated as map-style records; the training
stream never reads that shard. A stream with one shard has no held-out split (``val_size 0``).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from semmim.data.images import decode_failure
from semmim.data.loader import image_id, load_pair, stop_workers, worker_init
from semmim.data.records import DataError, Record, SkipLog
from semmim.data.source import DataSource, decode_images
from semmim.data.wds import ShardSample, shard_name, shard_samples, shard_urls
from semmim.transforms import sample_rng

# Samples (undecoded: bytes of one image and a caption each) a worker shuffles among.
SHUFFLE_BUFFER = 1000


@dataclass
class StreamSource(DataSource):
    """An opened ``wds:`` spec: the training shards (read by the loader, never listed) and the
    held-out pairs read from the held-out shard. ``train`` is empty: there is no list."""

    shards: list[str] = field(default_factory=list)
    held_out_shard: str = ""
    streaming = True

    def describe(self) -> str:
        held = (
            f"held-out shard {shard_name(self.held_out_shard)}: {len(self.val)} pairs"
            if self.held_out_shard
            else "no held-out shard"
        )
        return (
            f"{self.spec}: stream of {len(self.shards)} training shards ({held}), split seed "
            f"{self.split_seed}; {self.skips.describe('skipped reading the held-out shard')}"
        )

    def carve_validation(self, size: float, seed: int) -> DataSource:
        raise DataError(
            f"{self.spec}: a validation split cannot be carved from a stream; evaluate on its "
            "held-out shard, or read the data map-style (wds-map:)"
        )

    def first_records(self, n: int) -> tuple[list[Record], int]:
        """The first ``n`` usable records of the training shards (in shard order) and how many
        samples were read to find them (at most ``4 * n``: the check of a sample is bounded)."""
        records, read = [], 0
        for url in self.shards:
            for s in shard_samples(url):
                read += s.offset is not None
                if s.record is not None:
                    records.append(s.record)
                if len(records) >= n or read >= 4 * n:
                    return records, read
        return records, read

    def verify(self, sample: int = 16, held_out: bool = True) -> dict[str, tuple[int, int]]:
        """:meth:`DataSource.verify` on the first ``sample`` usable training pairs of the stream
        and on the held-out pairs; :class:`DataError` also when none of the first samples read
        is usable."""
        records, read = self.first_records(sample)
        if not records:
            raise DataError(
                f"data {self.spec!r}: none of the first {read} samples of the training shards "
                f"is usable; check them with `semmim data {self.spec} --check`"
            )
        trial = DataSource(self.spec, records, self.val, eval_split=self.eval_split)
        return trial.verify(sample, held_out)

    def check(
        self, limit: int | None = None, skips: SkipLog | None = None, progress: bool = False
    ) -> dict[str, tuple[int, int]]:
        """Read every training shard (or the first ``limit`` samples) and decode every image;
        the held-out pairs as :meth:`DataSource.check` does. Skips counted in ``skips``."""
        from tqdm.auto import tqdm

        skips = self.skips if skips is None else skips
        ok = tried = 0
        with tqdm(desc="decode train (stream)", unit="pair", disable=not progress) as bar:
            for url in self.shards:
                for s in shard_samples(url):
                    if s.record is None:
                        skips.add(s.reason or "", s.name, s.detail)
                        continue
                    reason = decode_failure(s.record.image)
                    tried += 1
                    ok += reason is None
                    if reason:
                        skips.add(reason, s.name)
                    bar.update(1)
                    if limit is not None and tried >= limit:
                        break
                if limit is not None and tried >= limit:
                    break
        held = decode_images(self.val, limit, skips, progress, "held-out")
        return {"train": (ok, tried), "held-out": held}


def open_stream(
    spec: str, pattern: str, val_size: float, split_seed: int, max_val: int
) -> StreamSource:
    """Open ``wds:PATTERN`` as a stream (see the module docstring for the held-out shard)."""
    urls = shard_urls(pattern)
    if len(set(urls)) != len(urls):
        raise DataError(f"{spec}: a shard is named twice in {pattern!r}")
    skips = SkipLog()
    held, val = "", []
    if val_size > 0:
        if len(urls) < 2:
            raise DataError(
                f"{spec}: a stream holds out a whole shard and this one has {len(urls)}: give "
                "--val-size 0 (no held-out evaluation), more shards, or read it map-style "
                f"(wds-map:{pattern})"
            )

        def rank(url: str) -> bytes:
            text = f"{split_seed}:{shard_name(url)}"
            return hashlib.blake2b(text.encode(), digest_size=8).digest()

        held = min(urls, key=rank)
        n_val = int(val_size) if val_size >= 1 else max_val
        for s in shard_samples(held):
            if s.record is None:
                skips.add(s.reason or "", s.name, s.detail)
            else:
                val.append(s.record)
            if len(val) >= n_val:
                break
        if not val:
            raise DataError(
                f"{spec}: the held-out shard {held} has no usable pairs (skipped: "
                f"{skips.summary()}); give --val-size 0 or another --split-seed"
            )
    return StreamSource(
        spec,
        [],
        val,
        skips=skips,
        split_seed=split_seed,
        shards=[u for u in urls if u != held],
        held_out_shard=held,
    )


# ------------------------------------------------------------------------------- training stream
class StreamPosition:
    """Which samples of the stream the loop has taken, per epoch: the finished shard slots, the
    offsets taken in the others and each read slot's sample count. Plain data (checkpointed)."""

    def __init__(self, slots_per_epoch: int) -> None:
        self.slots_per_epoch = slots_per_epoch
        self.epoch = 0  # the first epoch with slots not finished
        self.done: dict[int, set[int]] = {}
        self.taken: dict[int, dict[int, set[int]]] = {}
        self.count: dict[int, dict[int, int]] = {}

    def is_done(self, epoch: int, slot: int) -> bool:
        return epoch < self.epoch or slot in self.done.get(epoch, ())

    def taken_in(self, epoch: int, slot: int) -> set[int]:
        return self.taken.get(epoch, {}).get(slot, set())

    def update(self, positions: list[tuple[int, int, int]], ends: list[tuple[int, int, int]]):
        """Record the positions of a taken batch and the sample counts of finished reads."""
        touched = set()
        for epoch, slot, offset in positions:
            self.taken.setdefault(epoch, {}).setdefault(slot, set()).add(offset)
            touched.add((epoch, slot))
        for epoch, slot, n in ends:
            self.count.setdefault(epoch, {})[slot] = n
            touched.add((epoch, slot))
        for epoch, slot in touched:
            n = self.count.get(epoch, {}).get(slot)
            if n is not None and len(self.taken_in(epoch, slot)) >= n:
                self.done.setdefault(epoch, set()).add(slot)
                self.taken.get(epoch, {}).pop(slot, None)
                self.count[epoch].pop(slot)
        while len(self.done.get(self.epoch, ())) >= self.slots_per_epoch:
            for table in (self.done, self.taken, self.count):
                table.pop(self.epoch, None)
            self.epoch += 1

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "done": {e: sorted(s) for e, s in self.done.items()},
            "taken": {e: {k: sorted(v) for k, v in t.items()} for e, t in self.taken.items()},
            "count": {e: dict(c) for e, c in self.count.items()},
        }

    def load(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.done = {int(e): set(s) for e, s in state["done"].items()}
        self.taken = {
            int(e): {int(k): set(v) for k, v in t.items()} for e, t in state["taken"].items()
        }
        self.count = {int(e): {int(k): n for k, n in c.items()} for e, c in state["count"].items()}


class StreamDataset(torch.utils.data.IterableDataset):
    """The training batches of one rank: lists of items (``load_pair``'s, plus ``pos`` and
    ``image_id``; skips as ``{"bad", "key"}`` items) and ``{"end": (epoch, slot, n)}`` markers.

    Set :attr:`position` (a :class:`StreamPosition`) before iterating to resume from it.
    """

    def __init__(
        self,
        shards: list[str],
        transform,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        resampled: bool = False,
        buffer: int = SHUFFLE_BUFFER,
        alpha: bool = False,
    ) -> None:
        self.shards, self.transform, self.batch_size = list(shards), transform, batch_size
        self.alpha = alpha  # items carry their image's alpha channel (see load_pair)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.resampled, self.buffer = resampled, buffer
        self.slots_per_epoch = len(self.shards) // world_size
        if self.slots_per_epoch == 0:
            raise DataError(
                f"{len(self.shards)} training shards cannot be split over {world_size} "
                "processes: give at least one shard per process"
            )
        self.position = StreamPosition(self.slots_per_epoch)

    def epoch_slots(self, epoch: int) -> list[int]:
        """The shard indices this rank reads in ``epoch``, in slot order."""
        n, world = len(self.shards), self.world_size
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = (
            torch.randint(n, (n,), generator=g)
            if self.resampled
            else torch.randperm(n, generator=g)
        )
        return order[self.rank :: world][: self.slots_per_epoch].tolist()

    def _reads(self, worker: int, workers: int) -> Iterator[tuple[str, Any, ShardSample | None]]:
        """This worker's reads, in order: ``("sample", (epoch, slot, offset), s)`` for each
        sample not taken yet, ``("shard", None, s)`` for a problem of a whole shard and
        ``("end", (epoch, slot, n), None)`` when a shard read of ``n`` samples ends."""
        pos = self.position
        for epoch in itertools.count(pos.epoch):
            slots = self.epoch_slots(epoch)
            for slot in range(worker, len(slots), workers):
                if pos.is_done(epoch, slot):
                    continue  # finished before the checkpoint: not even opened
                taken, n = pos.taken_in(epoch, slot), 0
                for s in shard_samples(self.shards[slots[slot]]):
                    if s.offset is None:
                        yield "shard", None, s
                        continue
                    n = s.offset + 1
                    if s.offset not in taken:
                        yield "sample", (epoch, slot, s.offset), s
                yield "end", (epoch, slot, n), None

    def _item(self, where: tuple[int, int, int], s: ShardSample) -> dict[str, Any]:
        epoch, slot, offset = where
        if s.record is None:
            return {"bad": s.reason, "key": s.name, "pos": where}
        rng = sample_rng(self.seed, epoch, slot << 32 | offset)
        item = load_pair(s.record, self.transform, rng, offset, cache=False, alpha=self.alpha)
        item["pos"] = where
        if "bad" not in item:
            item["image_id"] = image_id(s.record.key)
        return item

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # Seeded by where the stream starts: a resumed run shuffles reproducibly too.
        start = repr(sorted(self.position.state().items()))
        rng = random.Random(f"{self.seed}:{self.rank}:{worker}:{workers}:{start}")
        buffer: list[tuple[tuple[int, int, int], ShardSample]] = []
        batch: list[dict[str, Any]] = []

        def take(item: dict[str, Any]) -> list[dict[str, Any]] | None:
            """Add ``item``; the batch when it is full."""
            nonlocal batch
            batch.append(item)
            if sum("pos" in it for it in batch) < self.batch_size:
                return None
            full, batch = batch, []
            return full

        def pop() -> dict[str, Any]:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            return self._item(*buffer.pop())

        for kind, where, s in self._reads(worker, workers):
            if kind == "end":
                batch.append({"end": where})
                continue
            if kind == "shard":  # counted like a bad sample, in the batch's skips (once: SkipLog)
                batch.append({"bad": s.reason, "key": s.name})
                full = None
            else:
                # The buffer is emptied at each epoch's end: an epoch's samples are taken
                # before the next epoch's (else its last ones would linger for many batches).
                while buffer and buffer[0][0][0] != where[0]:
                    if full := take(pop()):
                        yield full
                buffer.append((where, s))
                full = take(pop()) if len(buffer) >= self.buffer else None
            if full:
                yield full


class StreamCollate:
    """Wraps a :class:`Collator` for stream batches: adds ``image_ids`` (from the items' keys),
    ``positions`` and ``ends`` (what :class:`StreamPosition` records)."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        samples = [it for it in items if "end" not in it]
        batch = self.collate(samples)
        good = [it for it in samples if "bad" not in it]
        if good:
            batch["image_ids"] = torch.tensor([it["image_id"] for it in good])
        batch["positions"] = [it["pos"] for it in samples if "pos" in it]
        batch["ends"] = [it["end"] for it in items if "end" in it]
        return batch


class StreamBatches:
    """The stream's batches for the loop (the interface of the map-style ``BatchStream``:
    ``next``, ``close``, ``epoch``, ``batch_in_epoch``) and its checkpointed position."""

    def __init__(
        self,
        dataset: StreamDataset,
        collate: Callable,
        num_workers: int,
        seed: int = 0,
        start_context: Callable[[], Any] = contextlib.nullcontext,
    ) -> None:
        self.dataset, self.start_context = dataset, start_context
        self.position = StreamPosition(dataset.slots_per_epoch)
        # A worker with no slot would never yield, and the loader waits for it in turn.
        workers = min(num_workers, dataset.slots_per_epoch)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            collate_fn=StreamCollate(collate),
            num_workers=workers,
            prefetch_factor=2 if workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=worker_init if workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
        )
        self.batch_in_epoch = 0
        self._it = None

    @property
    def epoch(self) -> int:
        return self.position.epoch

    def next(self) -> dict[str, Any]:
        if self._it is None:
            self.dataset.position = StreamPosition(self.dataset.slots_per_epoch)
            self.dataset.position.load(self.position.state())
            with self.start_context():  # workers are forked here
                self._it = iter(self.loader)
        batch = next(self._it)
        self.position.update(batch["positions"], batch["ends"])
        self.batch_in_epoch += 1
        return batch

    def close(self) -> None:
        """Stop the loader's worker processes."""
        it, self._it = self._it, None
        stop_workers(it)

    def state(self) -> dict[str, Any]:
        return self.position.state()

    def load(self, state: dict[str, Any]) -> None:
        self.position.load(state)


def open_stream_batches(
    source: StreamSource,
    tcfg,
    info,
    transform,
    collate: Callable,
    start_context: Callable[[], Any] = contextlib.nullcontext,
    alpha: bool = False,
) -> StreamBatches:
    """The training stream of this rank (``info.rank`` of ``info.world_size``) for a run's
    ``tcfg`` (a :class:`semmim.run_config.TrainConfig`): batches of ``tcfg.batch_size``, shards
    resampled under ``tcfg.data_resampled``. A stream has no length: ``tcfg.steps`` is required."""
    if not tcfg.steps:
        raise DataError(
            f"data {source.spec!r} is a stream of unknown length: give --steps N (or read small "
            "data map-style as wds-map:, where --epochs works)"
        )
    dataset = StreamDataset(
        source.shards,
        transform,
        tcfg.batch_size,
        tcfg.seed,
        info.rank,
        info.world_size,
        tcfg.data_resampled,
        alpha=alpha,
    )
    return StreamBatches(dataset, collate, tcfg.num_workers, tcfg.seed, start_context)
