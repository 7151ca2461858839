"""prototype_cross_entropy: the reference is today's head + agreement_loss math; chunked and
triton vs the reference (loss, teacher_logit_mean, grad z, grad prototypes), gradcheck, bad
inputs, dispatch, custom-op checks and torch.compile."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import semmim.kernels as K
from semmim.losses import agreement_loss

pce = importlib.import_module("semmim.kernels.prototype_cross_entropy")

TS, TT = 0.1, 0.04  # the default student / teacher temperatures
# (atol, rtol) relative to max|reference| per dtype, for each compared quantity: the loss and
# the centre statistic are computed in fp32 from the same operands on every backend; the
# gradients are returned in the input dtype (one rounding), and triton also rounds ds to it
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-6, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# (N, E, K): N = 1, 7, 196·2; E = 64, 256; K = 1, 1000, 8192
SHAPES = [
    (1, 64, 1),
    (1, 256, 8192),
    (7, 64, 1000),
    (7, 256, 8192),
    (392, 64, 1),
    (392, 64, 1000),
    (392, 256, 8192),
]


def make_inputs(N, E, Kp, dtype=torch.float32, device="cpu", seed=0):
    """Normalised features, raw prototypes (not unit rows: the op normalises them), a centre."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(N, E, generator=g, dtype=torch.float64), dim=-1)
    zt = F.normalize(z + 0.5 * torch.randn(N, E, generator=g, dtype=torch.float64), dim=-1)
    w = 0.02 * torch.randn(Kp, E, generator=g, dtype=torch.float64)
    wt = w + 0.002 * torch.randn(Kp, E, generator=g, dtype=torch.float64)
    c = 0.05 * torch.randn(Kp, generator=g, dtype=torch.float64)
    up = torch.rand(N, generator=g, dtype=torch.float64) + 0.5  # non-uniform upstream grad
    to = dict(dtype=dtype, device=device)
    return (z.to(**to), zt.to(**to), w.to(**to), wt.to(**to), c.float().to(device), up.to(device))


def run(backend, z0, zt, w0, wt, c, up, need=("z", "w")):
    """loss, teacher_logit_mean, grad z, grad prototypes of sum(loss · up)."""
    z = z0.detach().clone().requires_grad_("z" in need)
    w = w0.detach().clone().requires_grad_("w" in need)
    loss, mean = K.prototype_cross_entropy(z, zt, w, wt, c, TS, TT, backend=backend)
    (loss * up.to(loss.dtype)).sum().backward()
    return loss.detach(), mean, z.grad, w.grad


