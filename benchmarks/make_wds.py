"""Write a synthetic webdataset of image-caption pairs for the streaming benchmark.

Each sample is ``{key}.jpg`` (a small JPEG: a coloured background with a rectangle and a disc,
their colours and positions drawn from the sample's index) and ``{key}.txt`` (a caption naming
them), in plain (uncompressed) tar shards ``shard-000000.tar`` ... of ``--per-shard`` samples.
Shards are written by ``--procs`` processes; each shard is written to ``NAME.tmp`` and renamed,
so an interrupted run leaves only whole shards and a rerun skips the shards already there.

    nice -n 5 python benchmarks/make_wds.py /work/wds_1m --pairs 1000000 --per-shard 2500

(400 shards of 2,500 pairs; the first 40 shards are the 100k-pair subset
``/work/wds_1m/shard-{000000..000039}.tar``.) The output belongs outside the repository.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import tarfile
import time
from multiprocessing import Pool

from PIL import Image, ImageDraw

from semmim.synthetic import COLOURS  # the embedded scenes' palette

NAMES = list(COLOURS)


def sample(index: int, size: int) -> tuple[bytes, bytes]:
    """The JPEG bytes and caption bytes of sample ``index`` (a pure function of it)."""
    rng = random.Random(index)
    bg, box, disc = rng.sample(NAMES, 3)
    image = Image.new("RGB", (size, size), COLOURS[bg])
    draw = ImageDraw.Draw(image)
    x, y = rng.randrange(size // 2), rng.randrange(size // 2)
    draw.rectangle((x, y, x + size // 3, y + size // 4), fill=COLOURS[box])
    cx, cy, r = rng.randrange(size), rng.randrange(size), size // 6
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[disc])
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    side = "left" if cx < size // 2 else "right"
    caption = f"a {box} box and a {disc} disc on the {side} on a {bg} background"
    return buf.getvalue(), caption.encode()


def write_shard(job: tuple[str, int, int, int]) -> int:
    """Write one shard (``path``, first index, count, image size); returns its sample count."""
    path, first, count, size = job
    if os.path.exists(path):
        return count
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(first, first + count):
            image, caption = sample(index, size)
            for ext, data in (("jpg", image), ("txt", caption)):
                info = tarfile.TarInfo(f"{index:09d}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder (created; outside the repository)")
    parser.add_argument("--pairs", type=int, default=1_000_000, help="number of pairs")
    parser.add_argument("--per-shard", type=int, default=2500, help="pairs per shard")
    parser.add_argument("--size", type=int, default=48, help="image side in pixels")
    parser.add_argument("--procs", type=int, default=2, help="writer processes")
    args = parser.parse_args()
    if args.pairs < 1 or args.per_shard < 1 or args.size < 8 or args.procs < 1:
        parser.error("--pairs, --per-shard, --procs must be >= 1 and --size >= 8")
    from tqdm.auto import tqdm

    os.makedirs(args.out, exist_ok=True)
    jobs = [
        (
            os.path.join(args.out, f"shard-{n:06d}.tar"),
            first,
            min(args.per_shard, args.pairs - first),
            args.size,
        )
        for n, first in enumerate(range(0, args.pairs, args.per_shard))
    ]
    t0 = time.perf_counter()
    with Pool(args.procs) as pool, tqdm(total=args.pairs, unit="pair", desc="write") as bar:
        for count in pool.imap_unordered(write_shard, jobs):
            bar.update(count)
    last = len(jobs) - 1
    print(
        f"{args.pairs} pairs in {len(jobs)} shards: wds:{args.out}/shard-{{000000..{last:06d}}}.tar"
        f" ({time.perf_counter() - t0:.0f} s)"
    )


if __name__ == "__main__":
    main()
