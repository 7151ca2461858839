"""Benchmark helpers: the `bench` fixture and a terminal-summary table of speed-ups.

Every benchmark calls ``bench(fn, group=..., backend=..., bytes=..., flops=..., peer=...)``.
On CUDA the timed body runs ``fn`` ``INNER`` times and synchronises once, so launch latency is
not counted once per call; the summary divides by ``INNER``. The table prints, per group (op, mode,
shape, dtype): the median time per call, the speed-up vs the ``reference`` row, the speed-up vs the
best ``peer`` row (torch SDPA backends, flash-attn, xformers where present), and GB/s or TFLOP/s
from the bytes / flops each benchmark declares (its hardware floor); where a benchmark passes
``peak_bytes`` (memory a call needs above its inputs), that too, with how many times less than the
reference row.
"""

from __future__ import annotations

import os
from collections import defaultdict

import pytest
import torch

INNER_CUDA = int(os.environ.get("SEMMIM_BENCH_INNER", "20"))


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
            return b.pedantic(body, rounds=rounds or 30, iterations=1, warmup_rounds=2)
        fn()
        return b.pedantic(fn, rounds=rounds or 5, iterations=1, warmup_rounds=1)


@pytest.fixture
def bench(benchmark):
    return Bench(benchmark)


def _fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:8.1f} us"
    if s < 1:
        return f"{s * 1e3:8.2f} ms"
    return f"{s:8.2f} s "


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benches = [b for b in getattr(session, "benchmarks", []) or [] if b.stats is not None]
    if not benches:
        return
    groups = defaultdict(list)
    for b in benches:
        groups[b.group].append(b)
    tr = terminalreporter
    tr.section("semmim speed-up table (median per call)")
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
        ref_info = next((info for name, _, info in rows if name == "reference"), {})
        ref_peak = ref_info.get("peak_bytes")
        peers = [t for _, t, info in rows if info.get("peer")]
        best_peer = min(peers) if peers else None
        for name, t, info in sorted(rows, key=lambda r: r[1]):
            vs_ref = f"{ref / t:6.2f}x" if ref else "      -"
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