def assert_close(name, got, ref, dtype):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype} != {ref.dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
    atol, rtol = TOL[dtype]
    scale = ref.double().abs().max().item()
    err = (got.double() - ref.double()).abs()
    bound = atol * max(scale, 1e-6) + rtol * ref.double().abs()
    if (err > bound).any():
        i = int((err - bound).argmax())
        raise AssertionError(
            f"{name}: |got - ref| = {err.flatten()[i].item():.3e} > bound "
            f"{bound.flatten()[i].item():.3e} at flat index {i} "
            f"(got {got.flatten()[i].item():.6g}, ref {ref.flatten()[i].item():.6g}; "
            f"max|ref| {scale:.3g})"
        )


def check_backend(backend, N, E, Kp, dtype, device="cpu", need=("z", "w")):
    inputs = make_inputs(N, E, Kp, dtype, device)
    ref = run("reference", *inputs, need=need)
    got = run(backend, *inputs, need=need)
    names = ("loss", "teacher_logit_mean", "grad z", "grad prototypes")
    for name, g, r in zip(names, got, ref):
        if r is None:
            assert g is None, f"{name}: a gradient nobody asked for"
            continue
        assert_close(name, g, r, dtype)


# ------------------------------------------------------------------ the reference is the spec


def test_reference_is_the_head_and_agreement_loss_math():
    """Bit-identical in fp32 to what the model computed before the op: the head's cosine
    logits, agreement_loss, and the centre update's mean of the teacher logits."""
    z0, zt, w0, wt, c, up = make_inputs(7, 64, 1000)
    z = z0.clone().requires_grad_()
    w = w0.clone().requires_grad_()
    student = F.linear(z, F.normalize(w, dim=-1))
    teacher = F.linear(zt, F.normalize(wt, dim=-1))
    want = agreement_loss(student, teacher, c, TS, TT)
    (want * up.float()).sum().backward()
    loss, mean, gz, gw = run("reference", z0, zt, w0, wt, c, up)
    assert torch.equal(loss, want.detach())
    assert torch.equal(mean, teacher.reshape(-1, 1000).mean(0))
    assert torch.equal(gz, z.grad) and torch.equal(gw, w.grad)


def test_reference_matches_closed_form_float64():
    """loss[n] = LSE(s/τs) − Σ q s/τs and d loss/d s = (softmax(s/τs) − q)/τs, by hand."""
    z0, zt, w0, wt, c, up = make_inputs(5, 16, 30, torch.float64)
    c = c.double()
    s = z0 @ F.normalize(w0, dim=-1).T / TS
    q = torch.softmax((zt @ F.normalize(wt, dim=-1).T - c) / TT, dim=-1)
    loss, _, gz, _ = run("reference", z0, zt, w0, wt, c, up)
    torch.testing.assert_close(loss, torch.logsumexp(s, 1) - (q * s).sum(1))
    ds = (torch.softmax(s, 1) - q) / TS * up[:, None]
    torch.testing.assert_close(gz, ds @ F.normalize(w0, dim=-1))


# ------------------------------------------------------------------ chunked vs reference


@pytest.mark.parametrize("N,E,Kp", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_chunked_matches_reference(N, E, Kp, dtype, poison):
    check_backend("chunked", N, E, Kp, dtype)


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 1000 * 4, 10**9])
def test_chunked_chunk_sizes(monkeypatch, chunk_bytes, poison):
    """One row per chunk, 3 rows (a ragged last chunk of 7), and every row in one chunk."""
    monkeypatch.setattr(pce, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(pce, "MIN_CHUNK_ROWS", 1)
    check_backend("chunked", 7, 64, 1000, torch.float32)


def test_chunked_float64():
    check_backend("chunked", 7, 64, 1000, torch.float64)


@pytest.mark.parametrize("need", [("z",), ("w",), ()])
def test_only_needed_gradients(need, poison):
    if not need:
        z, zt, w, wt, c, _ = make_inputs(7, 64, 100)
        got = K.prototype_cross_entropy(z, zt, w, wt, c, TS, TT, backend="chunked")
        ref = K.prototype_cross_entropy(z, zt, w, wt, c, TS, TT, backend="reference")
        for g, r in zip(got, ref):
            assert not g.requires_grad
            assert_close("no-grad output", g, r, torch.float32)
        return
    check_backend("chunked", 7, 64, 100, torch.float32, need=need)


def test_teacher_side_gets_no_gradient():
    z, zt, w, wt, c, _ = make_inputs(4, 16, 20)
    leaves = [t.clone().requires_grad_() for t in (z, zt, w, wt, c)]
    for backend in ("reference", "chunked"):
        for t in leaves:
            t.grad = None
        loss, mean = K.prototype_cross_entropy(*leaves, TS, TT, backend=backend)
        assert not mean.requires_grad
        loss.sum().backward()
        assert leaves[0].grad is not None and leaves[2].grad is not None
        assert leaves[1].grad is None and leaves[3].grad is None and leaves[4].grad is None


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_gradcheck_float64(backend):
    z, zt, w, wt, c, _ = make_inputs(5, 8, 12, torch.float64)
    z.requires_grad_()
    w.requires_grad_()

    def f(z_, w_):
        return K.prototype_cross_entropy(z_, zt, w_, wt, c, TS, TT, backend=backend)[0]

    assert torch.autograd.gradcheck(f, (z, w))
    assert torch.autograd.gradgradcheck(f, (z, w)) if backend == "reference" else True


def test_autocast_wider_prototypes_are_cast_to_z_dtype():
    """Under CPU bf16 autocast the fp32 parameters meet bf16 features: cast to bf16 (the
    autocast rule), everything after the products in fp32; outside autocast it is an error."""
    z, zt, w, wt, c, _ = make_inputs(7, 64, 100)
    zb, ztb = z.bfloat16(), zt.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = K.prototype_cross_entropy(zb, ztb, w, wt, c, TS, TT, backend="chunked")
        ref = K.prototype_cross_entropy(zb, ztb, w, wt, c, TS, TT, backend="reference")
    wn = F.normalize(w, dim=-1).bfloat16().float()
    wtn = F.normalize(wt, dim=-1).bfloat16().float()
    s, t = zb.float() @ wn.T, ztb.float() @ wtn.T
    want = agreement_loss(s, t, c, TS, TT)
    assert got[0].dtype == torch.float32 and ref[0].dtype == torch.float32
    assert_close("autocast reference", ref[0], want, torch.float32)
    assert_close("autocast chunked", got[0], want, torch.float32)
    assert_close("autocast mean", got[1], t.mean(0), torch.float32)
    with pytest.raises(ValueError, match="prototypes dtype torch.float32 != z dtype"):
        K.prototype_cross_entropy(zb, ztb, w, wt, c, TS, TT, backend="chunked")


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton"])
def test_bad_inputs_raise_value_error(backend):
    z, zt, w, wt, c, _ = make_inputs(4, 8, 10)
    nan = float("nan")

    def with_nan(t):
        t = t.clone()
        t.view(-1)[1] = nan
        return t

    good = (z, zt, w, wt, c, TS, TT)
    cases = [
        (0, z[0], r"z must be \(N, E\)"),
        (0, z[:0], "N >= 1"),
        (0, z.int(), "float32, float16 or bfloat16"),
        (0, [[1.0]], r"z must be a \(N, E\) tensor"),
        (1, zt[:3], r"z_teacher must be \(N, E\) = \(4, 8\)"),
        (1, zt.double(), "z_teacher dtype"),
        (2, w[:, :7], "prototypes .* has E=7, z .* has E=8"),
        (2, w[None], r"prototypes must be \(K, E\)"),
        (2, w.half(), "prototypes dtype"),
        (3, wt[:9], r"prototypes_teacher must be \(K, E\) = \(10, 8\)"),
        (3, wt.double(), "prototypes_teacher dtype torch.float64 != z dtype"),
        (4, c[:9], r"center must be \(K,\) = \(10,\)"),
        (4, c.long(), "center must be a float tensor"),
        (4, c.to("meta"), "one device"),
        (5, 0.0, "student_temp must be a finite number > 0"),
        (5, -0.1, "student_temp"),
        (5, nan, "student_temp"),
        (5, True, "student_temp"),
        (6, 0, "teacher_temp must be a finite number > 0"),
        (6, float("inf"), "teacher_temp"),
        (6, "0.04", "teacher_temp"),
        (6, torch.tensor([TT]), r"teacher_temp must be a number or a 0-d float tensor.*\(1,\)"),
        (6, torch.tensor(1), "teacher_temp must be a number or a 0-d float tensor.*int64"),
        (6, torch.tensor(TT, device="meta"), "one device"),
        (6, torch.tensor(0.0), r"teacher_temp must be a finite number >= .* got 0.0 \(a tensor"),
        (5, torch.tensor(nan), "student_temp must be a finite number >= .* got nan"),
        (5, 1e-39, r"student_temp must be >= 1.18e-38 for float32 inputs .*overflow"),
        (6, 5e-324, "teacher_temp must be >= "),
        (0, with_nan(z), "non-finite values .* in z$"),
        (1, with_nan(zt), "non-finite values .* in z_teacher$"),
        (2, with_nan(w), "in prototypes$"),
        (3, with_nan(wt), "in prototypes_teacher$"),
        (4, with_nan(c), "in center$"),
    ]
    for pos, value, msg in cases:
        args = list(good)
        args[pos] = value
        with pytest.raises(ValueError, match=msg):
            K.prototype_cross_entropy(*args, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_tiny_temperatures_are_finite_or_refused(backend):
    """Above the bound every loss is finite (fp32 and fp64); below it, a ValueError instead of
    every loss NaN (issue 19 §4)."""
    z, zt, w, wt, c, _ = make_inputs(4, 8, 10)
    for t in (2e-38, 1e-20):
        loss, mean = K.prototype_cross_entropy(z, zt, w, wt, c, t, t, backend=backend)
        assert torch.isfinite(loss).all() and torch.isfinite(mean).all(), t
    z64, zt64, w64, wt64 = (a.double() for a in (z, zt, w, wt))
    loss, _ = K.prototype_cross_entropy(z64, zt64, w64, wt64, c, 1e-39, 1e-39, backend=backend)
    assert torch.isfinite(loss).all()  # the bound follows the compute dtype
    with pytest.raises(ValueError, match="student_temp must be >= "):
        K.prototype_cross_entropy(z, zt, w, wt, c, 1e-39, TT, backend=backend)


@pytest.mark.parametrize("validate", [True, False])
def test_meta_tensors_are_a_clear_error(validate):
    z, zt, w, wt, c, _ = (t.to("meta") for t in make_inputs(4, 8, 10))
    with pytest.raises(ValueError, match=r"prototype_cross_entropy: z is a meta tensor .*no data"):
        K.prototype_cross_entropy(z, zt, w, wt, c, TS, TT, validate=validate)


def test_validate_false_skips_only_value_checks():
    z, zt, w, wt, c, _ = make_inputs(4, 8, 10)
    zn = z.clone()
    zn[0, 0] = float("nan")
    loss, _ = K.prototype_cross_entropy(zn, zt, w, wt, c, TS, TT, backend="chunked", validate=False)
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1:]).all()
    with pytest.raises(ValueError, match="center must be"):
        K.prototype_cross_entropy(z, zt, w, wt, c[:3], TS, TT, validate=False)


