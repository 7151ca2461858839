"""topk_mask benchmarks: backends x shapes x dtypes, with Gumbel noise as the model calls it.
Rates are GB/s against the floor of one pass: patch features read once, text and noise read once,
keep_idx + mask_idx (int64) + mask (bool) + the per-row non-finite counts written once.

On CPU the reference and the C++ cpu backend run at a reduced batch (the id and the group say so;
one reference call at B=256 takes about a second on 2 cores); GPU rows skip with the reason.
The calls use the public op with its default ``validate=True`` (one host sync per call).
"""

from __future__ import annotations

import pytest
import torch

import semmim.kernels as K

# (name, B, P, d); M = P // 2
SHAPES = [
    ("B256-P576-d768", 256, 576, 768),
    ("B256-P576-d256", 256, 576, 256),
    ("B256-P196-d768", 256, 196, 768),
    ("B256-P196-d256", 256, 196, 256),
]
CPU_BATCH = 64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU = torch.cuda.is_available()

CASES = [
    pytest.param(
        dev, be, shape, dtype, id=f"{dev}-{be}-{shape[0]}{'-B64cpu' if dev == 'cpu' else ''}"
        f"-{str(dtype)[6:]}",
    )
    for dev in ["cpu", "cuda"]
    for be in (["reference", "cpu"] if dev == "cpu" else ["reference", "triton", "cuda"])
    for shape in SHAPES
    for dtype in DTYPES
]  # fmt: skip


def floor_bytes(B: int, P: int, d: int, M: int, dtype: torch.dtype, noise: bool) -> int:
    es = torch.empty((), dtype=dtype).element_size()
    read = es * (B * P * d + B * d) + (4 * B * P if noise else 0)
    written = 8 * B * (P - M) + 8 * B * M + B * P + 4 * B
    return read + written


@pytest.mark.parametrize("device,backend,shape,dtype", CASES)
def test_topk_mask(bench, device, backend, shape, dtype):
    if device == "cuda" and not GPU:
        pytest.skip("no CUDA GPU on this machine")
    name, B, P, d = shape
    if device == "cpu":
        B = CPU_BATCH
        name = f"{name} (B={B} on CPU)"
    M = P // 2
    g = torch.Generator(device="cpu").manual_seed(0)
    patch = torch.randn(B, P, d, generator=g).to(device=device, dtype=dtype)
    text = torch.randn(B, d, generator=g).to(device=device, dtype=dtype)
    noise = K.gumbel_noise((B, P), seed=0, device=device)
    reasons = K.get_op("topk_mask").reasons(patch, text, M, noise=noise, tau=0.5)[backend]
    if reasons:
        pytest.skip("; ".join(reasons))

    def fn():
        K.topk_mask(patch, text, M, noise=noise, tau=0.5, backend=backend)

    bench(
        fn,
        group=f"topk_mask fwd {name} M={M} {str(dtype)[6:]} {device}",
        backend=backend,
        device=device,
        bytes=floor_bytes(B, P, d, M, dtype, noise=True),
    )
