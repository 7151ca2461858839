"""Bad-data fault cases: each builds small files and says what opening and decoding them must give.

Used by ``tests/test_data.py`` (one parametrized test per case) and by the fault-injection suite,
which counts them: ``for case in CASES: run_case(case, tmp_dir)`` returns normally when the fault is
handled as specified (skipped and counted with the expected reason, or a clear :class:`DataError`)
and raises ``AssertionError`` otherwise.

A case is handled when :func:`semmim.data.open_data` (for ``karpathy:`` / ``vqa:`` specs the
fine-tuning loaders :func:`semmim.downstream.tasks.open_pairs` / ``open_vqa``), then
:meth:`DataSource.verify` (what training runs before its first step), then
:meth:`DataSource.check` (``semmim data --check``: every image decoded) give exactly ``skips`` and
``pairs``, or raise a ``DataError`` matching ``error``, within ``CASE_SECONDS`` (a FIFO that is
opened blocks forever: that is a failure, not a hang).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from semmim.data import BAD_UTF8, DataError, image_error_reason, open_data, split_records


@dataclass(frozen=True)
class DataFault:
    """One bad-data case.

    Attributes:
        name: short id.
        build: writes files under the given folder and returns the ``--data`` spec.
        skips: expected skip counts by reason after listing + decoding every image.
        pairs: expected train + held-out pairs (None: not checked).
        keys: skip keys (sample names) that must appear, e.g. the right CSV line numbers.
        error: when set, a regex that the ``DataError`` raised must match instead.
        val_size: held-out size passed to ``open_data``.
    """

    name: str
    build: Callable[[Path], str]
    skips: dict[str, int] = field(default_factory=dict)
    pairs: int | None = None
    keys: tuple[str, ...] = ()
    error: str = ""
    val_size: float = 0


CASE_SECONDS = 60


@contextlib.contextmanager
def deadline(name: str, seconds: int = CASE_SECONDS):
    """AssertionError instead of a hang (SIGALRM; main thread only, else no limit)."""

    def expired(*_):
        raise AssertionError(f"{name}: still running after {seconds} s (blocked on a file?)")

    try:
        old = signal.signal(signal.SIGALRM, expired)
    except ValueError:  # not the main thread
        yield
        return
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _open(spec: str, val_size: float):
    if spec.startswith("karpathy:"):
        from semmim.downstream.tasks import open_pairs

        return open_pairs(spec, val_size, 0)
    if spec.startswith("vqa:"):
        from semmim.downstream.tasks import open_vqa

        return open_vqa(spec, val_size, 0, 3)
    return open_data(spec, val_size)


def run_case(case: DataFault, folder: Path) -> None:
    """Build ``case`` under ``folder`` and assert that it is handled as specified."""
    spec = case.build(folder)
    try:
        with deadline(case.name):
            source = _open(spec, case.val_size)
            source.verify()
            source.check()
    except DataError as err:
        assert case.error, f"{case.name}: unexpected DataError: {err}"
        assert re.search(case.error, str(err)), f"{case.name}: error {str(err)!r} !~ {case.error!r}"
        return
    assert not case.error, f"{case.name}: expected a DataError matching {case.error!r}"
    assert dict(source.skips.counts) == case.skips, (
        f"{case.name}: skips {dict(source.skips.counts)}"
    )
    if case.pairs is not None:
        n = len(source.train) + len(source.val)
        assert n == case.pairs, f"{case.name}: {n} pairs, expected {case.pairs}"
    keys = {k for _, k in source.skips.keys}
    for key in case.keys:
        assert key in keys, f"{case.name}: no skip for {key!r} in {sorted(keys)}"


# ------------------------------------------------------------------------------------ builders
def png_bytes(colour=(10, 200, 10), size=(20, 20), noise: bool = False) -> bytes:
    """A small RGB PNG; ``noise`` makes it incompressible (so a cut .tar.gz is cut inside it)."""
    if noise:
        array = np.random.default_rng(list(colour)).integers(
            0, 256, (size[1], size[0], 3), dtype=np.uint8
        )
        image = Image.fromarray(array)
    else:
        image = Image.new("RGB", size, colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG file that declares ``width`` x ``height`` pixels (over Pillow's bomb limit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def pairs_folder(root: Path, n: int = 3, name: str = "good") -> Path:
    """``n`` good pairs ``{name}{i}.png`` + ``.txt`` under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"{name}{i}.png").write_bytes(png_bytes((20 * i, 100, 50)))
        (root / f"{name}{i}.txt").write_text(f"a good picture number {i}\n")
    return root


