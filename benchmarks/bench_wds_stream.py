"""Time to the first training step and peak RSS per process, for a ``wds:`` spec.

Each measurement is a fresh process (``--child``) that imports semmim, runs ``semmim.train.train``
for one step of the ``tiny`` preset with 2 DataLoader workers, and reports, right after the first
step: the seconds from its start (imports included) to the end of that step, the seconds spent
opening the data, and the peak RSS (``VmHWM``) of itself and of each loader worker. The parent
runs the children one after another and prints a table.

Today's reader is measured from a checkout of the code before the streaming change (the spec
means something else there: every shard is listed into records when it is opened)::

    git archive d005d5f | (mkdir -p /tmp/semmim_old && tar -x -C /tmp/semmim_old)
    cp semmim/_C*.so /tmp/semmim_old/semmim/    # same C++ sources
    nice -n 5 python benchmarks/make_wds.py /work/wds_1m      # 1,000,000 pairs, 400 shards
    nice -n 5 python benchmarks/bench_wds_stream.py --old /tmp/semmim_old \\
        100k=/work/wds_1m/shard-{000000..000039}.tar 1M=/work/wds_1m/shard-{000000..000399}.tar

``--old PATH`` adds rows for the code at PATH (run with ``PYTHONPATH=PATH``); without it only
the current code runs. Results: benchmarks/RESULTS.md and docs/TRAINING.md.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # before any heavy import: the child's clock starts at its start

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402


def _status(pid: int | str, field: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` in bytes (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (the DataLoader workers)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return sorted(out)


def child(spec: str, out: str, batch_size: int, workers: int) -> None:
    """One measurement: prints one JSON line."""
    import torch

    import semmim.train.loop as loop
    import semmim.train.run as run_module
    from semmim.config import from_preset
    from semmim.run_config import TrainConfig
    from semmim.train import train

    torch.set_num_threads(1)
    result: dict = {}
    open_run_data, train_step = run_module.open_run_data, loop.train_step

    def timed_open(*args, **kw):
        t = time.perf_counter()
        source = open_run_data(*args, **kw)
        result["open_s"] = time.perf_counter() - t
        return source

    def first_step(run, *args, **kw):
        out_ = train_step(run, *args, **kw)
        if "first_step_s" not in result:
            result["first_step_s"] = time.perf_counter() - T0
            result["first_wait_s"] = out_["wait"]
            result["main_peak_rss"] = _status("self", "VmHWM")
            result["worker_peak_rss"] = [_status(p, "VmHWM") for p in _children(os.getpid())]
        return out_

    run_module.open_run_data, loop.train_step = timed_open, first_step
    tcfg = TrainConfig(
        data=spec,
        out=out,
        steps=1,
        batch_size=batch_size,
        num_workers=workers,
        eval_at_end=False,
        log_every=1,
        device="cpu",
        threads=1,
    )
    train(from_preset("tiny"), tcfg)
    print("RESULT " + json.dumps(result), flush=True)


def measure(spec: str, old: str | None, batch_size: int, workers: int) -> dict:
    env = dict(os.environ)
    if old:
        env["PYTHONPATH"] = old + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory(prefix="bench_wds_") as out:
        cmd = [sys.executable, __file__, "--child", spec, "--out", out]
        cmd += ["--batch-size", str(batch_size), "--workers", str(workers)]
        # -P is not used: the old checkout must come first on the path (PYTHONPATH)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sets", nargs="*", help="NAME=PATTERN of the shards (wds: added)")
    parser.add_argument("--old", default="", help="checkout of the code before the change")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.out, args.batch_size, args.workers)
        return
    if not args.sets:
        parser.error("give at least one NAME=PATTERN")
    mib = 2**20
    print(
        f"# {platform.node()}: {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; batch {args.batch_size}, "
        f"{args.workers} workers, preset tiny, 1 step"
    )
    print(
        "| data | reader | first step (s) | opening the data (s) | first batch wait (s) "
        "| peak RSS main / workers (MiB) |"
    )
    print("|---|---|---|---|---|---|")
    readers = ([("today's (d005d5f)", args.old)] if args.old else []) + [
        ("webdataset stream", None)
    ]
    for item in args.sets:
        name, _, pattern = item.partition("=")
        for reader, old in readers:
            r = measure("wds:" + pattern, old, args.batch_size, args.workers)
            workers = " / ".join(f"{b / mib:.0f}" for b in r["worker_peak_rss"])
            print(
                f"| {name} | {reader} | {r['first_step_s']:.1f} | {r['open_s']:.1f} | "
                f"{r.get('first_wait_s', float('nan')):.1f} | "
                f"{r['main_peak_rss'] / mib:.0f} / {workers} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