# ------------------------------------------------------------------ dispatch, custom ops, compile


def test_dispatch_and_reasons(monkeypatch):
    z, zt, w, wt, c, _ = make_inputs(4, 8, 10)
    args = (z, zt, w, wt, c, TS, TT)
    op = K.get_op("prototype_cross_entropy")
    monkeypatch.delenv("SEMMIM_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert op.explain(*args) == ("chunked", [f"triton: {op.reasons(*args)['triton'][0]}"])
    reasons = op.reasons(*args)
    assert reasons["chunked"] == [] and reasons["reference"] == []
    assert any("CUDA" in r for r in reasons["triton"])
    with pytest.raises(NotImplementedError, match="triton.*needs CUDA"):
        K.prototype_cross_entropy(*args, backend="triton")
    monkeypatch.setenv("SEMMIM_BACKEND", "reference")
    with K.record_dispatch() as ran:
        K.prototype_cross_entropy(*args)
    assert ran == {"prototype_cross_entropy": {"reference"}}
    assert "chunked" in K.BACKENDS


def test_opcheck_chunked_custom_ops():
    z, zt, w, wt, c, up = make_inputs(7, 16, 50)
    wn = F.normalize(w, dim=-1).requires_grad_()
    zg = z.clone().requires_grad_()
    ts, tt = torch.tensor(TS), torch.tensor(TT)
    fwd = pce._CUSTOM_OPS["chunked"]
    torch.library.opcheck(fwd, (zg, zt, wn, wt, c, ts, tt))
    torch.library.opcheck(fwd, (z, zt, wn.detach(), wt, c, ts, tt))
    _, lse_s, lse_t = fwd(z, zt, wn.detach(), wt, c, ts, tt)
    bwd = torch.ops.semmim.prototype_cross_entropy_bwd_chunked.default
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            bwd, (up.float(), z, zt, wn.detach(), wt, c, lse_s, lse_t, ts, tt, *need)
        )
    torch.library.opcheck(pce._snapshot, (c,))


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_torch_compile_fullgraph_matches_eager(backend):
    """As the model uses it: the loss, then the centre buffer updated in place from
    teacher_logit_mean, then backward (which must still see the centre the forward saw), two
    steps with the teacher temperature a 0-d buffer refilled between them (a schedule).
    ``aot_eager_decomp_partition`` is Inductor's min-cut partitioner without its C++ build:
    it recomputed the reference backend's plain centre copy in backward from the updated
    buffer ("modified by an inplace operation"); the copy is now an opaque op on every
    backend. One compilation for both steps: the new temperature is an input, not a guard."""
    z0, zt, w0, wt, c0, up = make_inputs(7, 16, 50)
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return torch._dynamo.lookup_backend("aot_eager_decomp_partition")(gm, example_inputs)

    def step(z, w, centre, tt):
        loss, mean = K.prototype_cross_entropy(
            z, zt, w, wt, centre, TS, tt, backend=backend, validate=False
        )
        centre.mul_(0.9).add_(mean, alpha=0.1)
        return (loss * up.float()).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=counting)
    outs = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        z = z0.clone().requires_grad_()
        w = w0.clone().requires_grad_()
        centre, tt = c0.clone(), torch.tensor(TT)
        outs[name] = []
        for temp in (TT, 0.07):
            tt.fill_(temp)
            z.grad = w.grad = None
            total = fn(z, w, centre, tt)
            total.backward()
            outs[name].append((total.detach(), centre.clone(), z.grad, w.grad))
    assert len(compiles) == 1, f"{len(compiles)} compilations for two steps"
    for i, (e, c) in enumerate(zip(outs["eager"], outs["compiled"])):
        for name, a, b in zip(("loss", "centre", "grad z", "grad w"), e, c):
            assert_close(f"step {i} compiled {name}", b, a, torch.float32)
    ref = run("reference", z0, zt, w0, wt, c0, up)
    assert_close("grad z vs reference", outs["compiled"][0][2], ref[2], torch.float32)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_tensor_temperatures_equal_numbers(backend):
    """0-d tensor temperatures (fp32 and fp64) give the numbers' loss, centre statistic and
    gradients."""
    check_tensor_temperatures(backend)


