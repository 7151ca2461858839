"""Helpers shared by the tests that train small runs (imported as ``run_helpers``)."""

from __future__ import annotations

from semmim.config import TrainConfig


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
