"""Benchmark helpers: the `bench` fixture and a terminal-summary table of speed-ups.

Every benchmark calls ``bench(fn, group=..., backend=..., bytes=..., flops=..., peer=...)``.
On CUDA the timed body runs ``fn`` ``INNER`` times and synchronises once, so launch latency is
not counted once per call; the summary divides by ``INNER``. The table prints, per group (op, mode,
shape, dtype): the median time per call, the speed-up vs the ``reference`` row, the speed-up vs the
best ``peer`` row (torch SDPA backends, flash-attn, xformers where present), and GB/s or TFLOP/s
from the bytes / flops each benchmark declares (its hardware floor); where a benchmark passes
``peak_bytes`` (memory a call needs above its inputs), that too, with how many times less than the
reference row.

Benchmarks that agree with themselves:

- CPU rows run at ``SEMMIM_BENCH_THREADS`` threads (default 1: torch's intra-op pool and the
  OpenMP runtime of semmim._C), set before any benchmark module loads; the table says how many.
- Rows interleave with their reference in rounds: tests are ordered so that each group's
  ``reference`` row runs first and the group's other rows right after it; each other row then
  times one reference call before each of its own rounds (pytest-benchmark's untimed ``setup``),
  and its "vs ref" is the ratio of the two medians taken in the same rounds, so a machine that
  slows down between rows moves both sides alike.
- The summary prints last, after pytest-benchmark's own tables and pytest's summary lines.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict

THREADS = int(os.environ.get("SEMMIM_BENCH_THREADS", "1"))
# before torch / semmim._C start their thread pools (OpenMP reads this once, at load)
os.environ["OMP_NUM_THREADS"] = str(THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(THREADS)

INNER_CUDA = int(os.environ.get("SEMMIM_BENCH_INNER", "20"))
# the latest group's reference row: group -> callable running one reference round
_REFERENCE: dict[str, object] = {}


def pytest_collection_modifyitems(config, items):
    """Group rows together, reference first: sort (stably) by the test's parameters without
    ``backend``, then reference before the rest (see the module docstring)."""

    def key(item):
        spec = getattr(item, "callspec", None)
        if spec is None or "backend" not in spec.params:
            return (str(item.path), item.originalname, "", True)
        rest = ",".join(f"{k}={v}" for k, v in sorted(spec.params.items()) if k != "backend")
        return (str(item.path), item.originalname, rest, spec.params["backend"] != "reference")

    items.sort(key=key)


class Bench:
    def __init__(self, benchmark):
        self.benchmark = benchmark

    def __call__(
        self,
        fn,
        *,
        group: str,
        backend: str,
        device: str | torch.device = "cpu",
        bytes: float | None = None,  # noqa: A002 - the natural name in the tables
        flops: float | None = None,
        peer: bool = False,
        rounds: int | None = None,
        peak_bytes: float | None = None,
    ):
        b = self.benchmark
        b.group = group
        cuda = torch.device(device).type == "cuda"
        inner = INNER_CUDA if cuda else 1
        b.extra_info.update(
            backend=backend, inner=inner, bytes=bytes, flops=flops, peer=peer, device=str(device),
            peak_bytes=peak_bytes,
        )  # fmt: skip
        if cuda:

            def body():
                for _ in range(inner):
                    fn()
                torch.cuda.synchronize()

            fn()  # warm-up: compilation, autotuning, allocator
            torch.cuda.synchronize()
        else:
            body = fn
            fn()
        ref_times: list[float] = []
        setup = None
        if backend == "reference":
            _REFERENCE.clear()
            _REFERENCE[group] = body
        elif group in _REFERENCE and not b.disabled:
            ref_body = _REFERENCE[group]

            def setup():  # untimed by pytest-benchmark: one reference round before each round
                t0 = time.perf_counter()
                ref_body()
                ref_times.append(time.perf_counter() - t0)

        result = b.pedantic(
            body,
            setup=setup,
            rounds=rounds or (30 if cuda else 5),
            iterations=1,
            warmup_rounds=2 if cuda else 1,
        )
        if ref_times:
            b.extra_info["ref_interleaved"] = statistics.median(ref_times)
        b.extra_info["threads"] = None if cuda else THREADS
        return result


@pytest.fixture
def bench(benchmark):
    return Bench(benchmark)


def _fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:8.1f} us"
    if s < 1:
        return f"{s * 1e3:8.2f} ms"
    return f"{s:8.2f} s "


def pytest_unconfigure(config):
    """The summary, after everything pytest and pytest-benchmark print (so it is last)."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    session = getattr(config, "_benchmarksession", None)
    benches = [b for b in getattr(session, "benchmarks", []) or [] if b.stats is not None]
    if tr is None or not benches:
        return
    groups = defaultdict(list)
    for b in benches:
        groups[b.group].append(b)
    tr.section(
        f"semmim speed-up table (median per call; CPU rows at {THREADS} thread(s), "
        f"SEMMIM_BENCH_THREADS; vs ref from interleaved rounds)"
    )
    tr.write_line(
        f"{'group':<58} {'backend':<22} {'time':>11} {'vs ref':>7} {'vs peer':>8} {'rate':>14}"
    )
    for group in sorted(groups, key=str):
        rows = []
        for b in groups[group]:
            info = b.extra_info
            t = b.stats.median / max(1, info.get("inner", 1))
            rows.append((info.get("backend", b.name), t, info))
        ref = next((t for name, t, _ in rows if name == "reference"), None)
        ref_peak = next((i.get("peak_bytes") for name, _, i in rows if name == "reference"), None)
        peers = [t for _, t, info in rows if info.get("peer")]
        best_peer = min(peers) if peers else None
        for name, t, info in sorted(rows, key=lambda r: r[1]):
            paired = info.get("ref_interleaved")
            if paired:
                paired /= max(1, info.get("inner", 1))
            base = paired or ref
            vs_ref = f"{base / t:6.2f}x" if base else "      -"
            vs_peer = f"{best_peer / t:7.2f}x" if best_peer and not info.get("peer") else "       -"
            if info.get("flops"):
                rate = f"{info['flops'] / t / 1e12:8.1f} TFLOP/s"
            elif info.get("bytes"):
                rate = f"{info['bytes'] / t / 1e9:9.1f} GB/s"
            else:
                rate = ""
            peak = ""
            if info.get("peak_bytes") is not None:  # memory above the inputs, and ref / this
                peak = f" {info['peak_bytes'] / 2**20:9.1f} MiB"
                if ref_peak and info["peak_bytes"] > 0:
                    peak += f" ({ref_peak / info['peak_bytes']:5.1f}x less)"
            tr.write_line(
                f"{str(group):<58} {name:<22} {_fmt_time(t):>11} {vs_ref:>7} {vs_peer:>8} {rate:>14}"
                + peak
            )
