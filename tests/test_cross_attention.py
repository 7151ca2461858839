"""Tests of semmim.kernels.cross_attention (kernel 3 of SPEC.md).

Tiers: default (CPU: reference vs a naive float64 loop, gradcheck, sdpa, fuzz, bad inputs,
registry),
interpret (`TRITON_INTERPRET=1 pytest -m interpret tests/test_cross_attention.py`: Triton on CPU,
fp32/fp16, tiny shapes) and cuda (full grid, fp32/fp16/bf16).

Attention tolerance (flash-attention's rule): max|out − ref_hi| ≤ 2·max|ref_lowp − ref_hi| + floor,
3× for gradients, where ref_hi is the reference math in float64 and ref_lowp the same math run in
the inputs' dtype.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semmim.kernels import cross_attention
from semmim.kernels._common import interpret_mode, poisoned_outputs
from semmim.kernels.registry import get_op

ca = importlib.import_module("semmim.kernels.cross_attention")

needs_interpret = pytest.mark.skipif(
    not interpret_mode(),
    reason="Triton on CPU needs TRITON_INTERPRET=1 (run: TRITON_INTERPRET=1 pytest -m interpret)",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def naive_attention(q, k, v, key_mask, scale):
    """Explicit loops and an explicit softmax in float64: the definition, written out."""
    B, Lq, H, Dh = q.shape
    Lk = k.shape[1]
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(B, Lq, H, Dh, dtype=torch.float64)
    for b in range(B):
        keys = [j for j in range(Lk) if key_mask is None or bool(key_mask[b, j])]
        for h in range(H):
            for i in range(Lq):
                if not keys:
                    continue
                s = torch.stack([scale * torch.dot(q[b, i, h], k[b, j, h]) for j in keys])
                e = torch.exp(s - s.max())
                p = e / e.sum()
                out[b, i, h] = sum(p[n] * v[b, j, h] for n, j in enumerate(keys))
    return out


def make_inputs(B, Lq, Lk, H, Dh, dtype, *, masked, device="cpu", empty_row=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, Dh, generator=g, dtype=torch.float32).to(device, dtype)
    k = torch.randn(B, Lk, H, Dh, generator=g, dtype=torch.float32).to(device, dtype)
    v = torch.randn(B, Lk, H, Dh, generator=g, dtype=torch.float32).to(device, dtype)
    mask = None
    if masked:
        # HF-style padding: real lengths in [1, Lk], at least one full row
        lens = torch.randint(1, Lk + 1, (B,), generator=g)
        lens[0] = Lk
        mask = (torch.arange(Lk)[None, :] < lens[:, None]).to(device)
        if empty_row:
            mask[-1] = False
    return q, k, v, mask


def floor_for(dtype, ref):
    """A few units of rounding at the result's magnitude. fp32/fp64 get more units: there the
    low-precision reference is often exact (e.g. dk = 0 when Lk = 1), so the floor is the bound."""
    unit = {
        torch.float64: 2**-44,
        torch.float32: 2**-20,
        torch.float16: 2**-12,
        torch.bfloat16: 2**-9,
    }
    return 4 * unit[dtype] * max(1.0, ref.abs().max().item())


def assert_attention_close(name, got, ref_hi, ref_lowp, dtype, mult):
    """max|got − ref_hi| ≤ mult·max|ref_lowp − ref_hi| + floor; reports the worst element."""
    assert not torch.isnan(got).any(), f"{name}: NaN at {torch.isnan(got).nonzero()[:5].tolist()}"
    err = (got.double() - ref_hi).abs()
    base = (ref_lowp.double() - ref_hi).abs().max().item()
    bound = mult * base + floor_for(dtype, ref_hi)
    worst = err.max().item()
    if worst > bound:
        idx = tuple(int(i) for i in (err == err.max()).nonzero()[0])
        raise AssertionError(
            f"{name}: max err {worst:.3e} > bound {bound:.3e} (= {mult}×{base:.3e} + floor) at "
            f"{idx}: got {got[idx].item():.6g}, ref {ref_hi[idx].item():.6g}"
        )


def ref_and_grads(q, k, v, mask, scale, dout, compute_dtype):
    """Reference math in ``compute_dtype``: [out, dq, dk, dv], converted to float64."""
    qc, kc, vc = (t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v))
    out = ca._attention_math(qc, kc, vc, mask, scale, compute_dtype)
    grads = torch.autograd.grad(out, (qc, kc, vc), dout.to(compute_dtype))
    return [t.detach().double() for t in (out, *grads)]


def check_backend(backend, q, k, v, mask, *, check_grad=True):
    """Compare ``backend``'s output (and gradients) with float64 / low-precision reference math."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out = cross_attention(qg, kg, vg, mask, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float32).to(q.device, dtype)
    hi = ref_and_grads(q, k, v, mask, scale, dout, torch.float64)
    lo = ref_and_grads(q, k, v, mask, scale, dout, dtype)
    assert_attention_close(f"{backend} out", out.detach(), hi[0], lo[0], dtype, 2)
    if mask is not None:
        empty = ~mask.any(1)
        assert (out.detach()[empty] == 0).all(), "rows without a real key must be zeros"
    if not check_grad:
        return
    grads = torch.autograd.grad(out, (qg, kg, vg), dout)
    for name, got, h, lw in zip(("dq", "dk", "dv"), grads, hi[1:], lo[1:]):
        assert got.shape == h.shape and got.dtype == dtype
        assert_attention_close(f"{backend} {name}", got, h, lw, dtype, 3)


