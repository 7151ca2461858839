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
  ``reference`` row runs first and the group's other rows right after it (groups in the order
  the benchmark modules list their cases: model-shaped rows before huge ones); each other row
  then times one reference call before its own rounds (pytest-benchmark's untimed ``setup``).
  Where one reference round costs more than ``REF_ROUND_BUDGET_S`` (e.g. the fp32 reference at
  Lq = Lk = 4096), only ``REF_ROUNDS_SLOW`` of the row's rounds, spread evenly, get one, so a
  slow reference does not multiply every row's run time.
- The table's one ratio: **vs ref = ref / time** on the same line, where ``time`` is the row's
  median and ``ref`` the median of the reference calls timed in that row's rounds (for the
  reference row itself: its own median, 1.00x). A machine that slows down between rows moves
  both alike. "vs peer" is the best peer row's median / this row's median (whole-run medians).
- A failing row prints one line (the exception and its first line); ``SEMMIM_BENCH_TRACEBACK=1``
  keeps pytest's full report.
- Rates print in the unit that shows them (GFLOP/s below 1 TFLOP/s, MB/s below 1 GB/s).
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
REF_ROUND_BUDGET_S = 0.25  # a reference round slower than this is interleaved sparingly
REF_ROUNDS_SLOW = 3
# the latest group's reference row: group -> (callable running one reference round, its median)
_REFERENCE: dict[str, tuple[object, float]] = {}


def pytest_collection_modifyitems(config, items):
    """Group rows together, reference first: a group is the test function with its parameters
    except ``backend``; groups keep the order of their first case in the module (its
    parametrisation order), and within a group the reference row runs first."""

    def group(item):
        spec = getattr(item, "callspec", None)
        if spec is None or "backend" not in spec.params:
            return (str(item.path), item.originalname, item.nodeid)
        rest = ",".join(f"{k}={v}" for k, v in sorted(spec.params.items()) if k != "backend")
        return (str(item.path), item.originalname, rest)

    def is_reference(item):
        spec = getattr(item, "callspec", None)
        return spec is not None and spec.params.get("backend") == "reference"

    first: dict[tuple, int] = {}
    for i, item in enumerate(items):
        first.setdefault(group(item), i)
    items.sort(key=lambda it: (first[group(it)], not is_reference(it)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing benchmark row reports one line: where, the exception type and the first line
    of its message (a compiled model's traceback runs to thousands of lines)."""
    outcome = yield
    rep = outcome.get_result()
    if (
        rep.failed
        and call.excinfo is not None
        and not os.environ.get("SEMMIM_BENCH_TRACEBACK")
        and "benchmark" in item.fixturenames
    ):
        e = call.excinfo
        lines = str(e.value).strip().splitlines()
        msg = lines[0][:300] if lines else ""
        rep.longrepr = (
            f"{item.nodeid} ({rep.when}): {e.typename}: {msg} "
            "[SEMMIM_BENCH_TRACEBACK=1 for the full report]"
        )


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
        rounds = rounds or (30 if cuda else 5)
        warmup = 2 if cuda else 1
        ref_times: list[float] = []
        setup = None
        if group in _REFERENCE and backend != "reference" and not b.disabled:
            ref_body, ref_median = _REFERENCE[group]
            # which setup calls (warm-up rounds first) time a reference round: every round, or
            # REF_ROUNDS_SLOW spread evenly when a reference round is slow
            every = 1
            if ref_median > REF_ROUND_BUDGET_S:
                every = max(1, rounds // REF_ROUNDS_SLOW)
            calls = iter(range(-warmup, rounds))

            def setup():  # untimed by pytest-benchmark
                i = next(calls)
                if i >= 0 and i % every == 0:
                    t0 = time.perf_counter()
                    ref_body()
                    ref_times.append(time.perf_counter() - t0)

        result = b.pedantic(body, setup=setup, rounds=rounds, iterations=1, warmup_rounds=warmup)
        if backend == "reference" and b.stats is not None:
            _REFERENCE.clear()
            _REFERENCE[group] = (body, b.stats.stats.median)
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
        f"semmim speed-up table (CPU rows at {THREADS} thread(s), SEMMIM_BENCH_THREADS; "
        "time = median per call; ref = median of the reference calls timed in the same "
        "rounds; vs ref = ref / time; vs peer = best peer's time / time)"
    )
    tr.write_line(
        f"{'group':<58} {'backend':<22} {'time':>11} {'ref':>11} {'vs ref':>7} {'vs peer':>8} "
        f"{'rate':>15}"
    )
    for group in sorted(groups, key=str):
        rows = []
        for b in groups[group]:
            info = b.extra_info
            t = b.stats.median / max(1, info.get("inner", 1))
            rows.append((info.get("backend", b.name), t, info))
        ref_peak = next((i.get("peak_bytes") for name, _, i in rows if name == "reference"), None)
        peers = [t for _, t, info in rows if info.get("peer")]
        best_peer = min(peers) if peers else None
        for name, t, info in sorted(rows, key=lambda r: r[1]):
            ref = t if name == "reference" else info.get("ref_interleaved")
            if ref and name != "reference":
                ref /= max(1, info.get("inner", 1))
            ref_col = _fmt_time(ref) if ref else "          -"
            vs_ref = f"{ref / t:6.2f}x" if ref else "      -"
            vs_peer = f"{best_peer / t:7.2f}x" if best_peer and not info.get("peer") else "       -"
            rate = ""
            if info.get("flops"):
                rate = _fmt_rate(info["flops"] / t, "FLOP/s")
            elif info.get("bytes"):
                rate = _fmt_rate(info["bytes"] / t, "B/s")
            peak = ""
            if info.get("peak_bytes") is not None:  # memory above the inputs, and ref / this
                peak = f" {info['peak_bytes'] / 2**20:9.1f} MiB"
                if ref_peak and info["peak_bytes"] > 0:
                    peak += f" ({ref_peak / info['peak_bytes']:5.1f}x less)"
            tr.write_line(
                f"{str(group):<58} {name:<22} {_fmt_time(t):>11} {ref_col:>11} {vs_ref:>7} "
                f"{vs_peer:>8} {rate:>15}" + peak
            )


def _fmt_rate(per_s: float, unit: str) -> str:
    """A rate in the largest of T, G, M, k that keeps it >= 1 (0.04 TFLOP/s -> 40.0 GFLOP/s)."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_s >= scale:
            return f"{per_s / scale:7.1f} {prefix}{unit}"
    return f"{per_s:7.1f} {unit}"
