"""masked_gather / masked_scatter_fill: reference vs naive loops, every backend vs reference
(bit-exact forward and grad_x/grad_y; grad_pos/grad_fill within the summation-order bound),
input errors, registry dispatch, custom-op checks."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import semmim.kernels as K

mg = importlib.import_module("semmim.kernels.masked_gather")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDX_DTYPES = [torch.int32, torch.int64]
# (P, D, R): awkward sizes from CONTRIBUTING.md (P=1, 49, 196, 197, 576; D=1, 72, 80, 768; R=1, R=P)
SHAPES = [
    (1, 1, 1),
    (1, 72, 1),
    (49, 72, 1),
    (49, 80, 24),
    (49, 1, 49),
    (196, 768, 98),
    (197, 80, 197),
    (576, 72, 288),
    (576, 768, 1),
    (196, 1, 100),
]


def make_index(B: int, P: int, R: int, dtype=torch.int64, device="cpu", sort=False):
    rows = [torch.randperm(P)[:R] for _ in range(B)]
    idx = torch.stack(rows)
    if sort:
        idx = idx.sort(dim=1).values
    return idx.to(dtype=dtype, device=device)


def naive_gather(x, index, pos):
    B, R = index.shape
    out = torch.empty(B, R, x.shape[2], dtype=x.dtype)
    for b in range(B):
        for r in range(R):
            p = int(index[b, r])
            out[b, r] = x[b, p] + pos[p] if pos is not None else x[b, p]
    return out


def naive_scatter(y, index, fill, P, pos):
    B, R, D = y.shape
    out = torch.empty(B, P, D, dtype=y.dtype)
    for b in range(B):
        for p in range(P):
            out[b, p] = fill
        for r in range(R):
            out[b, int(index[b, r])] = y[b, r]
        if pos is not None:
            out[b] = out[b] + pos
    return out


def sum_bound(dtype: torch.dtype, count: int, grads: torch.Tensor) -> torch.Tensor:
    """|fast - ref| bound for a sum of `count` terms in different order, each rounded to dtype."""
    eps = torch.finfo(dtype).eps
    return (count + 2) * eps * grads + torch.finfo(dtype).tiny


# ------------------------------------------------------------------ reference is the spec


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_pos", [False, True])
def test_reference_matches_naive_loop(dtype, with_pos):
    B, P, D, R = 3, 10, 5, 4
    x = torch.randn(B, P, D, dtype=dtype)
    pos = torch.randn(P, D, dtype=dtype) if with_pos else None
    idx = make_index(B, P, R)
    assert torch.equal(mg.masked_gather_reference(x, idx, pos), naive_gather(x, idx, pos))
    y, fill = torch.randn(B, R, D, dtype=dtype), torch.randn(D, dtype=dtype)
    got = mg.masked_scatter_fill_reference(y, idx, fill, P, pos)
    assert torch.equal(got, naive_scatter(y, idx, fill, P, pos))


def test_reference_gradcheck():
    B, P, D, R = 2, 6, 3, 4
    idx = make_index(B, P, R)
    x = torch.randn(B, P, D, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(P, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: mg.masked_gather_reference(a, idx, b), (x, pos))
    y = torch.randn(B, R, D, dtype=torch.float64, requires_grad=True)
    fill = torch.randn(D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, f, p: mg.masked_scatter_fill_reference(a, idx, f, P, p), (y, fill, pos)
    )


# ------------------------------------------------------------------ backends vs reference


def check_backend(
    backend, dtype, idx_dtype, B, P, D, R, device="cpu", strided=False, with_pos=True
):
    """Forward bit-exact; grad_x / grad_y bit-exact; grad_pos / grad_fill within sum_bound.
    ``with_pos=False`` calls both ops without ``pos`` (no grad_pos to compare)."""
    if strided == "conv":  # the patch embedding: a (B, D, P) conv output transposed, (PD, 1, P)
        x0 = torch.randn(B, D, P, dtype=dtype, device=device).transpose(1, 2)
        y0 = torch.randn(B, D, R, dtype=dtype, device=device).transpose(1, 2)
    elif strided:  # last dim contiguous, other strides not: a slice of a wider, longer tensor
        x0 = torch.randn(B, P + 3, D + 5, dtype=dtype, device=device)[:, 2 : 2 + P, 1 : 1 + D]
        y0 = torch.randn(B, R + 2, D + 7, dtype=dtype, device=device)[:, 1 : 1 + R, :D]
    else:
        x0 = torch.randn(B, P, D, dtype=dtype, device=device)
        y0 = torch.randn(B, R, D, dtype=dtype, device=device)
    pos0 = torch.randn(P, D, dtype=dtype, device=device)
    fill0 = torch.randn(D, dtype=dtype, device=device)
    idx = make_index(B, P, R, idx_dtype, device)
    g_gather = torch.randn(B, R, D, dtype=dtype, device=device)
    g_scatter = torch.randn(B, P, D, dtype=dtype, device=device)

    results = {}
    for be in ("reference", backend):
        x = x0.detach().clone().requires_grad_() if not strided else x0.detach().requires_grad_()
        pos = pos0.detach().clone().requires_grad_() if with_pos else None
        out = K.masked_gather(x, idx, pos, backend=be)
        out.backward(g_gather)
        y = y0.detach().clone().requires_grad_() if not strided else y0.detach().requires_grad_()
        fill = fill0.detach().clone().requires_grad_()
        pos2 = pos0.detach().clone().requires_grad_() if with_pos else None
        out2 = K.masked_scatter_fill(y, idx, fill, P, pos2, backend=be)
        out2.backward(g_scatter)
        grads_pos = (pos.grad, pos2.grad) if with_pos else (None, None)
        results[be] = (out, x.grad, grads_pos[0], out2, y.grad, fill.grad, grads_pos[1])
        if strided:
            x0.grad = None
            y0.grad = None

    ref, got = results["reference"], results[backend]
    names = ("gather out", "grad_x", "grad_pos", "scatter out", "grad_y", "grad_fill", "grad_pos2")
    for name, r, g in zip(names, ref, got):
        if r is None and g is None and not with_pos:
            continue
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert not torch.isnan(g).any(), f"{name}: NaN (unwritten output?)"
        if name in ("grad_pos", "grad_fill", "grad_pos2"):
            count = B if name != "grad_fill" else B * P
            src = g_gather if name == "grad_pos" else g_scatter
            scale = src.float().abs().sum() if name == "grad_fill" else src.float().abs().amax()
            bound = sum_bound(dtype, count, scale * count)
            err = (g.float() - r.float()).abs().max()
            assert err <= bound, f"{name}: max err {err} > bound {bound}"
        else:
            if not torch.equal(g, r):
                bad = (g != r).nonzero()[:5].tolist()
                raise AssertionError(f"{name} not bit-exact at {bad}")


@pytest.mark.parametrize("P,D,R", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES)
def test_cpu_backend_matches_reference(P, D, R, dtype, idx_dtype, poison):
    check_backend("cpu", dtype, idx_dtype, 2, P, D, R)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [True, "conv"])
def test_cpu_backend_strided_inputs(dtype, strided, poison):
    check_backend("cpu", dtype, torch.int64, 3, 49, 72, 20, strided=strided)


def test_empty_batch_backward_gives_zero_grads(poison):
    """B = 0: grad_pos and grad_fill are zeros (no rows to sum), never uninitialised memory."""
    check_empty_batch("cpu")


def check_empty_batch(backend, device="cpu"):
    x = torch.randn(0, 9, 4, device=device, requires_grad=True)
    pos = torch.randn(9, 4, device=device, requires_grad=True)
    idx = torch.zeros(0, 5, dtype=torch.int64, device=device)
    out = K.masked_gather(x, idx, pos, backend=backend)
    assert out.shape == (0, 5, 4)
    out.sum().backward()
    assert torch.equal(pos.grad, torch.zeros_like(pos)) and x.grad.shape == x.shape
    y = torch.randn(0, 5, 4, device=device, requires_grad=True)
    fill = torch.randn(4, device=device, requires_grad=True)
    pos2 = pos.detach().clone().requires_grad_()
    out2 = K.masked_scatter_fill(y, idx, fill, 9, pos2, backend=backend)
    assert out2.shape == (0, 9, 4)
    out2.sum().backward()
    assert torch.equal(fill.grad, torch.zeros_like(fill))
    assert torch.equal(pos2.grad, torch.zeros_like(pos2))


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 4),
    P=st.integers(1, 40),
    D=st.integers(1, 40),
    frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    idx_dtype=st.sampled_from(IDX_DTYPES),
    strided=st.booleans(),
)
def test_cpu_backend_fuzz(B, P, D, frac, dtype, idx_dtype, strided):
    R = max(1, round(frac * P))
    check_backend("cpu", dtype, idx_dtype, B, P, D, R, strided=strided)


def test_backward_chunked_column_pass_cpu(monkeypatch, poison):
    """The batch-chunked partial sums (used on GPUs) give the same result as one chunk."""
    monkeypatch.setattr(mg, "_num_chunks", lambda B, P, D, device: 3)
    check_backend("cpu", torch.float32, torch.int64, 7, 49, 72, 20)


def test_only_needed_gradients(poison):
    x = torch.randn(2, 9, 4, requires_grad=True)
    pos = torch.randn(9, 4)  # no grad wanted
    idx = make_index(2, 9, 5)
    K.masked_gather(x, idx, pos, backend="cpu").sum().backward()
    assert x.grad is not None and pos.grad is None
    y = torch.randn(2, 5, 4)
    fill = torch.randn(4, requires_grad=True)
    K.masked_scatter_fill(y, idx, fill, 9, backend="cpu").sum().backward()
    assert torch.allclose(fill.grad, torch.full((4,), 2.0 * 4))  # 2 rows x 4 dropped slots


def test_empty_and_full_keep():
    x = torch.randn(2, 5, 3)
    idx = torch.arange(5).expand(2, 5)
    for be in ("reference", "cpu"):
        assert torch.equal(K.masked_gather(x, idx, backend=be), x)
        y = K.masked_scatter_fill(x, idx, torch.zeros(3), 5, backend=be)
        assert torch.equal(y, x)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_inputs_raise_value_error(backend):
    x = torch.randn(2, 8, 4)
    idx = make_index(2, 8, 3)
    pos = torch.randn(8, 4)
    cases = [
        ((torch.randn(8, 4), idx), "x must be"),
        ((x, idx[0]), "index must be"),
        ((x, idx[:1]), "batch"),
        ((x, idx.float()), "int32 or int64"),
        ((x, idx + 8), r"\[0, 8\)"),
        ((x, idx - 9), r"\[0, 8\)"),
        ((x, idx, torch.randn(7, 4)), "pos must be"),
        ((x, idx, pos.half()), "dtype"),
        ((x.int(), idx), "float32, float16 or bfloat16"),
        ((x, idx.to("meta")), "one device"),
        ((x, [[0, 1], [2, 3]]), "index must be a .*tensor, got list"),
        ((x, idx, [[0.0] * 4] * 8), "pos must be"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            K.masked_gather(*args, backend=backend)
    y, fill = torch.randn(2, 3, 4), torch.randn(4)
    scases = [
        ((y[0], idx, fill, 8), "y must be"),
        ((y, idx, torch.randn(5), 8), "fill must be"),
        ((y, idx, fill.half(), 8), "fill dtype"),
        ((y, idx, fill, 0), "num_patches"),
        ((y, idx, fill, 2), "R=3"),
        ((y, idx[:, :2], fill, 8), "does not match"),
        ((y, idx, fill, 8, torch.randn(8, 5)), "pos must be"),
        ((y, torch.tensor([[1, 1, 2], [0, 1, 2]]), fill, 8), "unique"),
        ((y, torch.tensor([[1, 9, 2], [0, 1, 2]]), fill, 8), r"\[0, 8\)"),
        ((y, [[0, 1, 2]] * 2, fill, 8), "index must be"),
        ((y, idx, 1.0, 8), "fill must be"),
    ]
    for args, msg in scases:
        with pytest.raises(ValueError, match=msg):
            K.masked_scatter_fill(*args, backend=backend)


def test_duplicate_index_detected():
    """validate=True rejects duplicates up front (one host sync with the range check); with
    validate=False the C++ CPU kernels still detect them where the inverse map is built (gather
    backward, scatter forward), so the gradient is never silently wrong."""
    x = torch.randn(2, 8, 4, requires_grad=True)
    idx = torch.tensor([[1, 1, 2], [0, 1, 2]])
    for be in ("reference", "cpu"):
        with pytest.raises(ValueError, match="unique"):
            K.masked_gather(x, idx, backend=be)
    out = K.masked_gather(x, idx, backend="cpu", validate=False)  # forward is well defined
    assert torch.equal(out, mg._gather_reference(x, idx, None))
    with pytest.raises(ValueError, match="unique"):
        out.sum().backward()
    y, fill = torch.randn(2, 3, 4), torch.randn(4)
    with pytest.raises(ValueError, match="unique"):
        K.masked_scatter_fill(y, idx, fill, 8, backend="cpu", validate=False)


def test_custom_ops_called_directly_check_the_index():
    """torch.ops.semmim.*_cpu skip the public op's validation, so the C++ kernels bounds-check
    every entry: out of range raises (never uninitialised rows), and the scatter op reports it as
    out of range, not as a duplicate."""
    x, y, fill = torch.randn(2, 8, 4), torch.randn(2, 3, 4), torch.randn(4)
    for bad in (torch.tensor([[0, 8, 2], [1, 2, 3]]), torch.tensor([[0, 1, 2], [-1, 2, 3]])):
        with pytest.raises(ValueError, match=r"must lie in \[0, 8\)"):
            torch.ops.semmim.masked_gather_cpu(x, bad, None)
        with pytest.raises(ValueError, match=r"must lie in \[0, 8\)"):
            torch.ops.semmim.masked_scatter_fill_cpu(y, bad, fill, 8, None)
        for be in ("cpu", "reference"):
            with pytest.raises(ValueError, match=r"\[0, 8\)"):
                K.masked_gather(x, bad, backend=be)
        with pytest.raises(ValueError, match=r"must lie in \[0, 8\)"):  # validate=False: C++
            K.masked_gather(x, bad, backend="cpu", validate=False)
    dup = torch.tensor([[0, 0, 2], [1, 2, 3]])
    with pytest.raises(ValueError, match="unique"):
        torch.ops.semmim.masked_scatter_fill_cpu(y, dup, fill, 8, None)


def test_validate_false_reads_no_tensor_values(monkeypatch):
    """COMMON §1: validate=False makes no device->host read (tolist/item/int/bool/float/nonzero)
    in any op, forward and backward; validate=True does read (the checks are real)."""
    x = torch.randn(2, 8, 4, requires_grad=True)
    pos = torch.randn(8, 4, requires_grad=True)
    idx = make_index(2, 8, 3)
    y, fill = torch.randn(2, 3, 4, requires_grad=True), torch.randn(4, requires_grad=True)
    patch, text = torch.randn(2, 10, 8), torch.randn(2, 8)
    q, kv = torch.randn(2, 3, 2, 32, requires_grad=True), torch.randn(2, 5, 2, 32)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])

    def run_all(validate, backends):
        for be in backends:
            out = K.masked_gather(x, idx, pos, backend=be, validate=validate)
            out2 = K.masked_scatter_fill(y, idx, fill, 8, pos, backend=be, validate=validate)
            (out.sum() + out2.sum()).backward()
            K.topk_mask(patch, text, 3, backend=be, validate=validate)
        for be in ("reference", "sdpa"):
            K.cross_attention(q, kv, kv, mask, backend=be, validate=validate).sum().backward()

    reads = []

    def host_read(name):
        def f(self, *a, **k):
            reads.append(name)
            raise AssertionError(f"host read: Tensor.{name}")

        return f

    backends = ["reference"] + (["cpu"] if mg.extension() is not None else [])
    names = ("tolist", "item", "__int__", "__bool__", "__float__", "__index__", "nonzero")
    for name in names:
        monkeypatch.setattr(torch.Tensor, name, host_read(name))
    run_all(False, backends)
    assert reads == []
    with pytest.raises(AssertionError, match="host read"):
        K.masked_gather(x, idx, pos, backend="reference")  # validate=True reads the range
    monkeypatch.undo()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_autocast_casts_pos_and_fill(backend):
    """COMMON §3: under autocast pos/fill (fp32 parameters) are cast to the input's dtype,
    differentiably; outside autocast a mismatch stays a ValueError."""
    x = torch.randn(2, 8, 4).bfloat16()
    pos = torch.randn(8, 4, requires_grad=True)
    fill = torch.randn(4, requires_grad=True)
    idx = make_index(2, 8, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = K.masked_gather(x, idx, pos, backend=backend)
        out2 = K.masked_scatter_fill(out, idx, fill, 8, pos, backend=backend)
    assert out.dtype == out2.dtype == torch.bfloat16
    assert torch.equal(out, K.masked_gather(x, idx, pos.bfloat16(), backend=backend))
    out2.float().sum().backward()
    assert pos.grad.dtype == fill.grad.dtype == torch.float32
    assert torch.equal(fill.grad, torch.full((4,), 2.0 * 5))  # 2 rows x 5 dropped slots
    with pytest.raises(ValueError, match="pos dtype torch.float32 != input dtype"):
        K.masked_gather(x, idx, pos, backend=backend)
    with pytest.raises(ValueError, match="fill dtype torch.float32 != y dtype"):
        K.masked_scatter_fill(out, idx, fill, 8, backend=backend)


def test_record_dispatch_nested():
    x, idx = torch.randn(2, 8, 4), make_index(2, 8, 3)
    with K.record_dispatch() as outer:
        K.masked_gather(x, idx, backend="reference")
        with K.record_dispatch() as inner:
            K.masked_gather(x, idx, backend="cpu")
            K.masked_scatter_fill(x[:, :3], idx, torch.zeros(4), 8, backend="reference")
    assert inner == {"masked_gather": {"cpu"}, "masked_scatter_fill": {"reference"}}
    assert outer == {"masked_gather": {"reference", "cpu"}, "masked_scatter_fill": {"reference"}}
    K.masked_gather(x, idx)  # outside: recorded nowhere
    assert outer["masked_gather"] == {"reference", "cpu"}


# ------------------------------------------------------------------ registry and custom ops


def test_registry_dispatch_and_reasons(monkeypatch):
    x, idx = torch.randn(2, 8, 4), make_index(2, 8, 3)
    op = K.get_op("masked_gather")
    monkeypatch.delenv("SEMMIM_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert op.select(None, x, idx).name == "cpu"
    reasons = op.reasons(x, idx)
    assert reasons["cpu"] == [] and reasons["reference"] == []
    assert any("CUDA" in r for r in reasons["cuda"])
    with pytest.raises(NotImplementedError, match=r"cuda.*float32\[2, 8, 4\].*needs CUDA"):
        K.masked_gather(x, idx, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        K.masked_gather(x, idx, backend="nope")
    monkeypatch.setenv("SEMMIM_BACKEND", "reference")
    assert op.select(None, x, idx).name == "reference"
    monkeypatch.setenv("SEMMIM_BACKEND", "cuda")
    with pytest.raises(NotImplementedError):
        K.masked_gather(x, idx)
    monkeypatch.setenv("SEMMIM_BACKEND", "sdpa")  # not a backend of this op: auto-dispatch
    assert op.select(None, x, idx).name == "cpu"
    monkeypatch.setenv("SEMMIM_BACKEND", "trition")  # a typo is an error listing the names
    with pytest.raises(ValueError, match=r"SEMMIM_BACKEND must be one of.*'triton'.*'trition'"):
        K.masked_gather(x, idx)


def test_non_contiguous_last_dim_runs_on_the_fast_backend():
    """The patch embedding is a transposed conv output, (B, P, D) with strides (P*D, 1, P): the
    fast backends take it (no silent fallback to the reference)."""
    x = torch.randn(2, 4, 8).transpose(1, 2)  # (2, 8, 4) with strides (32, 1, 8)
    idx = make_index(2, 8, 3)
    assert K.get_op("masked_gather").reasons(x, idx)["cpu"] == []
    with K.record_dispatch() as ran:
        got = K.masked_gather(x, idx)
    assert ran == {"masked_gather": {"cpu"}}
    assert torch.equal(got, mg.masked_gather_reference(x, idx))


def test_opcheck_cpu_custom_ops():
    x = torch.randn(2, 8, 4, requires_grad=True)
    pos = torch.randn(8, 4, requires_grad=True)
    idx = make_index(2, 8, 3)
    gather_op, scatter_op = mg._CUSTOM_OPS["cpu"]
    torch.library.opcheck(gather_op, (x, idx, pos))
    torch.library.opcheck(gather_op, (x, idx, None))
    y = torch.randn(2, 3, 4, requires_grad=True)
    fill = torch.randn(4, requires_grad=True)
    torch.library.opcheck(scatter_op, (y, idx, fill, 8, pos))


def test_info_lists_every_op_and_backend(capsys):
    from semmim.kernels import info

    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert "semmim._C: cuda=" in out
    for name in ("masked_gather", "masked_scatter_fill"):
        assert name in out
    assert "needs CUDA tensors" in out
    # which backend each op picks now on its example inputs, and why not the higher ones
    assert "masked_gather -> cpu" in out and "cross_attention -> sdpa" in out
    assert "topk_mask -> cpu" in out
    assert "(not cuda:" in out and "(not triton:" in out


# ------------------------------------------------------------------ interpret tier (Triton)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("P,D,R", [(1, 1, 1), (49, 72, 24), (197, 80, 197), (13, 300, 5)])
def test_triton_matches_reference_interpreted(P, D, R, dtype, poison):
    check_backend("triton", dtype, torch.int32, 2, P, D, R)


@pytest.mark.interpret
@pytest.mark.parametrize("strided", [True, "conv"])
def test_triton_strided_and_chunked_interpreted(monkeypatch, strided, poison):
    monkeypatch.setattr(mg, "_num_chunks", lambda B, P, D, device: 2)
    check_backend("triton", torch.float32, torch.int64, 3, 49, 72, 20, strided=strided)


@pytest.mark.interpret
def test_triton_takes_the_patch_embedding_layout_interpreted(monkeypatch):
    """Auto-dispatch sends the transposed conv output to triton (no fallback), bf16 is declined
    under the interpreter with a reason, and B = 0 gives zero grad_pos / grad_fill."""
    monkeypatch.delenv("SEMMIM_BACKEND", raising=False)
    x = torch.randn(2, 16, 49).transpose(1, 2)  # (B, P, D) = (2, 49, 16), strides (784, 1, 49)
    idx = make_index(2, 49, 10)
    with K.record_dispatch() as ran:
        got = K.masked_gather(x, idx, torch.randn(49, 16))
    assert ran == {"masked_gather": {"triton"}} and got.shape == (2, 10, 16)
    pos = torch.randn(49, 16).bfloat16()
    why = K.get_op("masked_gather").reasons(x.bfloat16(), idx, pos)["triton"]
    assert any("interpreter" in r and "bf16" in r for r in why), why
    why = K.get_op("masked_scatter_fill").reasons(
        got.bfloat16(), idx, torch.zeros(16).bfloat16(), 49, pos
    )
    assert any("interpreter" in r for r in why["triton"]), why
    # without pos nothing is cast to bf16: triton runs (bit-exact, see the next test)
    assert K.get_op("masked_gather").reasons(x.bfloat16(), idx)["triton"] == []
    why = K.get_op("masked_scatter_fill").reasons(
        got.bfloat16(), idx, torch.zeros(16).bfloat16(), 49
    )
    assert why["triton"] == [], why


@pytest.mark.interpret
@pytest.mark.parametrize("P,D,R", [(1, 1, 1), (49, 72, 24), (13, 300, 5)])
def test_triton_bf16_without_pos_matches_reference_interpreted(P, D, R, poison):
    """bf16 without pos runs on triton under the interpreter: outputs and grad_x / grad_y
    bit-exact, grad_fill (an fp32-accumulated sum) within the sum bound."""
    with K.record_dispatch() as ran:
        check_backend("triton", torch.bfloat16, torch.int64, 2, P, D, R, with_pos=False)
    assert ran == {
        "masked_gather": {"reference", "triton"},
        "masked_scatter_fill": {"reference", "triton"},
    }


@pytest.mark.interpret
def test_triton_custom_ops_out_of_range_are_safe_interpreted(poison):
    """Called directly (no validation), the Triton ops never read or write out of bounds: an
    out-of-range gather entry gives a NaN row, an out-of-range scatter entry is dropped."""
    x, y, fill = torch.randn(2, 8, 4), torch.randn(2, 3, 4), torch.randn(4)
    bad = torch.tensor([[0, 8, 2], [1, -1, 3]])
    out = torch.ops.semmim.masked_gather_triton(x, bad, None)
    assert out[0, 1].isnan().all() and out[1, 1].isnan().all()
    assert torch.equal(out[0, 0], x[0, 0]) and torch.equal(out[1, 2], x[1, 3])
    full = torch.ops.semmim.masked_scatter_fill_triton(y, bad, fill, 8, None)
    assert torch.equal(full[0, 0], y[0, 0]) and torch.equal(full[1, 3], y[1, 2])
    assert torch.equal(full[0, 1], fill) and not full.isnan().any()


@pytest.mark.interpret
def test_triton_empty_batch_backward_interpreted(poison):
    check_empty_batch("triton")


# ------------------------------------------------------------------ cuda tier


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES)
@pytest.mark.parametrize("P,D,R", SHAPES + [(576, 768, 288)])
def test_gpu_backends_match_reference(backend, dtype, idx_dtype, P, D, R, poison):
    check_backend(backend, dtype, idx_dtype, 4, P, D, R, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [True, "conv"])
def test_gpu_backends_strided(backend, dtype, strided, poison):
    check_backend(backend, dtype, torch.int64, 8, 196, 768, 98, device="cuda", strided=strided)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_empty_batch_backward(backend, poison):
    check_empty_batch(backend, device="cuda")


@pytest.mark.cuda
def test_gpu_gather_out_of_range_unvalidated_gives_nan_rows():
    """validate=False on CUDA: an out-of-range entry yields a NaN row (no host sync to report
    it), never an unwritten row or an out-of-bounds read; validate=True raises."""
    x = torch.randn(2, 8, 4, device="cuda")
    bad = torch.tensor([[0, 8, 2], [1, 2, 3]], device="cuda")
    out = K.masked_gather(x, bad, backend="cuda", validate=False)
    assert out[0, 1].isnan().all() and not out[0, 0].isnan().any()
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        K.masked_gather(x, bad, backend="cuda")


@pytest.mark.cuda
def test_gpu_opcheck():
    x = torch.randn(2, 8, 16, device="cuda", requires_grad=True)
    pos = torch.randn(8, 16, device="cuda", requires_grad=True)
    idx = make_index(2, 8, 3, device="cuda")
    for name in ("cuda", "triton"):
        torch.library.opcheck(mg._CUSTOM_OPS[name][0], (x, idx, pos))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_fused_add_rounds_like_torch_for_every_16bit_value(dtype):
    """Every 16-bit pattern (incl. subnormals and inf) as x, random pos: the C++ float add rounded
    once must give torch's bits exactly. NaN stays NaN (torch's own vectorised and scalar paths
    disagree on NaN payloads, so payload bits are not compared)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).reshape(1, 256, 256)
    pos = (torch.randn(256, 256) * torch.logspace(-8, 4, 256)[:, None]).to(dtype)
    idx = torch.randperm(256)[None]
    want = mg.masked_gather_reference(x, idx, pos)
    got = K.masked_gather(x, idx, pos, backend="cpu")
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    want_bits, got_bits = want.view(torch.int16)[~nan], got.view(torch.int16)[~nan]
    assert torch.equal(got_bits, want_bits), (got_bits != want_bits).nonzero()[:5].tolist()