# --------------------------------------------------------------------------------------------
# default tier: reference, sdpa, fuzz, bad inputs, registry
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "B,Lq,Lk,H,Dh,masked,empty_row",
    [
        (2, 3, 5, 2, 8, False, False),
        (3, 4, 6, 1, 4, True, False),
        (3, 1, 7, 2, 8, True, True),
        (2, 5, 1, 2, 4, True, False),
    ],
)
def test_reference_matches_naive_loop(B, Lq, Lk, H, Dh, masked, empty_row):
    q, k, v, mask = make_inputs(B, Lq, Lk, H, Dh, torch.float64, masked=masked, empty_row=empty_row)
    scale = 0.37
    got = ca.cross_attention_reference(q, k, v, mask, scale=scale)
    torch.testing.assert_close(got, naive_attention(q, k, v, mask, scale), rtol=1e-12, atol=1e-12)
    default = ca.cross_attention_reference(q, k, v, mask)
    want = naive_attention(q, k, v, mask, Dh**-0.5)
    torch.testing.assert_close(default, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_gradcheck(backend):
    q, k, v, mask = make_inputs(3, 3, 5, 2, 4, torch.float64, masked=True, empty_row=True)
    mask[1, 0] = False  # a padded key before a real one
    ins = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: cross_attention(q, k, v, mask, backend=backend), ins
    )


