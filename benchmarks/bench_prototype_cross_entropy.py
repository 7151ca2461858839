"""prototype_cross_entropy benchmarks: time and PEAK MEMORY per backend vs reference, forward
and forward+backward, at the MIM head's scale (N = B·M = 64·128 rows, E = 256, K = 8192 and
65536).

Peak memory is the memory a call needs above its inputs:
- CPU: each row runs once more in a fresh subprocess (so no other row's pages count) that
  warms the code paths up on tiny inputs, builds the inputs, resets its RSS high-water mark,
  reads its resident set size, makes the call and reports the high-water mark (``VmHWM``) minus
  that. (Not ``getrusage``'s ``ru_maxrss``: Linux carries it over from the forking parent, here
  the benchmark process itself.) At ``SEMMIM_BENCH_THREADS`` threads, like the timed rows.
- CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the call.
The table shows it beside the time, with the ratio to the reference row.

On CPU the reference and chunked backends run fp32 (the K = 65536 shape at N = 1024, so the
reference's (N, K) tensors fit the shared machine; the id says so). GPU rows (reference,
chunked, triton; bf16, more with ``SEMMIM_BENCH_DTYPES=bf16,fp16,fp32``) add two peers where
importable: Liger-Kernel's fused linear JSD (a different divergence, soft targets, no centre)
and cut-cross-entropy (hard labels); neither is the same loss, both are the nearest fused
"linear + softmax loss" kernels. The smoke pass (``--benchmark-disable``, CI) runs one shape at
reduced size and measures the peak memory of one row.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import semmim.kernels as K

GPU = torch.cuda.is_available()
_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPU_DTYPES = [_DT[s.strip()] for s in os.environ.get("SEMMIM_BENCH_DTYPES", "bf16").split(",")]
THREADS = int(os.environ.get("SEMMIM_BENCH_THREADS", "1"))  # as conftest.py sets for this process
TS, TT = 0.1, 0.04

# (name, N, E, K)
SHAPES = [("N8192-E256-K8192", 8192, 256, 8192), ("N8192-E256-K65536", 8192, 256, 65536)]
CPU_N = {8192: 8192, 65536: 1024}  # K -> N on CPU
SMOKE = (256, 64, 1024)  # (N, E, K) of the --benchmark-disable pass
OURS = {"cpu": ["reference", "chunked"], "cuda": ["reference", "chunked", "triton"]}
PEERS = ["liger-fused-linear-jsd", "cut-cross-entropy"]


def _cases():
    for dev in ("cpu", "cuda"):
        dtypes = [torch.float32] if dev == "cpu" else GPU_DTYPES
        for be in OURS[dev] + (PEERS if dev == "cuda" else []):
            for shape in SHAPES:
                for dtype in dtypes:
                    for mode in ("fwd", "fwd+bwd"):
                        ident = f"{dev}-{be}-{shape[0]}-{str(dtype)[6:]}-{mode}"
                        yield pytest.param(dev, be, shape, dtype, mode, id=ident)


def make_inputs(N, E, Kp, dtype, device, grad):
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(N, E, generator=g), dim=-1).to(device, dtype)
    zt = F.normalize(torch.randn(N, E, generator=g), dim=-1).to(device, dtype)
    w = (0.02 * torch.randn(Kp, E, generator=g)).to(device, dtype)
    wt = (0.02 * torch.randn(Kp, E, generator=g)).to(device, dtype)
    c = (0.05 * torch.randn(Kp, generator=g)).to(device)
    return z.requires_grad_(grad), zt, w.requires_grad_(grad), wt, c


# Runs in a fresh interpreter: argv = backend N E K mode threads; prints peak extra bytes.
_PEAK_SCRIPT = r"""
import sys
import torch
import torch.nn.functional as F
import semmim.kernels as K

backend, N, E, Kp, mode, threads = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5], sys.argv[6]
torch.set_num_threads(int(threads))
grad = mode == "fwd+bwd"