def shard(path: Path, samples: dict[str, dict[str, bytes]], mode: str = "w") -> Path:
    """A webdataset shard: members ``{key}.{ext}`` in the given order."""
    with tarfile.open(path, mode) as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _four_samples(noise: bool = False) -> dict[str, dict[str, bytes]]:
    return {
        f"s{i}": {
            "png": png_bytes((50 * i, 10, 10), (48, 48), noise),
            "txt": f"sample {i}".encode(),
        }
        for i in range(4)
    }


def _folder_bad_caption(tmp: Path) -> str:
    root = pairs_folder(tmp / "d")
    (root / "bad.png").write_bytes(png_bytes())
    (root / "bad.txt").write_bytes(b"caf\xe9 au lait\n")  # Latin-1, not UTF-8
    return f"folder:{root}"


def _wds_bad_caption(tmp: Path) -> str:
    samples = _four_samples()
    samples["s3"]["txt"] = b"\xff\xfe not utf-8"
    return f"wds-map:{shard(tmp / 'a.tar', samples)}"


def _csv_bad_caption(tmp: Path) -> str:
    pairs_folder(tmp)
    (tmp / "d.csv").write_bytes(
        b"image,caption\ngood0.png,fine\ngood1.png,na\xefve\ngood2.png,also fine\n"
    )
    return f"csv:{tmp / 'd.csv'}"


def _upper_case(tmp: Path) -> str:
    root = tmp / "d"
    root.mkdir()
    (root / "X.PNG").write_bytes(png_bytes())
    (root / "X.TXT").write_text("upper-case extensions\n")
    (root / "Mixed.Jpg").write_bytes(
        png_bytes()
    )  # content type is sniffed, not taken from the name
    (root / "mixed.txt").write_text("stem differs in case\n")
    (root / "y.png").write_bytes(png_bytes())
    (root / "y.txt").write_text("plain\n")
    return f"folder:{root}"


def _case_conflict(tmp: Path) -> str:
    root = pairs_folder(tmp / "d")
    (root / "a.png").write_bytes(png_bytes())
    (root / "a.txt").write_text("one caption\n")
    (root / "A.txt").write_text("another caption\n")
    return f"folder:{root}"


def _bomb(tmp: Path) -> str:
    root = pairs_folder(tmp / "d")
    (root / "bomb.png").write_bytes(bomb_png())
    (root / "bomb.txt").write_text("a decompression bomb\n")
    return f"folder:{root}"