def test_reference_empty_rows_zero_output_and_grads():
    q, k, v, mask = make_inputs(2, 4, 6, 2, 8, torch.float32, masked=True, empty_row=True)
    qg, kg, vg = (t.requires_grad_() for t in (q, k, v))
    out = ca.cross_attention_reference(qg, kg, vg, mask)
    assert (out[1] == 0).all() and not out.isnan().any()
    out.square().sum().backward()
    for t in (qg, kg, vg):
        assert not t.grad.isnan().any()
        assert (t.grad[1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_returns_input_dtype(dtype):
    q, k, v, mask = make_inputs(2, 3, 4, 2, 8, dtype, masked=True)
    assert ca.cross_attention_reference(q, k, v, mask).dtype == dtype


@pytest.mark.parametrize(
    "Lq,Lk,Dh,masked,empty_row",
    [
        (1, 1, 8, False, False),
        (5, 9, 16, True, False),
        (7, 3, 8, True, True),
        (40, 13, 32, True, True),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdpa_matches_reference(Lq, Lk, Dh, masked, empty_row, dtype):
    q, k, v, mask = make_inputs(3, Lq, Lk, 2, Dh, dtype, masked=masked, empty_row=empty_row)
    check_backend("sdpa", q, k, v, mask)


def test_sdpa_strided_views():
    B, L, H, Dh = 2, 6, 2, 8
    qkv = torch.randn(B, L, 3 * H * Dh)
    q, k, v = (t.view(B, L, H, Dh) for t in qkv.split(H * Dh, dim=-1))  # non-contiguous views
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    check_backend("sdpa", q, k, v, mask)


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 3),
    Lq=st.integers(1, 6),
    Lk=st.integers(1, 6),
    H=st.integers(1, 2),
    Dh=st.sampled_from([1, 3, 8]),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_reference_and_sdpa(B, Lq, Lk, H, Dh, masked, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, Dh, generator=g, dtype=torch.float64)
    k = torch.randn(B, Lk, H, Dh, generator=g, dtype=torch.float64)
    v = torch.randn(B, Lk, H, Dh, generator=g, dtype=torch.float64)
    mask = torch.rand(B, Lk, generator=g) > 0.4 if masked else None
    want = naive_attention(q, k, v, mask, Dh**-0.5)
    for backend in ("reference", "sdpa"):
        got = cross_attention(q, k, v, mask, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=backend)


def _good():
    q, k, v, mask = make_inputs(2, 3, 5, 2, 8, torch.float32, masked=True)
    return dict(q=q, k=k, v=v, key_mask=mask)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(q=a["q"][0]), "q must be 4-D"),
        (lambda a: a.update(k=a["k"][..., None]), "k must be 4-D"),
        (lambda a: a.update(v=a["v"][:, :4]), "k and v must have the same shape"),
        (lambda a: a.update(q=a["q"][:, :, :1]), "head mismatch"),
        (lambda a: a.update(q=a["q"][..., :4]), "head dim mismatch"),
        (lambda a: a.update(q=a["q"][:1]), "batch mismatch"),
        (lambda a: a.update(q=a["q"].half()), "share a dtype"),
        (lambda a: a.update(q=a["q"].int(), k=a["k"].int(), v=a["v"].int()), "q must be float"),
        (lambda a: a.update(key_mask=a["key_mask"].int()), "key_mask must be bool"),
        (lambda a: a.update(key_mask=a["key_mask"][:, :4]), "key_mask must have shape"),
        (lambda a: a.update(key_mask=a["key_mask"][None]), "key_mask must have shape"),
        (lambda a: a.update(key_mask=[True] * 5), "key_mask must be a bool tensor"),
        (lambda a: a.update(scale=float("nan")), "scale must be"),
        (lambda a: a.update(q=a["q"].to("meta")), "one device"),
    ],
)
@pytest.mark.parametrize("backend", [None, "reference", "sdpa", "triton"])
def test_bad_inputs_raise_value_error(change, match, backend):
    args = _good()
    change(args)
    scale = args.pop("scale", None)
    with pytest.raises(ValueError, match=match):
        cross_attention(
            args["q"], args["k"], args["v"], args["key_mask"], scale=scale, backend=backend
        )


# ------------------------------------------------------------------ masked slots hold garbage
def check_garbage_in_masked_slots(backend, dtype=torch.float32, device="cpu", Lq=6, Lk=11, Dh=32):
    """NaN / inf stored in masked-out key AND value slots (issue 10 §8) take no part in the
    math: output and gradients equal those of the same inputs with zeros there, padded keys get
    zero gradients, and a row with no real key still outputs zeros."""
    q, k, v, mask = make_inputs(3, Lq, Lk, 2, Dh, dtype, masked=True, empty_row=True, device=device)
    mask[0, 2] = False  # a hole between real keys
    junk = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    results = []
    for fill in (None, "nan", "inf", "-inf"):
        kk, vv = k.clone(), v.clone()
        if fill is not None:
            kk[~mask] = junk[fill]
            vv[~mask] = junk[fill] if fill != "inf" else float("nan")
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, kk, vv))
        out = cross_attention(qg, kg, vg, mask, backend=backend)
        out.backward(do)
        results.append((fill, out, qg.grad, kg.grad, vg.grad))
    _, *clean = results[0]
    for fill, *got in results[1:]:
        for name, g, c in zip(("out", "dq", "dk", "dv"), got, clean):
            assert bool(g.isfinite().all()), f"{backend} {fill}: {name} not finite"
            # same inputs after masking: bit-identical, except that on a GPU torch's SDPA
            # kernels may accumulate in a run-dependent order
            tol = {} if device == "cuda" and backend != "triton" else {"rtol": 0, "atol": 0}
            torch.testing.assert_close(g, c, **tol, msg=f"{backend} {fill}: {name}")
        dk, dv = got[2], got[3]
        assert (dk[~mask] == 0).all() and (dv[~mask] == 0).all(), "padded keys get zero grads"
        assert (got[0][-1] == 0).all(), "a row without a real key outputs zeros"


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_garbage_in_masked_key_value_slots(backend, dtype):
    check_garbage_in_masked_slots(backend, dtype)


