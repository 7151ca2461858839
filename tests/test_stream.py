"""``wds:`` streams (semmim.data.stream): the shared skip path, the held-out shard, shards over
ranks and workers, resampling, resume by samples taken, and a training run (CPU, tiny)."""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
from fault_cases_data import CASES, png_bytes, run_case, shard
from run_helpers import small_run

from semmim import from_preset
from semmim.checkpoint import load_checkpoint
from semmim.data import Collator, DataError, SkipLog, StreamBatches, StreamDataset, open_data
from semmim.tokenizer import load_tokenizer
from semmim.train import train
from semmim.transforms import TrainTransform

pytest.importorskip("webdataset")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread (conftest's ``one_thread``) for every test here."""


def _shards(root, n_shards: int, per_shard: int, prefix: str = "s") -> str:
    """``n_shards`` shards of ``per_shard`` good samples, captions ``"shard S sample I"``."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        samples = {
            f"{i:04d}": {
                "png": png_bytes((s * 20 % 256, i * 7 % 256, 90), (16, 16)),
                "txt": f"shard {s} sample {i}".encode(),
            }
            for i in range(per_shard)
        }
        shard(root / f"{prefix}-{s:03d}.tar", samples)
    return f"{root}/{prefix}-{{000..{n_shards - 1:03d}}}.tar"


def _batches(source, batch_size=4, workers=0, rank=0, world=1, resampled=False, seed=0):
    dataset = StreamDataset(
        source.shards, TrainTransform(16), batch_size, seed, rank, world, resampled
    )
    return StreamBatches(dataset, Collator(load_tokenizer(), 16), workers, seed)


def _take_epoch(stream: StreamBatches, epoch: int, limit: int | None = None) -> list[tuple]:
    """Batches until ``epoch`` is finished (or ``limit`` batches): the positions taken in it."""
    got = []
    n = 0
    while stream.epoch <= epoch and (limit is None or n < limit):
        got += [p for p in stream.next()["positions"] if p[0] == epoch]
        n += 1
    return got


# ------------------------------------------------------------ one skip path with the map-style
WDS_CASES = [c for c in CASES if c.name.startswith("wds")]


@pytest.mark.parametrize("case", WDS_CASES, ids=[c.name for c in WDS_CASES])
def test_stream_skips_and_pairs_equal_the_map_style_reading(case, tmp_path):
    """The wds fault cases (bad UTF-8, cut shards, a FIFO shard, an oversized caption) give the
    same skip counts and the same decodable pairs streamed as listed (wds-map:)."""
    for sub in ("map", "stream"):
        (tmp_path / sub).mkdir()
    run_case(case, tmp_path / "map")  # the map-style reading is as specified
    spec = case.build(tmp_path / "stream")
    assert spec.startswith("wds-map:")
    listed = open_data(spec, 0)
    listed_check = listed.check()
    stream = open_data("wds:" + spec[len("wds-map:") :], 0)
    assert stream.streaming and not stream.train
    decoded = stream.check()
    assert dict(stream.skips.counts) == case.skips == dict(listed.skips.counts)
    assert decoded["train"] == listed_check["train"]
    assert decoded["train"][0] == case.pairs


def test_stream_training_items_count_listing_and_decode_skips(tmp_path):
    """In training the skips travel in the batches (``bad``), as the map-style loader's do."""
    shard(
        tmp_path / "a-0.tar",
        {
            "ok": {"png": png_bytes(), "txt": b"fine"},
            "nocap": {"png": png_bytes()},
            "corrupt": {"jpg": b"not a jpeg", "txt": b"broken image"},
            "bad": {"png": png_bytes(), "txt": b"\xff\xfe"},
        },
    )
    os.mkfifo(tmp_path / "a-1.tar")
    source = open_data(f"wds:{tmp_path}/a-{{0..1}}.tar", 0)
    batch = _batches(source, batch_size=4).next()
    skips = SkipLog()
    for key, reason in batch["bad"]:
        skips.add(reason, key)
    assert skips.counts == {
        "missing caption": 1,
        "unreadable image (UnidentifiedImageError)": 1,
        "caption not valid UTF-8": 1,
        "shard is not a regular file (a FIFO)": 1,
    }
    assert batch["captions"] == ["fine"] and batch["image_ids"].shape == (1,)


# ---------------------------------------------------------------------------- held-out shard
def test_held_out_split_is_a_whole_shard_chosen_by_the_split_seed(tmp_path):
    spec = "wds:" + _shards(tmp_path, 5, 6)
    source = open_data(spec, 4)
    held = os.path.basename(source.held_out_shard)
    assert len(source.shards) == 4 and source.held_out_shard not in source.shards
    assert [r.key for r in source.val] == [f"{held}/{i:04d}" for i in range(4)]
    assert (
        "held-out shard" in source.describe() and "stream of 4 training shards" in source.describe()
    )
    # fixed by the split seed (not the training seed); a fraction takes up to max_val pairs
    assert open_data(spec, 4).held_out_shard == source.held_out_shard
    assert len(open_data(spec, 0.5, max_val=3).val) == 3
    moved = {open_data(spec, 1, split_seed=k).held_out_shard for k in range(8)}
    assert len(moved) > 1
    # no held-out shard: every shard trains
    assert len(open_data(spec, 0).shards) == 5 and open_data(spec, 0).val == []
    # the training stream never reads the held-out shard
    stream = _batches(source, batch_size=6)
    captions = {c for _ in range(4) for c in stream.next()["captions"]}
    stream.close()
    assert len(captions) == 24
    assert not any(c.startswith(f"shard {int(held[2:5])} ") for c in captions)
    one = "wds:" + _shards(tmp_path / "one", 1, 3)
    with pytest.raises(DataError, match="holds out a whole shard.*--val-size 0"):
        open_data(one, 0.1)
    with pytest.raises(DataError, match="cannot be carved from a stream"):
        source.carve_validation(2, 0)


# ------------------------------------------------------------------ shards, ranks, workers
def test_shards_split_over_ranks_and_workers_each_sample_once_per_epoch(tmp_path):
    source = open_data("wds:" + _shards(tmp_path, 6, 5), 0)
    every = {(s, i) for s in range(6) for i in range(5)}
    seen: Counter = Counter()
    for rank in range(2):
        stream = _batches(source, batch_size=3, workers=2, rank=rank, world=2)
        order = stream.dataset.epoch_slots(0)
        for _, slot, offset in _take_epoch(stream, 0):
            seen[(int(os.path.basename(source.shards[order[slot]])[2:5]), offset)] += 1
        stream.close()
    assert set(seen) == every and set(seen.values()) == {1}  # 2 ranks x 2 workers, disjoint
    # the order of shards changes per epoch and is the same on every rank
    a = StreamDataset(source.shards, None, 3, 0, 0, 2)
    assert a.epoch_slots(0) != a.epoch_slots(1) or a.epoch_slots(1) != a.epoch_slots(2)
    b = StreamDataset(source.shards, None, 3, 0, 1, 2)
    assert not set(a.epoch_slots(0)) & set(b.epoch_slots(0))
    with pytest.raises(DataError, match="at least one shard per process"):
        StreamDataset(source.shards[:1], None, 3, 0, 0, 2)


def test_resampled_epochs_draw_shards_with_replacement(tmp_path):
    source = open_data("wds:" + _shards(tmp_path, 8, 2), 0)
    ds = StreamDataset(source.shards, None, 2, 0, 0, 1, resampled=True)
    draws = [ds.epoch_slots(e) for e in range(6)]
    assert all(len(d) == 8 and all(0 <= i < 8 for i in d) for d in draws)
    assert any(len(set(d)) < 8 for d in draws)  # with replacement
    assert draws == [ds.epoch_slots(e) for e in range(6)]  # a function of (seed, epoch)
    stream = _batches(source, batch_size=4, resampled=True)
    assert len(_take_epoch(stream, 0)) == 16  # an epoch: as many shard reads as one pass


# ---------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_takes_every_sample_of_the_epoch_once(tmp_path, workers):
    """Interrupt after 7 batches, resume from the saved position: over the epoch no sample is
    repeated or missed (the order after the resume point may differ)."""
    source = open_data("wds:" + _shards(tmp_path, 5, 9), 0)
    every = {(e, s, o) for e in (0,) for s in range(5) for o in range(9)}
    straight = _batches(source, batch_size=4, workers=workers)
    assert sorted(_take_epoch(straight, 0)) == sorted(every)
    straight.close()

    first = _batches(source, batch_size=4, workers=workers)
    before = _take_epoch(first, 0, limit=7)
    state = first.state()
    first.close()  # the batches the workers had prefetched are lost with them
    assert len(before) == 28
    second = _batches(source, batch_size=4, workers=workers)
    second.load(state)
    after = _take_epoch(second, 0)
    second.close()
    taken = Counter(before + after)
    repeated = [p for p, n in taken.items() if n > 1]
    missed = every - set(taken)
    assert (repeated, missed) == ([], set())
    # a shard finished before the checkpoint is not reopened: the state names it done
    assert state["epoch"] == 0 and (state["done"].get(0) or state["taken"][0])


def test_missing_webdataset_names_the_extra(tmp_path, monkeypatch):
    spec = "wds:" + _shards(tmp_path, 2, 1)
    monkeypatch.setitem(sys.modules, "webdataset", None)
    with pytest.raises(DataError, match=r"pip install 'semmim\[wds\]'"):
        open_data(spec, 0)


def test_pipe_and_file_url_shards(tmp_path):
    pattern = _shards(tmp_path, 2, 3)
    path0, path1 = (pattern.replace("{000..001}", f"{i:03d}") for i in range(2))
    for spec in (f"wds:pipe:cat {path0}::file://{path1}",):
        source = open_data(spec, 0)
        assert source.shards == [f"pipe:cat {path0}", f"file://{path1}"]
        ok, tried = source.check()["train"]
        assert (ok, tried) == (6, 6)
    broken = open_data(f"wds:pipe:cat {tmp_path}/missing.tar::{path0}", 0)
    assert broken.check()["train"] == (3, 3)
    assert broken.skips.counts == {"unreadable shard (OSError)": 1}  # cat's exit status
    assert open_data(f"wds:pipe:cat {path0}::{path1}", 1).held_out_shard in (
        f"pipe:cat {path0}",
        path1,
    )


# ------------------------------------------------------------------------ training on a stream
def test_training_on_a_stream_resumes_and_evaluates_on_the_held_out_shard(tmp_path):
    """A run on a stream stops at step 3 (2 loader workers) and resumes to 6 (in-process
    loading): the checkpoint's position counts the pairs taken; the end evaluates the shard."""
    spec = "wds:" + _shards(tmp_path / "data", 4, 10)
    cfg = from_preset("tiny")

    def run(**kw):
        return small_run(tmp_path / "run", data=spec, steps=6, val_size=8, **kw)

    def pairs_taken() -> int:
        position = load_checkpoint(str(tmp_path / "run"))["data_stream"][0]
        taken = sum(len(v) for t in position["taken"].values() for v in t.values())
        return taken + 10 * sum(len(slots) for slots in position["done"].values())

    first = train(cfg, run(stop_at=3, num_workers=2))
    assert first["step"] == 3 and first["train_pairs"] is None
    assert pairs_taken() == 3 * 4  # three batches of four, by position
    second = train(cfg, run(eval_at_end=True, eval_rerank_k=2), resume=True)
    assert second["step"] == 6 and second["eval"]["n_images"] == 8
    assert pairs_taken() == 6 * 4
    with pytest.raises(DataError, match="give --steps"):
        train(cfg, small_run(tmp_path / "r2", data=spec, steps=0, epochs=1, val_size=8))
    with pytest.raises(DataError, match="not a wds: stream"):
        train(cfg, small_run(tmp_path / "r3", data="synthetic:16:4", steps=1, data_resampled=True))


def test_http_shards_stream(tmp_path):
    """Shards served over HTTP (a local server; webdataset opens URLs with curl)."""
    import functools
    import shutil
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    if shutil.which("curl") is None:
        pytest.skip("webdataset opens http(s) URLs with curl, which is not installed")
    _shards(tmp_path, 3, 4)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/s-{{000..002}}.tar"
        source = open_data(f"wds:{url}", 2)
        assert len(source.shards) == 2 and len(source.val) == 2
        assert source.val[0].key.startswith(os.path.basename(source.held_out_shard) + "/")
        assert source.check()["train"] == (8, 8)
        batch = _batches(source, batch_size=8).next()
        assert len(batch["captions"]) == 8 and not batch["bad"]
    finally:
        server.shutdown()
