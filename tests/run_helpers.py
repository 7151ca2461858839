"""Helpers shared by the tests (imported as ``run_helpers``): small training runs, and the
peak memory of opening a data spec."""

from __future__ import annotations

import os
import socket

from semmim.run_config import TrainConfig


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(rank: int, world_size: int, port: int) -> None:
    """torchrun's environment for ``rank`` of a ``world_size``-process gloo job on ``port``
    (for workers started with ``torch.multiprocessing.spawn``)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )


def small_run(out, **kw) -> TrainConfig:
    """A short CPU run (``kw`` gives at least ``data`` and ``steps``): batch 4, a log row per
    step, no checkpoint before the end, no DataLoader workers, no final evaluation (unless
    ``kw`` says otherwise)."""
    base = dict(
        out=str(out),
        batch_size=4,
        log_every=1,
        ckpt_every=100,
        num_workers=0,
        eval_at_end=False,
        lr=1e-3,
    )
    base.update(kw)
    return TrainConfig(**base)


def open_data_peak(spec: str):
    """``semmim.data.open_data(spec, 0)`` and the peak bytes Python allocated while listing it
    (tracemalloc): for the bounded-read tests of huge text members."""
    import tracemalloc

    from semmim.data import open_data

    tracemalloc.start()
    try:
        source = open_data(spec, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return source, peak