def check_tensor_temperatures(backend, dtype=torch.float32):
    z0, zt, w0, wt, c, up = make_inputs(7, 64, 130, dtype)
    ref = run(backend, z0, zt, w0, wt, c, up)
    for tdtype in (torch.float32, torch.float64):
        z, w = z0.clone().requires_grad_(), w0.clone().requires_grad_()
        ts, tt = torch.tensor(TS, dtype=tdtype), torch.tensor(TT, dtype=tdtype)
        loss, mean = K.prototype_cross_entropy(z, zt, w, wt, c, ts, tt, backend=backend)
        (loss * up.to(loss.dtype)).sum().backward()
        for name, g, r in zip(
            ("loss", "mean", "grad z", "grad w"), (loss, mean, z.grad, w.grad), ref
        ):
            assert_close(f"{name} ({tdtype} temperatures)", g.detach(), r, dtype)


def test_info_lists_the_op(capsys):
    from semmim.kernels import info

    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert "prototype_cross_entropy" in out and "chunked" in out


def test_centre_updated_in_place_between_forward_and_backward():
    """The model updates its centre buffer after the loss and before backward: the fast
    backends' recomputation must use the centre the forward saw."""
    z0, zt, w0, wt, c, up = make_inputs(7, 16, 50)
    ref = run("reference", z0, zt, w0, wt, c, up)
    z, w, centre = z0.clone().requires_grad_(), w0.clone().requires_grad_(), c.clone()
    loss, _ = K.prototype_cross_entropy(z, zt, w, wt, centre, TS, TT, backend="chunked")
    centre.mul_(0.9).add_(1.0)
    (loss * up.float()).sum().backward()
    assert_close("grad z", z.grad, ref[2], torch.float32)
    assert_close("grad prototypes", w.grad, ref[3], torch.float32)