def test_autocast_mixed_dtypes_are_cast():
    q, k, v, mask = make_inputs(2, 3, 5, 2, 32, torch.float32, masked=True)
    with pytest.raises(ValueError, match="share a dtype"):
        cross_attention(q.bfloat16(), k, v, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cross_attention(q.bfloat16(), k, v, mask)
    assert out.dtype == torch.bfloat16
    want = cross_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert torch.equal(out, want)


def test_registry_reasons(monkeypatch):
    monkeypatch.delenv("SEMMIM_BACKEND", raising=False)
    q, k, v, mask = make_inputs(2, 3, 5, 2, 32, torch.float32, masked=True)
    op = get_op("cross_attention")
    assert set(op.backends) == {"reference", "sdpa", "triton"}
    assert [b.name for b in op.ordered()] == ["triton", "sdpa", "reference"]
    assert ca.supports_reference(q, k, v, mask) == []
    assert ca.supports_sdpa(q, k, v, mask) == []
    q48 = torch.randn(2, 3, 2, 48)
    assert any("Dh=48" in r for r in ca.supports_triton(q48, q48, q48))
    q64 = q.double()
    assert any("float64" in r for r in ca.supports_triton(q64, q64, q64))
    if not interpret_mode():
        assert any("CUDA" in r for r in ca.supports_triton(q, k, v, mask))
        assert op.select(None, q, k, v, mask).name == "sdpa"  # CPU auto-dispatch
        with pytest.raises(NotImplementedError, match="triton"):
            cross_attention(q, k, v, mask, backend="triton")
        monkeypatch.setenv("SEMMIM_BACKEND", "reference")
        assert op.select(None, q, k, v, mask).name == "reference"


def test_example_inputs_run_everywhere_they_can():
    op = get_op("cross_attention")
    args, kwargs = op.example(torch.device("cpu"))
    outs = {}
    for name, why in op.reasons(*args, **kwargs).items():
        if not why:
            outs[name] = cross_attention(*args, **kwargs, backend=name)
    assert "reference" in outs and "sdpa" in outs
    for name, out in outs.items():
        torch.testing.assert_close(out, outs["reference"], rtol=1e-5, atol=1e-5, msg=name)


# The sm_90 compile check of every tile the launchers can pick (no GPU needed) lives in
# tests/test_triton_compiles.py::test_every_launcher_config_compiles_for_sm90_without_spills.


# --------------------------------------------------------------------------------------------
# interpret tier: the Triton kernels on CPU (fp32 / fp16, tiny shapes)
# --------------------------------------------------------------------------------------------
INTERPRET_SHAPES = [
    # (Lq, Lk, Dh, masked, empty_row)
    (1, 1, 32, False, False),
    (1, 9, 64, True, False),
    (9, 1, 32, True, True),
    (5, 7, 32, True, True),
    (17, 40, 80, True, False),
    (40, 24, 128, True, True),
    (70, 20, 64, False, False),  # two query blocks in the fp32 backward
    (12, 150, 32, True, False),  # several key blocks: online softmax rescaling
    (70, 80, 32, True, False),  # both sides longer than a tile: the general backward
]


@pytest.mark.interpret
@needs_interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Lq,Lk,Dh,masked,empty_row", INTERPRET_SHAPES)
def test_triton_interpret_matches_reference(Lq, Lk, Dh, masked, empty_row, dtype):
    q, k, v, mask = make_inputs(2, Lq, Lk, 2, Dh, dtype, masked=masked, empty_row=empty_row)
    check_backend("triton", q, k, v, mask)


@pytest.mark.interpret
@needs_interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_interpret_masked_key_blocks(dtype):
    """Whole key blocks padded (the first and a middle one): the running max starts at −inf."""
    q, k, v, _ = make_inputs(2, 10, 150, 2, 32, dtype, masked=False)
    mask = torch.ones(2, 150, dtype=torch.bool)
    mask[0, :70] = False  # the first 64-key block and more: the running max starts at −inf
    mask[1, 64:128] = False  # a middle block fully padded
    check_backend("triton", q, k, v, mask)


@pytest.mark.interpret
@needs_interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_interpret_strided_views(dtype):
    """q, k, v as views of packed projections (B, L, 2·H·Dh): strides passed, no copies."""
    B, Lq, Lk, H, Dh = 2, 9, 13, 2, 80
    g = torch.Generator().manual_seed(3)
    xq = torch.randn(B, Lq, 2 * H * Dh, generator=g).to(dtype)
    kv = torch.randn(B, Lk, 2 * H * Dh, generator=g).to(dtype)
    q = xq[..., H * Dh :].view(B, Lq, H, Dh)
    k, v = (t.view(B, Lk, H, Dh) for t in kv.split(H * Dh, dim=-1))
    assert not q.is_contiguous() and not k.is_contiguous()
    mask = torch.ones(B, Lk, dtype=torch.bool)
    mask[1, 5:] = False
    check_backend("triton", q, k, v, mask)
    # a head-major layout (B, H, L, Dh) transposed to (B, L, H, Dh)
    qt = torch.randn(B, H, Lq, Dh, generator=g).to(dtype).transpose(1, 2)
    check_backend("triton", qt, k, v, mask)
    # a mask that is not contiguous along the keys: (B, 1) expanded
    check_backend("triton", q, k, v, torch.tensor([[True], [False]]).expand(B, Lk))


@pytest.mark.interpret
@needs_interpret
@pytest.mark.parametrize("plan", ["short_k", "short_q", "general"])
@pytest.mark.parametrize(
    "Lq,Lk,Dh,dtype",
    [(5, 7, 32, torch.float32), (17, 40, 80, torch.float16), (33, 20, 128, torch.float32)],
)
def test_triton_interpret_backward_plans_write_every_element(Lq, Lk, Dh, dtype, plan):
    """Each backward plan vs the reference, into NaN-poisoned buffers: every element of out, lse,
    dq, dk, dv must be written; padded keys and rows without a real key get zero gradients."""
    q, k, v, mask = make_inputs(2, Lq, Lk, 2, Dh, dtype, masked=True, empty_row=True)
    mask[0, 1] = False  # a padded key between real ones
    B, H = q.shape[0], q.shape[2]
    scale = Dh**-0.5
    with poisoned_outputs():  # NaN-filled buffers: every element must be written
        out, lse = ca._fwd_impl(q, k, v, mask, scale)
    assert out.shape == q.shape and lse.shape == (B, H, Lq)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.isinf(lse[-1]).all() and (out[-1] == 0).all()
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    with poisoned_outputs():
        dq, dk, dv = ca._bwd_impl(do, q, k, v, mask, out, lse, scale, plan=plan)
    hi = ref_and_grads(q, k, v, mask, scale, do, torch.float64)
    lo = ref_and_grads(q, k, v, mask, scale, do, dtype)
    assert_attention_close("out", out, hi[0], lo[0], dtype, 2)
    for name, got, h, lw in zip(("dq", "dk", "dv"), (dq, dk, dv), hi[1:], lo[1:]):
        assert_attention_close(f"{plan} {name}", got, h, lw, dtype, 3)
    assert (dk[~mask] == 0).all() and (dv[~mask] == 0).all(), "padded keys get zero grads"
    assert (dq[-1] == 0).all(), "queries without a real key get zero grads"


@pytest.mark.interpret
@needs_interpret
@pytest.mark.parametrize("Lq,Lk,Dh", [(6, 11, 32), (70, 40, 64), (5, 150, 80)])
def test_triton_interpret_garbage_in_masked_slots(Lq, Lk, Dh):
    check_garbage_in_masked_slots("triton", torch.float32, Lq=Lq, Lk=Lk, Dh=Dh)


@pytest.mark.interpret
@needs_interpret
def test_triton_interpret_lse_and_scale():
    q, k, v, mask = make_inputs(2, 6, 11, 2, 64, torch.float32, masked=True)
    out, lse = ca._fwd_op(q, k, v, mask, 0.3)
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * 0.3
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)
    check = ca.cross_attention_reference(q, k, v, mask, scale=0.3)
    torch.testing.assert_close(out, check, rtol=1e-5, atol=1e-5)


