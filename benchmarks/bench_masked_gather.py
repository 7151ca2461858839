"""masked_gather / masked_scatter_fill benchmarks: backends x shapes x dtypes, forward and
forward+backward, position embeddings fused. Rates are GB/s against the data-movement floor
(each input row read once, each output row written once).

On CPU the reference and the C++ cpu backend run at a reduced batch (the id says so); GPU rows
skip with the reason. `test_device_copy` measures the device-to-device copy bandwidth, the ceiling
the kernels are compared with.
"""

from __future__ import annotations

import pytest
import torch

import semmim.kernels as K

# (name, B, P, D, R) at paper scale; CPU runs the same shapes at a smaller batch
SHAPES = [("B256-P576-D768-R288", 256, 576, 768, 288), ("B64-P196-D768-R98", 64, 196, 768, 98)]
CPU_BATCH = {256: 8, 64: 8}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if GPU else [])


def _setup(device, shape, dtype, grad):
    name, B, P, D, R = shape
    if device == "cpu":
        B = CPU_BATCH[B]
    x = torch.randn(B, P, D, device=device, dtype=dtype, requires_grad=grad)
    pos = torch.randn(P, D, device=device, dtype=dtype, requires_grad=grad)
    idx = torch.stack([torch.randperm(P, device=device)[:R].sort().values for _ in range(B)])
    return B, P, D, R, x, pos, idx


def _backends(device):
    return ["reference", "cpu"] if device == "cpu" else ["reference", "triton", "cuda"]


CASES = [
    pytest.param(dev, be, shape, dtype, mode, id=f"{dev}-{be}-{shape[0]}-{str(dtype)[6:]}-{mode}")
    for dev in ["cpu", "cuda"]
    for be in (["reference", "cpu"] if dev == "cpu" else ["reference", "triton", "cuda"])
    for shape in SHAPES
    for dtype in DTYPES
    for mode in ["fwd", "fwd+bwd"]
]


@pytest.mark.parametrize("device,backend,shape,dtype,mode", CASES)
def test_masked_gather(bench, device, backend, shape, dtype, mode):
    if device == "cuda" and not GPU:
        pytest.skip("no CUDA GPU on this machine")
    grad = mode == "fwd+bwd"
    B, P, D, R, x, pos, idx = _setup(device, shape, dtype, grad)
    if device == "cpu" and B != shape[1]:
        shape_name = f"{shape[0]} (B={B} on CPU)"
    else:
        shape_name = shape[0]
    reasons = K.get_op("masked_gather").reasons(x, idx, pos)[backend]
    if reasons:
        pytest.skip("; ".join(reasons))
    es = x.element_size()
    moved = es * (2 * B * R * D + P * D) + idx.numel() * idx.element_size()
    g = torch.randn(B, R, D, device=device, dtype=dtype)
    if grad:
        moved += es * (B * R * D + B * P * D + P * D)

        def fn():
            x.grad = pos.grad = None
            K.masked_gather(x, idx, pos, backend=backend).backward(g)
    else:

        def fn():
            K.masked_gather(x, idx, pos, backend=backend)

    bench(
        fn,
        group=f"masked_gather {mode} {shape_name} {str(dtype)[6:]} {device}",
        backend=backend,
        device=device,
        bytes=moved,
    )


@pytest.mark.parametrize("device,backend,shape,dtype,mode", CASES)
def test_masked_scatter_fill(bench, device, backend, shape, dtype, mode):
    if device == "cuda" and not GPU:
        pytest.skip("no CUDA GPU on this machine")
    grad = mode == "fwd+bwd"
    name, B, P, D, R = shape
    if device == "cpu":
        B = CPU_BATCH[B]
    y = torch.randn(B, R, D, device=device, dtype=dtype, requires_grad=grad)
    fill = torch.randn(D, device=device, dtype=dtype, requires_grad=grad)
    pos = torch.randn(P, D, device=device, dtype=dtype, requires_grad=grad)
    idx = torch.stack([torch.randperm(P, device=device)[:R].sort().values for _ in range(B)])
    reasons = K.get_op("masked_scatter_fill").reasons(y, idx, fill, P, pos)[backend]
    if reasons:
        pytest.skip("; ".join(reasons))
    es = y.element_size()
    moved = es * (B * R * D + B * P * D + P * D + D) + idx.numel() * idx.element_size()
    g = torch.randn(B, P, D, device=device, dtype=dtype)
    if grad:
        moved += es * (B * P * D + B * R * D + P * D + D)

        def fn():
            y.grad = fill.grad = pos.grad = None
            K.masked_scatter_fill(y, idx, fill, P, pos, backend=backend).backward(g)
    else:

        def fn():
            K.masked_scatter_fill(y, idx, fill, P, pos, backend=backend)

    shape_name = name if device == "cuda" else f"{name} (B={B} on CPU)"
    bench(
        fn,
        group=f"masked_scatter_fill {mode} {shape_name} {str(dtype)[6:]} {device}",
        backend=backend,
        device=device,
        bytes=moved,
    )


def test_device_copy(bench):
    """The ceiling: a 1 GiB device-to-device copy (bytes read + written)."""
    if not GPU:
        pytest.skip("no CUDA GPU on this machine")
    src = torch.randn(256 * 1024 * 1024 // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    bench(
        lambda: dst.copy_(src),
        group="device copy 1GiB bf16 cuda",
        backend="torch copy_",
        device="cuda",
        bytes=2 * src.numel() * src.element_size(),
    )
