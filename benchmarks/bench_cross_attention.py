"""cross_attention benchmarks: backends × shapes × dtypes, forward and forward+backward.

Columns: our ``reference``, ``triton`` and ``sdpa`` backends, and the peers (``peer=True``): every
torch SDPA backend that runs (flash, efficient, cudnn, math; called directly on the (B, H, L, Dh)
views with the (B, 1, 1, Lk) bool mask), torch's varlen attention, flash-attn and xformers when
importable (keys packed outside the timed region). A peer that cannot run a case skips with torch's
error as the reason (e.g. SDPA's flash backend takes no mask).

Rates: the VLP shapes are memory-bound, so they report GB/s against the data-movement floor
(q, k, v read once and out written once; the backward also reads q, k, v, out, dO and writes dq,
dk, dv); the long Lq = Lk = 4096 shapes report TFLOP/s of the dense problem (4·B·H·Lq·Lk·Dh forward,
2.5× that backward). Both numbers are kept in ``extra_info`` (``bytes_floor``, ``flops_dense``).

GPU dtypes: bf16 by default; ``SEMMIM_BENCH_DTYPES=bf16,fp16,fp32`` adds more. On CPU a small
text→image shape runs the reference against SDPA; GPU rows skip with the reason.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

import semmim.kernels as K

ca = importlib.import_module("semmim.kernels.cross_attention")

GPU = torch.cuda.is_available()
_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPU_DTYPES = [_DT[s.strip()] for s in os.environ.get("SEMMIM_BENCH_DTYPES", "bf16").split(",")]

# (name, B, Lq, Lk, H, Dh, padded keys)
GPU_SHAPES = [
    ("t2i B128 40x197 H12 d64", 128, 40, 197, 12, 64, False),
    ("t2i B128 40x577 H12 d64", 128, 40, 577, 12, 64, False),
    ("i2t B64 577x40pad H12 d64", 64, 577, 40, 12, 64, True),
    ("long B4 4096x4096 H16 d64", 4, 4096, 4096, 16, 64, False),
    ("long B4 4096x4096 H16 d128", 4, 4096, 4096, 16, 128, False),
]
CPU_SHAPES = [
    ("cpu t2i B4 40x197 H4 d64", 4, 40, 197, 4, 64, False),
    ("cpu i2t B4 197x40pad H4 d64", 4, 197, 40, 4, 64, True),
]
OURS = ["reference", "sdpa", "triton"]
SDPA_PEERS = ["sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math"]
OTHER_PEERS = ["torch-varlen", "flash-attn", "xformers"]


def _cases():
    for shape in CPU_SHAPES:
        for be in ["reference", "sdpa", "sdpa-flash", "sdpa-math"]:
            for mode in ["fwd", "fwd+bwd"]:
                yield pytest.param(
                    "cpu",
                    be,
                    shape,
                    torch.float32,
                    mode,
                    id=_id("cpu", be, shape, torch.float32, mode),
                )
    for shape in GPU_SHAPES:
        for dtype in GPU_DTYPES:
            for be in OURS + SDPA_PEERS + OTHER_PEERS:
                for mode in ["fwd", "fwd+bwd"]:
                    yield pytest.param(
                        "cuda", be, shape, dtype, mode, id=_id("cuda", be, shape, dtype, mode)
                    )


def _id(dev, be, shape, dtype, mode):
    return f"{dev}-{be}-{shape[0].replace(' ', '_')}-{str(dtype)[6:]}-{mode}"


def _inputs(device, shape, dtype, grad):
    name, B, Lq, Lk, H, Dh, padded = shape
    g = torch.Generator().manual_seed(0)
    # the model's layout: (B, L, H·Dh) projections viewed as (B, L, H, Dh)
    q = torch.randn(B, Lq, H * Dh, generator=g).to(device, dtype).view(B, Lq, H, Dh)
    k = torch.randn(B, Lk, H * Dh, generator=g).to(device, dtype).view(B, Lk, H, Dh)
    v = torch.randn(B, Lk, H * Dh, generator=g).to(device, dtype).view(B, Lk, H, Dh)
    for t in (q, k, v):
        t.requires_grad_(grad)
    mask = None
    if padded:  # real text lengths 8..Lk, HF-style right padding
        lens = torch.randint(min(8, Lk), Lk + 1, (B,), generator=g)
        mask = (torch.arange(Lk)[None, :] < lens[:, None]).to(device)
    return q, k, v, mask


def _sdpa_peer(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdp = {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-math": SDPBackend.MATH,
    }[backend_name]

    def make(q, k, v, mask):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh) views
        am = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, Lk)

        def run():
            with sdpa_kernel([sdp]):
                return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=am)

        return run, (q, k, v)

    return make


def _pack(q, k, v, mask):
    """(B, L, H, Dh) -> packed (total, H, Dh) and int32 cumulative lengths, outside the timing."""
    B, Lq, H, Dh = q.shape
    Lk = k.shape[1]
    dev = q.device
    qp = q.detach().reshape(B * Lq, H, Dh).requires_grad_(q.requires_grad)
    cu_q = torch.arange(0, (B + 1) * Lq, Lq, device=dev, dtype=torch.int32)
    if mask is None:
        kp = k.detach().reshape(B * Lk, H, Dh)
        vp = v.detach().reshape(B * Lk, H, Dh)
        lens = torch.full((B,), Lk, device=dev, dtype=torch.int32)
    else:
        kp, vp = k.detach()[mask], v.detach()[mask]  # right padding: real keys stay in order
        lens = mask.sum(1, dtype=torch.int32)
    cu_k = torch.zeros(B + 1, device=dev, dtype=torch.int32)
    cu_k[1:] = lens.cumsum(0)
    kp = kp.contiguous().requires_grad_(k.requires_grad)
    vp = vp.contiguous().requires_grad_(v.requires_grad)
    return qp, kp, vp, cu_q, cu_k, Lq, int(lens.max())


def _varlen_peer(q, k, v, mask):
    from torch.nn.attention.varlen import varlen_attn

    qp, kp, vp, cu_q, cu_k, max_q, max_k = _pack(q, k, v, mask)
    return (lambda: varlen_attn(qp, kp, vp, cu_q, cu_k, max_q, max_k)), (qp, kp, vp)


def _flash_attn_peer(q, k, v, mask):
    from flash_attn import flash_attn_varlen_func

    qp, kp, vp, cu_q, cu_k, max_q, max_k = _pack(q, k, v, mask)
    return (lambda: flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, max_q, max_k)), (qp, kp, vp)


def _xformers_peer(q, k, v, mask):
    from xformers.ops import fmha

    qp, kp, vp, cu_q, cu_k, max_q, max_k = _pack(q, k, v, mask)
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(
        q_seqlen=torch.diff(cu_q).tolist(), kv_seqlen=torch.diff(cu_k).tolist()
    )
    return (
        lambda: fmha.memory_efficient_attention(qp[None], kp[None], vp[None], attn_bias=bias)[0]
    ), (qp, kp, vp)


@pytest.mark.parametrize("plan", ["general", "fused"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", GPU_SHAPES[:3], ids=lambda s: s[0].replace(" ", "_"))
def test_cross_attention_cuda_bwd_plans(bench, shape, dtype, plan):
    """The triton forward+backward with the backward plan forced: the fused one-kernel backward
    ("short_k" / "short_q") against the general three-kernel one, to tune ``_bwd_plan``."""
    if not GPU:
        pytest.skip("no CUDA GPU on this machine")
    name, B, Lq, Lk, H, Dh, _ = shape
    fused = "short_k" if Lk <= 128 else "short_q" if Lq <= 64 else None
    if plan == "fused":
        if fused is None:
            pytest.skip("neither all keys nor all queries fit one tile")
        plan = fused
    q, k, v, mask = _inputs("cuda", shape, dtype, False)
    reasons = ca.supports_triton(q, k, v, mask)
    if reasons:
        pytest.skip("; ".join(reasons))
    scale = Dh**-0.5
    dout = torch.randn_like(q)

    def fn():
        out, lse = ca._fwd_impl(q, k, v, mask, scale)
        ca._bwd_impl(dout, q, k, v, mask, out, lse, scale, plan=plan)

    moved, flops = _floors(shape, q.element_size(), "fwd+bwd")
    long = name.startswith("long")
    bench(
        fn,
        group=f"cross_attention fwd+bwd {name} {str(dtype)[6:]} cuda",
        backend=f"triton[{plan}]",
        device="cuda",
        bytes=None if long else moved,
        flops=flops if long else None,
    )


def _make_fn(backend, q, k, v, mask):
    """(callable returning the output, leaf tensors to differentiate, is_peer) or pytest.skip."""
    if backend in OURS:
        reasons = K.get_op("cross_attention").reasons(q, k, v, mask)[backend]
        if reasons:
            pytest.skip("; ".join(reasons))
        return (lambda: K.cross_attention(q, k, v, mask, backend=backend)), (q, k, v), False
    if backend in SDPA_PEERS:
        run, leaves = _sdpa_peer(backend)(q, k, v, mask)
        return run, leaves, True
    module = {"torch-varlen": "torch.nn.attention.varlen", "flash-attn": "flash_attn"}.get(
        backend, "xformers"
    )
    try:
        importlib.import_module(module)
    except Exception as e:
        pytest.skip(f"{module} is not importable ({type(e).__name__})")
    if q.device.type != "cuda":
        pytest.skip(f"{backend} needs CUDA")
    maker = {"torch-varlen": _varlen_peer, "flash-attn": _flash_attn_peer}.get(
        backend, _xformers_peer
    )
    try:
        run, leaves = maker(q, k, v, mask)
    except Exception as e:  # an optional peer that cannot set up is a skip, not a failure
        pytest.skip(f"{backend}: {type(e).__name__}: {e}")
    return run, leaves, True


def _floors(shape, es, mode):
    _, B, Lq, Lk, H, Dh, _ = shape
    per = B * H * Dh * es
    moved = per * (2 * Lq + 2 * Lk)  # read q, k, v; write out
    flops = 4.0 * B * H * Lq * Lk * Dh
    if mode == "fwd+bwd":
        moved += per * (4 * Lq + 4 * Lk)  # read q, out, dO, k, v; write dq, dk, dv
        flops *= 3.5
    return moved, flops


@pytest.mark.parametrize("device,backend,shape,dtype,mode", list(_cases()))
def test_cross_attention(bench, device, backend, shape, dtype, mode):
    if device == "cuda" and not GPU:
        pytest.skip("no CUDA GPU on this machine")
    grad = mode == "fwd+bwd"
    q, k, v, mask = _inputs(device, shape, dtype, grad)
    run, leaves, peer = _make_fn(backend, q, k, v, mask)
    try:
        out = run()  # a peer backend that cannot take this case raises here
    except RuntimeError as e:
        if not peer:
            raise
        pytest.skip(f"{backend}: {str(e).splitlines()[0][:200]}")
    if grad:
        dout = torch.randn_like(out)

        def fn():
            torch.autograd.grad(run(), leaves, dout)

        try:
            fn()
        except RuntimeError as e:
            if not peer:
                raise
            pytest.skip(f"{backend} backward: {str(e).splitlines()[0][:200]}")
    else:

        def fn():
            run()

    moved, flops = _floors(shape, q.element_size(), mode)
    long = shape[0].startswith("long")
    slow = backend in ("reference", "sdpa-math") and long
    bench(
        fn,
        group=f"cross_attention {mode} {shape[0]} {str(dtype)[6:]} {device}",
        backend=backend,
        device=device,
        bytes=None if long else moved,
        flops=flops if long else None,
        peer=peer,
        rounds=5 if slow else None,
    )
    bench.benchmark.extra_info.update(bytes_floor=moved, flops_dense=flops)