# ------------------------------------------------------------------ the model on the op

MODEL_ABLATIONS = [
    {},
    {"mim.target": "pixel"},
    {"mim.text_in_target": False},
    {"masking.strategy": "random"},
    {"mim.enabled": False},
    {"mim.psi": "text_cls"},
    {"mim.drop_tokens": False},
]


def _train_step(overrides, backend, monkeypatch):
    """One SGD step of the tiny model with ``kernels.prototype_cross_entropy=backend``: losses,
    gradients, parameters and buffers afterwards, and how many times the op ran."""
    from semmim import build_model, from_preset

    calls = []
    public = K.prototype_cross_entropy

    def counted(*args, **kwargs):
        calls.append(kwargs["backend"])
        return public(*args, **kwargs)

    monkeypatch.setattr(K, "prototype_cross_entropy", counted)
    torch.manual_seed(0)
    model = build_model(
        from_preset("tiny", {**overrides, "kernels.prototype_cross_entropy": backend})
    )
    model.set_step(30, 100)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    captions = ["a red square", "a green circle on grass", "blue sky", "a yellow cat"]
    enc = model.tokenizer(captions, padding=True, return_tensors="pt")
    S = model.cfg.vision.image_size
    images = torch.randn(4, 3, S, S, generator=torch.Generator().manual_seed(0))
    with K.record_dispatch() as ran:
        out = model(images, enc["input_ids"], enc["attention_mask"], seed=1)
    assert set(calls) <= {backend}
    assert ran.get("prototype_cross_entropy", {backend}) == {backend}
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    model.update_momentum()
    losses = {k: v.detach() for k, v in out.losses.items()}
    return losses, grads, dict(model.state_dict()), len(calls)