@pytest.mark.interpret
@needs_interpret
def test_triton_interpret_opcheck():
    q, k, v, mask = make_inputs(2, 5, 7, 2, 32, torch.float32, masked=True, empty_row=True)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(ca._fwd_op, (qg, kg, vg, mask, 0.2))
    torch.library.opcheck(ca._fwd_op, (qg, kg, vg, None, 0.2))
    out, lse = ca._fwd_op(q, k, v, mask, 0.2)
    torch.library.opcheck(ca._bwd_op, (torch.randn_like(out), q, k, v, mask, out, lse, 0.2))


@pytest.mark.interpret
@needs_interpret
def test_triton_interpret_auto_dispatch_picks_triton(monkeypatch):
    monkeypatch.delenv("SEMMIM_BACKEND", raising=False)
    q, k, v, mask = make_inputs(2, 3, 5, 2, 32, torch.float32, masked=True)
    assert get_op("cross_attention").select(None, q, k, v, mask).name == "triton"
    qb = q.bfloat16()
    assert any("bf16" in r for r in ca.supports_triton(qb, qb, qb))


# --------------------------------------------------------------------------------------------
# cuda tier: every backend × fp32/fp16/bf16 × the shape catalog, forward and backward
# --------------------------------------------------------------------------------------------
# (B, Lq, Lk, H, masked, empty_row): the VLP shapes and awkward ones
CUDA_SHAPES = [
    (2, 1, 1, 3, False, False),
    (2, 197, 7, 2, True, False),
    (2, 49, 77, 2, True, True),
    (2, 300, 260, 2, True, False),  # both sides longer than a tile: general backward
    (1, 1024, 1024, 2, False, False),
    (2, 25, 577, 3, False, False),
]
_CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cuda_cases():
    """Every (dtype, Dh) pair once, on a rotating shape, plus the model's shapes in bf16: the
    grid's coverage at a fraction of its Triton compile time on the shared GPU check."""
    cases = []
    for i, (dtype, Dh) in enumerate((d, h) for d in _CUDA_DTYPES for h in (32, 64, 80, 128)):
        cases.append((*CUDA_SHAPES[i % len(CUDA_SHAPES)], Dh, dtype))
    cases += [
        (3, 40, 197, 4, False, False, 64, torch.bfloat16),  # text→image
        (3, 577, 40, 4, True, True, 64, torch.bfloat16),  # image→text, padded text keys
        (2, 40, 577, 3, True, False, 80, torch.float16),
    ]
    return [
        pytest.param(*c, id=f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-d{c[6]}-{str(c[7])[6:]}"
                     + ("-mask" if c[4] else "") + ("-emptyrow" if c[5] else ""))
        for c in cases
    ]  # fmt: skip


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("B,Lq,Lk,H,masked,empty_row,Dh,dtype", _cuda_cases())
def test_cuda_matches_reference(B, Lq, Lk, H, masked, empty_row, Dh, dtype, backend):
    q, k, v, mask = make_inputs(
        B, Lq, Lk, H, Dh, dtype, masked=masked, empty_row=empty_row, device="cuda"
    )
    check_backend(backend, q, k, v, mask)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(
    "plan,Lq,Lk,Dh,dtype",
    [
        ("short_k", 577, 40, 64, torch.bfloat16),
        ("short_k", 197, 100, 64, torch.float16),
        ("short_k", 50, 30, 128, torch.float16),
        ("short_q", 40, 577, 64, torch.bfloat16),
        ("short_q", 33, 197, 80, torch.float16),
        ("general", 577, 40, 64, torch.bfloat16),
        ("general", 40, 577, 128, torch.float32),
    ],
)
def test_cuda_backward_plans(plan, Lq, Lk, Dh, dtype):
    """Each backward plan forced (auto-selection depends on B·H vs the SM count)."""
    q, k, v, mask = make_inputs(3, Lq, Lk, 2, Dh, dtype, masked=True, empty_row=True, device="cuda")
    scale = Dh**-0.5
    out, lse = ca._fwd_impl(q, k, v, mask, scale)
    do = torch.randn_like(q)
    with poisoned_outputs():
        dq, dk, dv = ca._bwd_impl(do, q, k, v, mask, out, lse, scale, plan=plan)
    hi = ref_and_grads(q, k, v, mask, scale, do, torch.float64)
    lo = ref_and_grads(q, k, v, mask, scale, do, dtype)
    assert_attention_close("out", out, hi[0], lo[0], dtype, 2)
    for name, got, h, lw in zip(("dq", "dk", "dv"), (dq, dk, dv), hi[1:], lo[1:]):
        assert_attention_close(f"{plan} {name}", got, h, lw, dtype, 3)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "sdpa", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Lq,Lk,Dh", [(6, 11, 32), (577, 40, 64), (40, 577, 128)])