def inputs(n, k):
    z = F.normalize(torch.randn(n, E), dim=-1).requires_grad_(grad)
    zt = F.normalize(torch.randn(n, E), dim=-1)
    return z, zt, torch.randn(k, E).requires_grad_(grad), torch.randn(k, E), torch.zeros(k)

def call(args):
    loss, _ = K.prototype_cross_entropy(*args, 0.1, 0.04, backend=backend, validate=False)
    if grad:
        loss.mean().backward()

def status(field):  # kB -> bytes, from this process's own memory map (new at exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

call(inputs(4, 16))  # load the code paths first: their pages are not the op's memory
args = inputs(N, Kp)
try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = status("VmRSS:")
call(args)
print(status("VmHWM:") - base)
"""


def cpu_peak_extra(backend, N, E, Kp, mode) -> int:
    """Peak RSS above the inputs of one call, in a fresh subprocess (bytes)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    args = [backend, str(N), str(E), str(Kp), mode, str(THREADS)]
    res = subprocess.run(
        [sys.executable, "-P", "-c", _PEAK_SCRIPT, *args],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess failed:\n{res.stderr[-2000:]}")
    return int(res.stdout.strip().splitlines()[-1])


def cuda_peak_extra(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _peer_fn(name, z, zt, w, wt, grad):
    """The peer's call on the same (N, E) features and (K, E) prototypes, or skip with why."""
    if name == "liger-fused-linear-jsd":
        try:
            from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
        except Exception as e:  # not installed, or fails to import on this setup
            pytest.skip(f"liger-kernel not importable ({type(e).__name__}: {e})")
        jsd = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)
        return lambda: jsd(z, w, zt, wt)
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as e:
        pytest.skip(f"cut-cross-entropy not importable ({type(e).__name__}: {e})")
    labels = torch.randint(0, w.shape[0], (z.shape[0],), device=z.device)
    return lambda: linear_cross_entropy(z, w, labels)


@pytest.mark.parametrize("device,backend,shape,dtype,mode", list(_cases()))
def test_prototype_cross_entropy(bench, request, device, backend, shape, dtype, mode):
    if device == "cuda" and not GPU:
        pytest.skip("no CUDA GPU on this machine")
    smoke = request.config.getoption("benchmark_disable", False)
    name, N, E, Kp = shape
    if smoke:
        if shape is not SHAPES[0]:
            pytest.skip("smoke pass (--benchmark-disable): one shape")
        N, E, Kp = SMOKE
        name = f"N{N}-E{E}-K{Kp} (smoke)"
    elif device == "cpu" and CPU_N[Kp] != N:
        N = CPU_N[Kp]
        name = f"{name} (N={N} on CPU)"
    grad = mode == "fwd+bwd"
    z, zt, w, wt, c = make_inputs(N, E, Kp, dtype, device, grad)
    args = (z, zt, w, wt, c, TS, TT)
    if backend in PEERS:
        call = _peer_fn(backend, z, zt, w, wt, grad)
    else:
        reasons = K.get_op("prototype_cross_entropy").reasons(*args)[backend]
        if reasons:
            pytest.skip("; ".join(reasons))

        def call():
            return K.prototype_cross_entropy(*args, backend=backend, validate=False)[0].mean()

    if grad:

        def fn():
            z.grad = w.grad = None
            call().backward()
    else:

        def fn():
            with torch.no_grad():
                call()

    if device == "cpu":
        # a subprocess costs seconds: the smoke pass measures one row, to exercise the code
        measure = not smoke or (backend, mode) == ("chunked", "fwd+bwd")
        peak = cpu_peak_extra(backend, N, E, Kp, mode) if measure else None
    else:
        fn()  # compile / autotune outside the measurement
        peak = cuda_peak_extra(fn)
    bench(
        fn,
        group=f"prototype_cross_entropy {mode} {name} {str(dtype)[6:]} {device}",
        backend=backend,
        device=device,
        flops=2 * N * E * Kp * (4 if grad else 2),  # the reference's matmuls
        peer=backend in PEERS,
        peak_bytes=peak,
        rounds=5 if device == "cuda" else None,  # x INNER calls each: fits gpu_check's timeout
    )