@pytest.mark.parametrize("overrides", MODEL_ABLATIONS, ids=[str(o) for o in MODEL_ABLATIONS])
def test_model_training_step_chunked_equals_reference(overrides, monkeypatch):
    ref = _train_step(overrides, "reference", monkeypatch)
    got = _train_step(overrides, "chunked", monkeypatch)
    # global agreement + semantic MIM; pixel MIM: agreement only; mim.enabled=false: plain ALBEF
    calls = (
        0
        if not overrides.get("mim.enabled", True)
        else 1 + (overrides.get("mim.target") != "pixel")
    )
    assert ref[3] == got[3] == calls
    assert ref[0].keys() == got[0].keys()
    for k in ref[0]:
        torch.testing.assert_close(
            got[0][k], ref[0][k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
        )
    assert ref[1].keys() == got[1].keys()
    for n in ref[1]:
        scale = ref[1][n].abs().max().item()
        torch.testing.assert_close(got[1][n], ref[1][n], rtol=1e-4, atol=1e-5 * scale + 1e-9)
    for n in ref[2]:  # parameters after the step (lr 0.5 × the gradients' differences), EMA
        # copy, queues and both centres (the op's teacher_logit_mean)
        torch.testing.assert_close(
            got[2][n], ref[2][n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}"
        )
    for c in ("glob_center", "mim_center"):
        torch.testing.assert_close(got[2][c], ref[2][c], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ interpret tier (Triton)

INTERPRET_SHAPES = [(1, 64, 1), (7, 20, 130), (7, 64, 1000), (70, 64, 130), (33, 256, 65)]


@pytest.mark.interpret
@pytest.mark.parametrize("N,E,Kp", INTERPRET_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference_interpreted(N, E, Kp, dtype, poison):
    check_backend("triton", N, E, Kp, dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("need", [("z",), ("w",)])
def test_triton_only_needed_gradients_interpreted(need, poison):
    check_backend("triton", 7, 64, 130, torch.float32, need=need)


@pytest.mark.interpret
def test_triton_declines_bf16_and_wide_e_interpreted():
    z, zt, w, wt, c, _ = make_inputs(4, 8, 10, torch.bfloat16)
    reasons = K.get_op("prototype_cross_entropy").reasons(z, zt, w, wt, c, TS, TT)["triton"]
    assert any("bf16" in r for r in reasons)
    z, zt, w, wt, c, _ = make_inputs(2, 600, 10)
    reasons = K.get_op("prototype_cross_entropy").reasons(z, zt, w, wt, c, TS, TT)["triton"]
    assert reasons == ["E=600 > 512"]


@pytest.mark.interpret
def test_triton_non_contiguous_inputs_interpreted(poison):
    z, zt, w, wt, c, up = make_inputs(7, 64, 130)
    zs = torch.cat([z, z], 1)[:, ::2]  # stride (128, 2): copied once to a unit column stride
    ref = run("reference", zs, zt.T.contiguous().T, w, wt, c, up)
    got = run("triton", zs, zt.T.contiguous().T, w, wt, c, up)
    for name, g, r in zip(("loss", "mean", "grad z", "grad w"), got, ref):
        assert_close(name, g, r, torch.float32)


@pytest.mark.interpret
def test_triton_tensor_temperatures_interpreted(poison):
    check_tensor_temperatures("triton")


@pytest.mark.interpret
def test_opcheck_triton_interpreted():
    z, zt, w, wt, c, _ = make_inputs(7, 16, 50)
    wn = F.normalize(w, dim=-1).requires_grad_()
    args = (z.clone().requires_grad_(), zt, wn, wt, c, torch.tensor(TS), torch.tensor(TT))
    torch.library.opcheck(pce._CUSTOM_OPS["triton"], args)


# ------------------------------------------------------------------ cuda tier

CUDA_SHAPES = [*SHAPES, (8192, 256, 8192), (1024, 256, 65536), (300, 72, 65536)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "chunked"])
@pytest.mark.parametrize("N,E,Kp", CUDA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backends_match_reference(backend, N, E, Kp, dtype, poison):
    check_backend(backend, N, E, Kp, dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_keeps_no_rows_by_k_tensor(dtype):
    """fwd+bwd peak memory above the inputs stays far below one (N, K) fp32 tensor."""
    N, E, Kp = 8192, 256, 8192
    z0, zt, w0, wt, c, _ = make_inputs(N, E, Kp, dtype, "cuda")
    z, w = z0.requires_grad_(), w0.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    K.prototype_cross_entropy(z, zt, w, wt, c, TS, TT, backend="triton")[0].mean().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < N * Kp * 4 / 8, f"peak extra {extra / 2**20:.1f} MiB"


@pytest.mark.cuda
def test_gpu_opcheck():
    z, zt, w, wt, c, _ = make_inputs(7, 64, 200, device="cuda")
    wn = F.normalize(w, dim=-1).requires_grad_()
    for name in ("triton", "chunked"):
        temps = (torch.tensor(TS, device="cuda"), torch.tensor(TT, device="cuda"))
        torch.library.opcheck(
            pce._CUSTOM_OPS[name], (z.clone().requires_grad_(), zt, wn, wt, c, *temps)
        )