def test_cuda_garbage_in_masked_slots(backend, dtype, Lq, Lk, Dh):
    check_garbage_in_masked_slots(backend, dtype, device="cuda", Lq=Lq, Lk=Lk, Dh=Dh)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_strided_views(dtype):
    B, Lq, Lk, H, Dh = 4, 577, 40, 12, 64
    xq = torch.randn(B, Lq, 3 * H * Dh, device="cuda", dtype=dtype)
    xkv = torch.randn(B, Lk, 2 * H * Dh, device="cuda", dtype=dtype)
    q = xq[..., H * Dh : 2 * H * Dh].view(B, Lq, H, Dh)
    k, v = (t.view(B, Lk, H, Dh) for t in xkv.split(H * Dh, dim=-1))
    mask = (
        torch.arange(Lk, device="cuda")[None, :]
        < torch.tensor([40, 8, 23, 1], device="cuda")[:, None]
    )
    check_backend("triton", q, k, v, mask)


@pytest.mark.cuda
@needs_cuda
def test_cuda_opcheck_and_compile():
    q, k, v, mask = make_inputs(2, 40, 197, 4, 64, torch.float16, masked=True, device="cuda")
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(ca._fwd_op, (qg, kg, vg, mask, 0.125))
    out, lse = ca._fwd_op(q, k, v, mask, 0.125)
    torch.library.opcheck(ca._bwd_op, (torch.randn_like(out), q, k, v, mask, out, lse, 0.125))
    f = torch.compile(
        lambda q, k, v: cross_attention(q, k, v, mask, backend="triton"), fullgraph=True
    )
    eager = cross_attention(qg, kg, vg, mask, backend="triton")
    ge = torch.autograd.grad(eager.float().square().sum(), (qg, kg, vg))
    comp = f(qg, kg, vg)
    gc = torch.autograd.grad(comp.float().square().sum(), (qg, kg, vg))
    torch.testing.assert_close(comp, eager)  # the same kernels: equal up to fp16 rounding
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
@needs_cuda
def test_cuda_backward_is_deterministic():
    q, k, v, mask = make_inputs(4, 577, 40, 4, 64, torch.bfloat16, masked=True, device="cuda")
    runs = []
    for _ in range(2):
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = cross_attention(qg, kg, vg, mask, backend="triton")
        runs.append(torch.autograd.grad(out.float().sum(), (qg, kg, vg)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_math_constants():
    assert math.isclose(ca._LOG2E, 1 / math.log(2), rel_tol=1e-15)