def _truncated_png(tmp: Path) -> str:
    root = pairs_folder(tmp / "d")
    data = png_bytes(size=(64, 64), noise=True)
    (root / "cut.png").write_bytes(data[: len(data) // 2])
    (root / "cut.txt").write_text("half a picture\n")
    return f"folder:{root}"


def _all_bad(tmp: Path) -> str:
    root = tmp / "d"
    root.mkdir()
    for i in range(4):
        (root / f"b{i}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png at all")
        (root / f"b{i}.txt").write_text(f"broken {i}\n")
    return f"folder:{root}"


def _held_out_bad(tmp: Path) -> str:
    root = pairs_folder(tmp / "d", n=6)
    spec = f"folder:{root}"
    _, val = split_records(open_data(spec, 0).train, 2, seed=0)
    for r in val:  # break exactly the held-out images
        Path(r.image).write_bytes(b"not an image")
    return spec


def _json(entries) -> Callable[[Path], str]:
    def build(tmp: Path) -> str:
        pairs_folder(tmp)
        (tmp / "d.json").write_text(json.dumps(entries))
        return f"json:{tmp / 'd.json'}"

    return build


def _json_bytes(raw: bytes) -> Callable[[Path], str]:
    def build(tmp: Path) -> str:
        (tmp / "d.json").write_bytes(raw)
        return f"json:{tmp / 'd.json'}"

    return build


def _coco_bad(tmp: Path) -> str:
    pairs_folder(tmp)
    coco = {
        "images": [
            {"id": 1, "file_name": "good0.png"},
            {"id": 2, "file_name": 5},
            {"file_name": "good1.png"},
            {"id": 3, "file_name": "good2.png"},
        ],
        "annotations": [
            {"image_id": 1, "caption": "fine"},
            {"image_id": 1, "caption": None},
            {"image_id": 9, "caption": "no such image"},
            {"image_id": 3, "caption": ["not", "a", "string"]},
        ],
    }
    (tmp / "c.json").write_text(json.dumps(coco))
    return f"json:{tmp / 'c.json'}"


def _csv_empty_cells(tmp: Path) -> str:
    pairs_folder(tmp)
    lines = ["image,caption", "good0.png,one", ",two", ",three", "good1.png,four", ",five"]
    (tmp / "d.csv").write_text("\n".join(lines) + "\n")
    return f"csv:{tmp / 'd.csv'}"


def _wds_cut_inside_member(tmp: Path) -> str:
    path = shard(tmp / "a.tar", _four_samples())
    with tarfile.open(path) as tar:
        s2 = tar.getmember("s2.png")
    data = path.read_bytes()
    path.write_bytes(data[: s2.offset_data + s2.size // 2])  # cut in the middle of s2's image
    return f"wds-map:{path}"


def _wds_cut_at_header(tmp: Path) -> str:
    path = shard(tmp / "a.tar", _four_samples())
    with tarfile.open(path) as tar:
        s2 = tar.getmember("s2.png")
    path.write_bytes(path.read_bytes()[: s2.offset])  # cut exactly before s2's header
    return f"wds-map:{path}"


def _wds_gz_cut(tmp: Path) -> str:
    path = shard(tmp / "a.tar.gz", _four_samples(noise=True), mode="w:gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 5 // 8])
    return f"wds-map:{path}"


# ------------------------------------------------- issue 19: inputs that point elsewhere
def _caption_links_outside(tmp: Path) -> str:
    root = pairs_folder(tmp / "d")
    secret = tmp / "secret.txt"  # outside the data folder (think /etc/passwd)
    secret.write_text("root:x:0:0:a line that must never become a caption\n")
    (root / "leak.png").write_bytes(png_bytes())
    (root / "leak.txt").symlink_to(secret)
    (root / "sub").mkdir()
    (root / "sub" / "inner.png").write_bytes(png_bytes())
    (root / "sub" / "inner.txt").symlink_to(root / "good0.txt")  # inside: read as usual
    return f"folder:{root}"


def _fifo_and_device_in_folder(tmp: Path) -> str:
    root = pairs_folder(tmp / "d")
    os.mkfifo(root / "pipe.png")  # an image that is a FIFO: opening it would block
    (root / "pipe.txt").write_text("a pipe\n")
    (root / "capfifo.png").write_bytes(png_bytes())
    os.mkfifo(root / "capfifo.txt")
    (root / "zero.png").symlink_to("/dev/zero")  # a device: reading it never ends
    (root / "zero.txt").write_text("endless zeros\n")
    return f"folder:{root}"


def _long_captions(tmp: Path) -> str:
    root = pairs_folder(tmp / "d")
    (root / "long.png").write_bytes(png_bytes())
    (root / "long.txt").write_bytes(b"x" * 20_000)  # one line over CAPTION_MAX_BYTES
    (root / "tail.png").write_bytes(png_bytes())
    (root / "tail.txt").write_bytes(b"short first line\n" + b"y" * 100_000)  # later lines unused
    return f"folder:{root}"


def _json_special_images(tmp: Path) -> str:
    pairs_folder(tmp)
    os.mkfifo(tmp / "pipe.png")
    entries = [
        {"image": "good0.png", "caption": "fine"},
        {"image": "pipe.png", "caption": "a FIFO"},
        {"image": "/dev/zero", "caption": "a device"},
        {"image": str(tmp), "caption": "a directory"},
    ]
    (tmp / "d.json").write_text(json.dumps(entries))
    return f"json:{tmp / 'd.json'}"


def _csv_special_image(tmp: Path) -> str:
    pairs_folder(tmp)
    os.mkfifo(tmp / "pipe.png")
    (tmp / "d.csv").write_text("image,caption\ngood0.png,fine\npipe.png,a FIFO\n")
    return f"csv:{tmp / 'd.csv'}"


def _json_file_is_fifo(tmp: Path) -> str:
    os.mkfifo(tmp / "d.json")
    return f"json:{tmp / 'd.json'}"


def _wds_fifo_shard_and_long_text(tmp: Path) -> str:
    samples = _four_samples()
    samples["s1"]["txt"] = b"z" * 20_000  # over CAPTION_MAX_BYTES, one line
    samples["s2"]["txt"] = b"kept\n" + b"w" * 100_000
    shard(tmp / "a-0.tar", samples)
    os.mkfifo(tmp / "a-1.tar")
    return f"wds-map:{tmp}/a-{{0..1}}.tar"


# ------------------------------------------------- issue 19: karpathy: and vqa: loaders
def _karpathy(images: list, raw: bytes | None = None) -> Callable[[Path], str]:
    """A Karpathy-split file: ``images`` entries (None = a good one, numbered), their files
    ``images/COCO_{n}.jpg`` (PNG bytes; the content is sniffed)."""

    def build(tmp: Path) -> str:
        (tmp / "images").mkdir()
        entries = []
        for n, entry in enumerate(images):
            name = f"COCO_{n}.jpg"
            (tmp / "images" / name).write_bytes(png_bytes((n * 20 % 256, 40, 80)))
            good = {
                "filename": name,
                "split": "test" if n == 0 else "train",
                "sentences": [{"raw": f"image {n} caption {i}"} for i in range(2)],
                "cocoid": 100 + n,
            }
            entries.append(good if entry is None else entry(good) if callable(entry) else entry)
        file = tmp / "dataset_coco.json"
        file.write_bytes(raw if raw is not None else json.dumps({"images": entries}).encode())
        return f"karpathy:{file},{tmp / 'images'}"

    return build


def _with(**fields) -> Callable[[dict], dict]:
    return lambda good: {**good, **fields}


def _karpathy_fifo(tmp: Path) -> str:
    spec = _karpathy([None, None, None])(tmp)
    fifo = tmp / "images" / "COCO_2.jpg"
    fifo.unlink()
    os.mkfifo(fifo)
    return spec


def _vqa(questions: list, annotations: list | None = None, raw: bytes | None = None):
    """VQA v2 files: questions about images 1..3 (``COCO_train2014_{id:012d}.jpg``)."""

    def build(tmp: Path) -> str:
        for image_id in (1, 2, 3):
            name = f"COCO_train2014_{image_id:012d}.jpg"
            (tmp / name).write_bytes(png_bytes((image_id * 60, 0, 0)))
        anns = annotations
        if anns is None:
            qids = [q["question_id"] for q in questions if isinstance(q, dict)]
            qids = [q for q in qids if isinstance(q, int)]
            anns = [
                {"question_id": qid, "answers": [{"answer": "yes"}] * 10}
                for qid in dict.fromkeys(qids)
            ]
        (tmp / "q.json").write_text(
            json.dumps({"data_subtype": "train2014", "questions": questions})
        )
        (tmp / "a.json").write_bytes(
            raw if raw is not None else json.dumps({"annotations": anns}).encode()
        )
        return f"vqa:{tmp / 'q.json'},{tmp / 'a.json'},{tmp}"

    return build


def _q(qid, image_id=1, question="is it red?") -> dict:
    return {"question_id": qid, "image_id": image_id, "question": question}


_BOMB = image_error_reason(Image.DecompressionBombError("x"))

CASES: list[DataFault] = [
    DataFault("folder caption not UTF-8", _folder_bad_caption, {BAD_UTF8: 1}, pairs=3),
    DataFault("wds caption not UTF-8", _wds_bad_caption, {BAD_UTF8: 1}, pairs=3),
    DataFault("csv caption not UTF-8", _csv_bad_caption, {BAD_UTF8: 1}, 2, ("d.csv line 3",)),
    DataFault("upper-case extensions", _upper_case, {}, pairs=3),
    DataFault(
        "caption files differing in case",
        _case_conflict,
        {"several caption files (names differ only in case)": 1},
        pairs=3,
    ),
    DataFault("decompression bomb", _bomb, {_BOMB: 1}, pairs=4, keys=("bomb.png",)),
    DataFault("truncated png", _truncated_png, {"unreadable image (OSError)": 1}, pairs=4),
    DataFault("all images bad", _all_bad, error=r"none of the 4 training images"),
    DataFault("held-out images bad", _held_out_bad, error=r"none of the 2 held-out", val_size=2),
    DataFault(
        "json caption null",
        _json([{"image": "good0.png", "caption": None}, {"image": "good1.png", "caption": "ok"}]),
        {"'caption' must be a string or a list of strings, got null": 1},
        1,
        ("d.json[0]",),
    ),
    DataFault(
        "json caption int",
        _json([{"image": "good0.png", "caption": "ok"}, {"image": "good1.png", "caption": 7}]),
        {"'caption' must be a string or a list of strings, got int": 1},
        1,
        ("d.json[1]",),
    ),
    DataFault(
        "json image int",
        _json([{"image": 12345, "caption": "x"}, {"image": "good1.png", "caption": "ok"}]),
        {"'image' must be a non-empty string, got int": 1},
        1,
        ("d.json[0]",),
    ),
    DataFault(
        "json caption list with a non-string",
        _json([{"image": "good0.png", "captions": ["ok", 3, {"a": 1}]}]),
        {
            "'captions' must be a string or a list of strings, got int": 1,
            "'captions' must be a string or a list of strings, got dict": 1,
        },
        1,
        ("d.json[0].captions[1]", "d.json[0].captions[2]"),
    ),
    DataFault(
        "json entry without caption",
        _json([{"image": "good0.png"}, {"image": "good1.png", "caption": "ok"}, "junk"]),
        {"entry without 'caption' or 'captions'": 1, "entry without 'image'": 1},
        1,
    ),
    DataFault(
        "coco wrong types",
        _coco_bad,
        {
            "COCO 'file_name' must be a non-empty string, got int": 1,
            "COCO image entry without 'id'": 1,
            "COCO annotation for an unknown image id": 1,
            "'caption' must be a string, got null": 1,  # a COCO annotation has one caption
            "'caption' must be a string, got list": 1,
        },
        1,
    ),
    DataFault("json not UTF-8", _json_bytes(b'[{"image": "\xff"}]'), error=r"not valid UTF-8"),
    DataFault("json not JSON", _json_bytes(b'[{"image": '), error=r"not valid JSON"),
    DataFault(
        "csv empty image cells",
        _csv_empty_cells,
        {"empty image cell": 3},
        2,
        ("d.csv line 3", "d.csv line 4", "d.csv line 6"),
    ),
    DataFault("wds cut inside a member", _wds_cut_inside_member, {"truncated shard": 1}, 2),
    DataFault("wds cut at a header", _wds_cut_at_header, {"truncated shard": 1}, 2),
    DataFault("wds.gz cut", _wds_gz_cut, {"truncated shard": 1}, 2),
    # issue 19 §2: inputs that point elsewhere (links out, FIFOs, devices, huge text)
    DataFault(
        "folder caption links outside the folder",
        _caption_links_outside,
        {"caption file links outside the data folder": 1},
        pairs=4,
        keys=("leak.png",),
    ),
    DataFault(
        "folder FIFO and device as image or caption",
        _fifo_and_device_in_folder,
        {
            "image is not a regular file (a FIFO)": 1,
            "caption file is not a regular file (a FIFO)": 1,
            "image is not a regular file (a character device)": 1,
        },
        pairs=3,
        keys=("pipe.png", "capfifo.png", "zero.png"),
    ),
    DataFault(
        "folder caption over the limit",
        _long_captions,
        {"caption over 16384 bytes": 1},
        pairs=4,
        keys=("long.png",),
    ),
    DataFault(
        "json image paths that are a FIFO, a device, a directory",
        _json_special_images,
        {
            "image is not a regular file (a FIFO)": 1,
            "image is not a regular file (a character device)": 1,
            "image is not a regular file (a directory)": 1,
        },
        pairs=1,
    ),
    DataFault(
        "csv image path that is a FIFO",
        _csv_special_image,
        {"image is not a regular file (a FIFO)": 1},
        pairs=1,
        keys=("d.csv line 3",),
    ),
    DataFault(
        "json file that is a FIFO", _json_file_is_fifo, error=r"not a regular file \(a FIFO\)"
    ),
    DataFault(
        "wds FIFO shard and oversized text",
        _wds_fifo_shard_and_long_text,
        {"shard is not a regular file (a FIFO)": 1, "caption over 16384 bytes": 1},
        pairs=3,
        keys=("a-0.tar/s1",),
    ),
    # issue 19 §3: karpathy: and vqa: at the standard of json: / csv:
    DataFault(
        "karpathy null and numeric captions",
        _karpathy([None, None, _with(sentences=[{"raw": None}, {"raw": 7}, {"raw": "ok"}])]),
        {"'raw' must be a string, got null": 1, "'raw' must be a string, got int": 1},
        pairs=5,
        keys=("dataset_coco.json:images[2].sentences[0]",),
    ),
    DataFault(
        "karpathy float and null ids",
        _karpathy([None, None, _with(cocoid=102.0), _with(cocoid=None)]),
        {"'cocoid' must be an integer, got float": 1, "'cocoid' must be an integer, got null": 1},
        pairs=4,
        keys=("dataset_coco.json:images[2]", "dataset_coco.json:images[3]"),
    ),
    DataFault(
        "karpathy split names in any case, unknown ones counted",
        _karpathy([_with(split="Test"), _with(split="TRAIN"), _with(split="dev"), _with(split=3)]),
        {"unknown split name": 2},
        pairs=4,
        keys=("dataset_coco.json:images[2]", "dataset_coco.json:images[3]"),
    ),
    DataFault(
        "karpathy image listed twice",
        _karpathy([None, None, _with(filename="COCO_1.jpg", cocoid=101)]),
        {"image listed twice": 1},
        pairs=4,
        keys=("dataset_coco.json:images[2]",),
    ),
    DataFault(
        "karpathy malformed entries",
        _karpathy(
            [None, None, _with(sentences=["a string", "another"]), "junk", _with(sentences=None)]
        ),
        {
            "sentence must be an object with 'raw', got str": 2,
            "entry must be an object, got str": 1,
            "'sentences' must be a list, got null": 1,
            "no caption": 1,
        },
        pairs=4,
        keys=("dataset_coco.json:images[2].sentences[1]", "dataset_coco.json:images[3]"),
    ),
    DataFault(
        "karpathy truncated file",
        _karpathy([], raw=b'{"images": [{"filename": "a.jpg", "split": "tr'),
        error=r"retrieval file .*dataset_coco\.json.* not valid JSON \(the file ends early",
    ),
    DataFault(
        "karpathy not UTF-8",
        _karpathy([], raw=b'{"images": [{"filename": "caf\xe9.jpg"}]}'),
        error=r"retrieval file .*dataset_coco\.json.* not valid UTF-8 \(byte 29",
    ),
    DataFault(
        "karpathy image that is a FIFO",
        _karpathy_fifo,
        {"image is not a regular file (a FIFO)": 1},
        pairs=4,
    ),
    DataFault(
        "vqa null and numeric questions",
        _vqa([_q(1), _q(2, question=None), _q(3, question=7), _q(4, question=" ")]),
        {
            "'question' must be a string, got null": 1,
            "'question' must be a string, got int": 1,
            "empty question": 1,
        },
        pairs=1,
        keys=("q.json:questions[1]",),
    ),
    DataFault(
        "vqa float and null ids",
        _vqa([_q(1), _q(2, image_id=2.0), _q(3.0), _q(4, image_id=None)]),
        {
            "'image_id' must be an integer, got float": 1,
            "'question_id' must be an integer, got float": 1,
            "'image_id' must be an integer, got null": 1,
        },
        pairs=1,
        keys=("q.json:questions[1]", "q.json:questions[2]", "q.json:questions[3]"),
    ),
    DataFault(
        "vqa duplicate question ids",
        _vqa([_q(1), _q(2, 2), _q(2, 3, "another question"), _q(5)]),
        {"duplicate question_id": 2},
        pairs=2,
        keys=("q.json:questions[1]", "q.json:questions[2]"),
    ),
    DataFault(
        "vqa malformed entries",
        _vqa(
            [_q(1), {"image_id": 1, "question": "no id?"}, _q(3), _q(4), _q(5)],
            [
                {"question_id": 1, "answers": [{"answer": "yes"}] * 10},
                {"question_id": 3, "answers": [{"answer": "yes"}, {"confidence": "maybe"}]},
                {"question_id": 4, "answers": [{"answer": None}]},
                {"answers": [{"answer": "orphan"}]},
                {"question_id": 5, "answers": [{"answer": "no"}]},
                {"question_id": 5, "answers": [{"answer": "yes"}]},
            ],
        ),
        {
            "entry without 'question_id'": 2,
            "answer without 'answer'": 1,
            "'answer' must be a string, got null": 1,
            "duplicate question_id": 2,
        },
        pairs=1,
        keys=("a.json:annotations[1].answers[1]", "a.json:annotations[4]"),
    ),
    DataFault(
        "vqa truncated annotations",
        _vqa([_q(1)], raw=b'{"annotations": [{"question_id": 1, "ans'),
        error=r"VQA annotations file .*a\.json.* not valid JSON \(the file ends early",
    ),
]
