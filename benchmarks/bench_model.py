"""Whole training steps of the ``tiny`` model on CPU: eager vs torch.compile, for our default
backends with token dropping ("fast") and for the reference path (reference backends, [MASK]
tokens) that a user would compile instead of using our kernels, and the one-pass student
(``mim.student_view=masked``, masking ratio 0.5 and 0.75: the student ViT encodes only CLS + the
kept patches).

Each row is one training step as ``benchmarks/e2e_gpu.py`` runs it on the GPU (forward with an
explicit seed and ``check_inputs=False`` after a validating first call, backward, clip, fused
AdamW, EMA), fp32 (CPU autocast is not what a CPU user would run), tiny at its 64 px (P = 16),
B = 8, T = 16. The ``reference`` row is the reference path in eager mode; "vs ref" divides its
time (timed in the row's own rounds, the table's ``ref`` column) by the row's. The second
warm-up step is the last that compiles: the schedules (the MIM teacher temperature warms up
over training) reach the compiled forward as tensors (tests/test_gpu_path.py counts it).

Compiled rows compile in their warm-up (minutes on 2 CPU cores: Inductor builds C++ for every
graph, and the RNG calls split the forward into several graphs, see docs/GPU_PATH.md); under
``--benchmark-disable`` (the CI smoke pass) they skip, since tests/test_gpu_path.py already
checks a compiled step against eager.
"""

from __future__ import annotations

import pytest
from e2e_gpu import TrainStep

B, T = 8, 16
# row name -> (path, compiled); one "backend" parameter, so the benchmark conftest groups
# the rows and runs the reference first (then interleaves it with each other row)
ROWS = {
    "reference": ("reference", False),
    "reference+compile": ("reference", True),
    "fast": ("fast", False),
    "fast+compile": ("fast", True),
    # the one-pass student (issue 18, mim.student_view=masked) at masking ratio 0.5 and 0.75;
    # benchmarks/work_per_pair.py counts the FLOPs and memory of the same steps
    "one_pass": ("one_pass", False),
    "one_pass75": ("one_pass75", False),
}


@pytest.mark.parametrize("backend", list(ROWS))
def test_train_step_tiny(bench, benchmark, backend):
    path, compiled = ROWS[backend]
    if compiled and benchmark.disabled:
        pytest.skip("compile takes minutes on CPU; tests/test_gpu_path.py checks it")
    run = TrainStep(path, B, T, "tiny", 64, device="cpu", compile=compiled)
    run.step()  # first step: value checks on (check_inputs=True), compiles when compiled
    run.step()  # second: the seed becomes a dynamic int (one recompile), then steady state
    bench(
        run.step,
        group=f"model train-step tiny 64px B={B} T={T} fp32 cpu",
        backend=backend,
        rounds=5,
    )
