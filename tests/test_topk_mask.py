"""topk_mask: reference vs naive loops, every backend vs reference (identical indices where the
M-th/(M+1)-th score gap is clear, selected scores otherwise), invariants, ties, noise, zero norms,
NaN/bad-input errors, registry reasons, custom-op checks; interpret and cuda tiers at the end."""

from __future__ import annotations

import functools
import importlib
import math
import os
import re
import subprocess
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import semmim.kernels as K
from semmim.kernels._common import interpret_mode

tm = importlib.import_module("semmim.kernels.topk_mask")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# score gap above which every backend must pick identical indices: the backends differ only in
# the fp32 summation order (bounded by ~2*d*2^-24 relative to the score scale); the dtype entry
# keeps the CONTRIBUTING.md "tolerances travel with the dtype" shape (inputs are shared, so the
# input dtype does not widen the gap much)
GAP_TOL = {torch.float32: 2e-4, torch.float16: 5e-4, torch.bfloat16: 1e-3}
PS = [2, 49, 196, 197, 576, 1024]
DS = [1, 72, 256, 768]


def ms_for(P: int) -> list[int]:
    return sorted({1, max(1, P // 2), P - 1})


def has_cpu_ext() -> bool:
    return not tm.supports_cpu(torch.zeros(1, 2, 1), torch.zeros(1, 1), 1)


needs_ext = pytest.mark.skipif(not has_cpu_ext(), reason="semmim._C is not built")


# ------------------------------------------------------------------ input builders and checks


def separated_inputs(B: int, P: int, d: int, M: int, dtype=torch.float32, device="cpu", seed=0):
    """patch/text whose top-M set per row is known: masked patches have cosine in [0.5, 0.9]
    (d=1: +1), kept ones in [-0.9, 0.3] (d=1: -1), patch norms in [0.5, 2]. Returns the expected
    bool mask too."""
    patch, text, top = _separated64(B, P, d, M, seed)
    return patch.to(dtype=dtype, device=device), text.to(dtype=dtype, device=device), top


@functools.lru_cache(maxsize=8)
def _separated64(B: int, P: int, d: int, M: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(B, d, generator=g, dtype=torch.float64)
    t_hat = text / text.norm(dim=-1, keepdim=True)
    top = torch.zeros(B, P, dtype=torch.bool)
    for b in range(B):
        top[b, torch.randperm(P, generator=g)[:M]] = True
    scale = 0.5 + 1.5 * torch.rand(B, P, 1, generator=g, dtype=torch.float64)
    if d == 1:
        c = torch.where(top, 1.0, -1.0).to(torch.float64)
        patch = c[..., None] * t_hat[:, None, :] * scale
    else:
        hi = 0.5 + 0.4 * torch.rand(B, P, generator=g, dtype=torch.float64)
        lo = -0.9 + 1.2 * torch.rand(B, P, generator=g, dtype=torch.float64)
        c = torch.where(top, hi, lo)
        u = torch.randn(B, P, d, generator=g, dtype=torch.float64)
        u = u - (u * t_hat[:, None, :]).sum(-1, keepdim=True) * t_hat[:, None, :]
        u = u / u.norm(dim=-1, keepdim=True)
        patch = (c[..., None] * t_hat[:, None, :] + (1 - c[..., None] ** 2).sqrt() * u) * scale
    return patch, text, top


def random_inputs(B, P, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    patch = torch.randn(B, P, d, generator=g).to(dtype=dtype, device=device)
    text = torch.randn(B, d, generator=g).to(dtype=dtype, device=device)
    return patch, text


def check_invariants(out, B: int, P: int, M: int) -> None:
    keep_idx, mask_idx, mask = out
    assert keep_idx.shape == (B, P - M) and keep_idx.dtype == torch.int64
    assert mask_idx.shape == (B, M) and mask_idx.dtype == torch.int64
    assert mask.shape == (B, P) and mask.dtype == torch.bool
    keep_idx, mask_idx, mask = keep_idx.cpu(), mask_idx.cpu(), mask.cpu()
    assert bool((mask.view(torch.uint8) <= 1).all()), "mask holds bytes other than 0/1"
    if P - M > 1:
        assert bool((keep_idx[:, 1:] > keep_idx[:, :-1]).all()), "keep_idx not strictly ascending"
    if M > 1:
        assert bool((mask_idx[:, 1:] > mask_idx[:, :-1]).all()), "mask_idx not strictly ascending"
    both = torch.cat([keep_idx, mask_idx], dim=1).sort(dim=1).values
    assert torch.equal(both, torch.arange(P).expand(B, P)), "keep/mask do not partition 0..P-1"
    expect = torch.zeros(B, P, dtype=torch.bool)
    expect.scatter_(1, mask_idx, True)
    assert torch.equal(mask, expect), "mask disagrees with mask_idx"


def assert_same(out, ref, what: str = "") -> None:
    for name, a, r in zip(("keep_idx", "mask_idx", "mask"), out, ref):
        a, r = a.cpu(), r.cpu()
        if not torch.equal(a, r):
            bad = (a != r).nonzero()[:5].tolist()
            raise AssertionError(f"{what} {name} differs at {bad}: got {a[tuple(bad[0])]}, "
                                 f"want {r[tuple(bad[0])]}")  # fmt: skip


def assert_matches_reference(out, ref, scores: torch.Tensor, M: int, tol: float) -> None:
    """Identical indices for rows whose M-th/(M+1)-th score gap exceeds tol; elsewhere the
    selected scores match the reference's selected scores within tol."""
    s = scores.cpu()
    top = s.sort(dim=1, descending=True).values
    gap = top[:, M - 1] - top[:, M]  # (B,)
    keep, midx, mask = (t.cpu() for t in out)
    rkeep, rmidx, rmask = (t.cpu() for t in ref)
    for b in range(s.shape[0]):
        if gap[b] > tol:
            if not torch.equal(midx[b], rmidx[b]):
                raise AssertionError(f"row {b} (gap {gap[b]:.3g}): mask_idx {midx[b].tolist()[:8]}"
                                     f" vs reference {rmidx[b].tolist()[:8]}")  # fmt: skip
        else:
            got = s[b, midx[b]].sort().values
            want = s[b, rmidx[b]].sort().values
            assert torch.allclose(got, want, atol=tol, rtol=0), f"row {b}: selected scores"


# ------------------------------------------------------------------ reference is the spec


def naive_topk_mask(patch, text, M, noise=None, tau=1.0):
    """Per-row Python loops in float64: cosine, noise, sort by (-score, index)."""
    B, P, d = patch.shape
    keep, midx, mask = [], [], []
    for b in range(B):
        t = [float(v) for v in text[b].double()]
        tn = max(math.sqrt(sum(v * v for v in t)), tm.EPS)
        scores = []
        for p in range(P):
            x = [float(v) for v in patch[b, p].double()]
            xn = max(math.sqrt(sum(v * v for v in x)), tm.EPS)
            s = sum(a * c for a, c in zip(x, t)) / (xn * tn)
            if noise is not None:
                s = s / tau + float(noise[b, p])
            scores.append(s)
        order = sorted(range(P), key=lambda p: (-scores[p], p))
        midx.append(sorted(order[:M]))
        keep.append(sorted(order[M:]))
        mask.append([p in set(order[:M]) for p in range(P)])
    return torch.tensor(keep), torch.tensor(midx), torch.tensor(mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_noise", [False, True])
def test_reference_matches_naive_loop(dtype, with_noise):
    B, P, d, M = 3, 12, 6, 5
    patch, text, top = separated_inputs(B, P, d, M, dtype)
    noise = 0.01 * torch.randn(B, P) if with_noise else None  # small: gaps stay clear
    ref = tm.topk_mask_reference(patch, text, M, noise=noise, tau=0.7)
    check_invariants(ref, B, P, M)
    assert_same(ref, naive_topk_mask(patch, text, M, noise, 0.7))
    assert torch.equal(ref[2], top)


def test_reference_scores_are_cosine_similarity():
    patch, text = random_inputs(2, 30, 17)
    patch[0, 3] = 0
    want = torch.nn.functional.cosine_similarity(patch.double(), text.double()[:, None], dim=-1)
    got = tm.topk_mask_scores(patch, text)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


def test_reference_tie_rule_matches_naive_sort_with_many_ties():
    """Patches drawn from 3 distinct vectors: exact score ties everywhere."""
    g = torch.Generator().manual_seed(1)
    B, P, d = 4, 40, 8
    basis = torch.randn(3, d, generator=g)
    patch = basis[torch.randint(0, 3, (B, P), generator=g)]
    text = torch.randn(B, d, generator=g)
    s = tm.topk_mask_scores(patch, text)
    for M in (1, 7, 20, 39):
        _, midx, _ = tm.topk_mask_reference(patch, text, M)
        for b in range(B):
            order = sorted(range(P), key=lambda p: (-float(s[b, p]), p))
            assert midx[b].tolist() == sorted(order[:M])


# ------------------------------------------------------------------ cpu backend vs reference


@needs_ext
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("P", PS)
def test_cpu_matches_reference_separated(P, d, poison):
    B = 2
    for M in ms_for(P):
        for dtype in DTYPES:
            patch, text, top = separated_inputs(B, P, d, M, dtype, seed=P + d + M)
            ref = tm.topk_mask_reference(patch, text, M)
            assert torch.equal(ref[2], top)
            out = tm.topk_mask_cpu(patch, text, M)
            check_invariants(out, B, P, M)
            assert_same(out, ref, f"P={P} d={d} M={M} {dtype}")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("P", PS)
def test_cpu_matches_reference_random(P, d, dtype, poison):
    B = 3
    patch, text = random_inputs(B, P, d, dtype, seed=P * d)
    cases = [(M, None) for M in ms_for(P)]
    cases.append((max(1, P // 2), K.gumbel_noise((B, P), seed=P, device="cpu")))
    for M, noise in cases:
        tau = 0.3 if noise is not None else 1.0
        ref = tm.topk_mask_reference(patch, text, M, noise=noise, tau=tau)
        out = tm.topk_mask_cpu(patch, text, M, noise=noise, tau=tau)
        check_invariants(out, B, P, M)
        s = tm.topk_mask_scores(patch, text, noise, tau)
        assert_matches_reference(out, ref, s, M, GAP_TOL[dtype] / tau)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_strided_and_odd_layouts(dtype, poison):
    B, P, d, M = 3, 49, 72, 20
    big, text = random_inputs(B, 2 * P, d + 5, dtype)
    patch = big[:, ::2, 3 : 3 + d]  # strided P, offset d window, last dim contiguous
    assert not patch.is_contiguous()
    noise_t = torch.randn(P, B).t()  # strided noise
    ref = tm.topk_mask_reference(patch, text[:, :d], M, noise=noise_t)
    out = tm.topk_mask_cpu(patch, text[:, :d], M, noise=noise_t)
    assert_same(out, ref)
    pb = random_inputs(P, B, d, dtype)[0].transpose(0, 1)  # (B, P, d) with batch stride d
    ref = tm.topk_mask_reference(pb, text[:, :d], M)
    assert_same(tm.topk_mask_cpu(pb, text[:, :d], M), ref)
    # text / noise in another float dtype than patch
    ref = tm.topk_mask_reference(patch, text[:, :d].float(), M, noise=noise_t.half())
    assert_same(tm.topk_mask_cpu(patch, text[:, :d].float(), M, noise=noise_t.half()), ref)


@needs_ext
def test_cpu_subnormal_and_wide_range_half_values(poison):
    """Exercises the float16 -> float32 conversion paths (F16C / bit trick) on subnormals."""
    B, P, d = 2, 33, 40
    g = torch.Generator().manual_seed(3)
    patch = (torch.randn(B, P, d, generator=g) * torch.logspace(-7, 4, d)).half()
    text = torch.randn(B, d, generator=g).half()
    for M in (1, 16, 32):
        assert_same(tm.topk_mask_cpu(patch, text, M), tm.topk_mask_reference(patch, text, M))


# ------------------------------------------------------------------ ties, zero norms, noise


def cpu_backends() -> list[str]:
    return ["reference"] + (["cpu"] if has_cpu_ext() else [])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ties_mask_lower_index_first(backend, dtype, poison):
    B, P, d = 2, 50, 72
    row = torch.randn(d)
    patch = row.expand(B, P, d).to(dtype).contiguous()  # every patch identical
    text = torch.randn(B, d).to(dtype)
    for M in (1, 17, 49):
        keep, midx, mask = K.topk_mask(patch, text, M, backend=backend)
        assert midx.tolist() == [list(range(M))] * B
        assert keep.tolist() == [list(range(M, P))] * B
    # copies of the text at 3, 7, 9 (cosine ~1; every other patch <= 0.9): ties among them
    patch, text, _ = separated_inputs(B, P, d, 1, dtype)
    patch[:, [3, 7, 9]] = text[:, None, :]
    _, midx, _ = K.topk_mask(patch, text, 2, backend=backend)
    assert midx.tolist() == [[3, 7]] * B
    _, midx, _ = K.topk_mask(patch, text, 3, backend=backend)
    assert midx.tolist() == [[3, 7, 9]] * B


@pytest.mark.parametrize("backend", cpu_backends())
def test_zero_norm_vectors_score_zero_and_tie_by_index(backend, poison):
    B, P, d = 2, 20, 16
    patch, text = random_inputs(B, P, d)
    text[1] = 0  # zero text: every score 0 -> the first M patches
    patch[0, [2, 5, 11]] = 0  # zero patches score exactly 0 (whatever the text's signs)
    text[0] = -text[0].abs()  # negative text: 0 * negative = -0.0 must tie with +0.0
    patch[0] = patch[0].abs()  # all nonzero patches score < 0 for row 0
    s = tm.topk_mask_scores(patch, text)
    assert not torch.isnan(s).any()
    assert bool((s[0, [2, 5, 11]] == 0).all()) and bool((s[1] == 0).all())
    keep, midx, mask = K.topk_mask(patch, text, 3, backend=backend)
    check_invariants((keep, midx, mask), B, P, 3)
    assert midx.tolist() == [[2, 5, 11], [0, 1, 2]]


@pytest.mark.parametrize("backend", cpu_backends())
def test_noise_and_tau(backend, poison):
    B, P, d, M = 3, 64, 32, 20
    patch, text = random_inputs(B, P, d)
    # tau -> large: the selection follows the noise alone (noise gaps of 1 >> |s|/tau)
    noise = torch.stack([torch.randperm(P) for _ in range(B)]).float()
    _, midx, _ = K.topk_mask(patch, text, M, noise=noise, tau=1e6, backend=backend)
    want = noise.topk(M, dim=1).indices.sort(dim=1).values
    assert torch.equal(midx, want)
    # tau -> small: the selection follows the similarity (noise is O(1), s/tau is O(1e4))
    patch, text, top = separated_inputs(B, P, d, M)
    g = K.gumbel_noise((B, P), seed=0, device="cpu")
    _, _, mask = K.topk_mask(patch, text, M, noise=g, tau=1e-4, backend=backend)
    assert torch.equal(mask, top)
    # noise is added after /tau: compare with the reference on a middle tau
    out = K.topk_mask(patch, text, M, noise=g, tau=0.05, backend=backend)
    ref = tm.topk_mask_reference(patch, text, M, noise=g, tau=0.05)
    assert_matches_reference(out, ref, tm.topk_mask_scores(patch, text, g, 0.05), M, 1e-3)


def test_gumbel_noise_reproducible_and_finite():
    a = K.gumbel_noise((4, 1000), seed=7, device="cpu")
    b = K.gumbel_noise((4, 1000), seed=7, device=torch.device("cpu"))
    c = K.gumbel_noise((4, 1000), seed=8, device="cpu")
    assert a.dtype == torch.float32 and a.shape == (4, 1000)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert bool(torch.isfinite(a).all())
    big = K.gumbel_noise((200_000,), seed=0, device="cpu")
    assert abs(big.mean().item() - 0.5772) < 0.02  # Euler–Mascheroni: the Gumbel(0,1) mean
    assert abs(big.var().item() - math.pi**2 / 6) < 0.05


def test_gumbel_noise_on_a_missing_device_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(ValueError, match=r"^device='cuda(:1)?' but CUDA is not available") as e:
            K.gumbel_noise((2, 3), seed=0, device=device)
        assert "\n" not in str(e.value) and "use device='cpu'" in str(e.value)
    with pytest.raises(ValueError, match="device must name a torch device, got 'gpu'"):
        K.gumbel_noise((2, 3), seed=0, device="gpu")


def test_gumbel_noise_uniform_zero_stays_finite(monkeypatch):
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros(a[0], dtype=torch.float32))
    assert bool(torch.isfinite(K.gumbel_noise((5,), seed=0, device="cpu")).all())


# ------------------------------------------------------------------ NaN and bad inputs


@pytest.mark.parametrize("backend", [None, *cpu_backends()])
@pytest.mark.parametrize("where", ["patch", "text", "noise"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_raise(backend, where, bad):
    patch, text = random_inputs(2, 10, 8)
    noise = torch.zeros(2, 10)
    if where == "patch":
        patch[1, 3, 2] = bad
    elif where == "text":
        text[0, 5] = bad
    else:
        noise[1, 4] = bad
    with pytest.raises(ValueError, match=f"{where} .*NaN or inf"):
        K.topk_mask(patch, text, 3, noise=noise, backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_non_finite_unchecked_keeps_invariants(backend):
    patch, text = random_inputs(3, 10, 8)
    patch[0, 4, 1] = float("nan")
    text[1, 2] = float("inf")
    out = K.topk_mask(patch, text, 3, backend=backend, validate=False)
    check_invariants(out, 3, 10, 3)  # selection unspecified in rows 0 and 1; still a partition
    ref = tm.topk_mask_reference(patch[2:], text[2:], 3)
    assert_same([t[2] for t in out], [t[0] for t in ref])


@pytest.mark.parametrize("backend", cpu_backends())
def test_score_overflow_raises(backend):
    patch, text = random_inputs(2, 10, 8)
    noise = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="overflow"):
        K.topk_mask(patch, text, 3, noise=noise, tau=1e-39, backend=backend)


# ------------------------------------------------------------------ huge finite inputs (issue 10 §8)
# (patch scale, text scale): squares overflow fp32 (|x| > ~1.8e19) in patch, text, both, or only
# the norm product; 3.4e38 / 8 sits near the fp32 / bf16 maximum
HUGE_SCALES = [(1e30, 1.0), (1.0, 1e30), (1e30, 1e30), (3.4e38 / 8, 1e-20), (1e20, 1e20)]


def check_huge_inputs(backend: str, dtype=torch.float32, device="cpu", P=49, d=72, M=20) -> None:
    """Finite inputs near 1e30 (issue 10 §8): the cosine is scale invariant, so the selection must
    be that of the unscaled inputs (separated scores: the true top-M is unambiguous)."""
    patch, text, top = separated_inputs(3, P, d, M)
    for scale_p, scale_t in HUGE_SCALES:
        if dtype == torch.float16:  # float16 cannot hold these: only the fp32 text is huge
            scale_p = 1.0
        p = (patch.double() * scale_p).to(dtype=dtype, device=device)
        t = (text.double() * scale_t).to(dtype=torch.float32, device=device)
        assert bool(p.isfinite().all()) and bool(t.isfinite().all())
        keep, midx, mask = K.topk_mask(p, t, M, backend=backend)
        assert torch.equal(mask.cpu(), top), f"{backend} {dtype} scale ({scale_p:g}, {scale_t:g})"
        check_invariants((keep.cpu(), midx.cpu(), mask.cpu()), 3, P, M)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_finite_inputs_select_correctly(backend, dtype, poison):
    check_huge_inputs(backend, dtype)
    s = tm.topk_mask_scores(*random_inputs(2, 10, 8))
    s_big = tm.topk_mask_scores(random_inputs(2, 10, 8)[0] * 1e30, random_inputs(2, 10, 8)[1])
    torch.testing.assert_close(s_big, s, rtol=1e-6, atol=1e-6)  # same scores, not all ±0


def test_gumbel_noise_bad_arguments_name_them():
    for shape in (5, "ab", (2, -1), (2, 1.5), None):
        with pytest.raises(ValueError, match="shape"):
            K.gumbel_noise(shape, seed=0)
    for seed in (2**64, 2**63, -1, 1.7, True, "3"):
        with pytest.raises(ValueError, match="seed"):
            K.gumbel_noise((2, 3), seed=seed)
    assert K.gumbel_noise((2, 3), seed=2**63 - 1).shape == (2, 3)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((torch.randn(2, 10, 8), torch.randn(2, 8), 0), {}, "num_masked"),
        ((torch.randn(2, 10, 8), torch.randn(2, 8), 10), {}, "num_masked"),
        ((torch.randn(2, 10, 8), torch.randn(2, 8), -1), {}, "num_masked"),
        ((torch.randn(2, 10, 8), torch.randn(2, 8), 2.0), {}, "num_masked"),
        ((torch.randn(2, 10, 8), torch.randn(2, 8), True), {}, "num_masked"),
        ((torch.randn(2, 1, 8), torch.randn(2, 8), 1), {}, "num_masked"),
        ((torch.randn(10, 8), torch.randn(2, 8), 3), {}, "patch"),
        ((torch.randn(2, 10, 8), torch.randn(8), 3), {}, "text"),
        ((torch.randn(2, 10, 8), torch.randn(3, 8), 3), {}, "text"),
        ((torch.randn(2, 10, 8), torch.randn(2, 9), 3), {}, "text"),
        ((torch.randn(2, 10, 0), torch.randn(2, 0), 3), {}, "feature dim"),
        ((torch.randn(2, 10, 8), torch.randn(2, 8), 3), {"noise": torch.randn(2, 9)}, "noise"),
        ((torch.randn(2, 10, 8), torch.randn(2, 8), 3), {"noise": torch.randn(20)}, "noise"),
        ((torch.randn(2, 10, 8), torch.randn(2, 8), 3), {"noise": torch.ones(2, 10, dtype=torch.int64)}, "noise"),
        ((torch.randn(2, 10, 8), torch.randn(2, 8), 3), {"tau": 0.0}, "tau"),
        ((torch.randn(2, 10, 8), torch.randn(2, 8), 3), {"tau": float("nan")}, "tau"),
        ((torch.randint(0, 3, (2, 10, 8)), torch.randn(2, 8), 3), {}, "patch"),
        ((torch.randn(2, 10, 8), torch.randn(2, 8).double(), 3), {}, "text"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_value_error(args, kwargs, match):
    for backend in [None, *cpu_backends()]:
        with pytest.raises(ValueError, match=match):
            K.topk_mask(*args, **kwargs, backend=backend)
    with pytest.raises(ValueError, match=match):
        tm.topk_mask_reference(*args, **kwargs)


def test_inputs_requiring_grad_are_accepted():
    patch = torch.randn(2, 10, 8, requires_grad=True)
    text = torch.randn(2, 8, requires_grad=True)
    for backend in cpu_backends():
        out = K.topk_mask(patch, text, 4, backend=backend)
        assert not any(t.requires_grad for t in out)
    assert patch.grad is None


# ------------------------------------------------------------------ registry, custom ops


def test_registry_reasons_for_large_P_and_layout():
    patch, text = torch.randn(2, 2000, 8), torch.randn(2, 8)
    reasons = K.get_op("topk_mask").reasons(patch, text, 1000)
    for b in ("cpu", "triton", "cuda"):
        assert any("P=2000 > 1024" in r for r in reasons[b]), reasons[b]
    assert reasons["reference"] == []
    keep, midx, mask = K.topk_mask(patch, text, 1000)  # auto-dispatch lands on the reference
    check_invariants((keep, midx, mask), 2, 2000, 1000)
    with pytest.raises(NotImplementedError, match="P=2000 > 1024"):
        K.topk_mask(patch, text, 1000, backend="cpu")
    wide = torch.randn(2, 10, 8).transpose(1, 2).contiguous().transpose(1, 2)  # last dim strided
    reasons = K.get_op("topk_mask").reasons(wide, text, 3)
    assert any("contiguous last dim" in r for r in reasons["cpu"])
    assert_same(K.topk_mask(wide, text, 3), tm.topk_mask_reference(wide, text, 3))
    big_d = torch.randn(1, 4, 9000)
    assert any("d=9000 > 8192" in r for r in tm.supports_cuda(big_d, torch.randn(1, 9000), 2))


@needs_ext
def test_limits_are_read_from_the_extension(monkeypatch):
    """max P (cpu, cuda) and max d (cuda) are owned by csrc/topk_mask.h and read from
    semmim._C.limits(), not duplicated in Python."""
    assert tm.extension().limits() == {"topk_mask_max_p": 1024, "topk_mask_max_d_cuda": 8192}
    patch, text = random_inputs(1, 40, 16)
    assert tm.supports_cpu(patch, text, 2) == []
    monkeypatch.setattr(tm, "limits", lambda: {"topk_mask_max_p": 32, "topk_mask_max_d_cuda": 8})
    assert any("P=40 > 32" in r for r in tm.supports_cpu(patch, text, 2))
    assert any("d=16 > 8" in r for r in tm.supports_cuda(patch, text, 2))
    assert not any("P=40" in r for r in tm.supports_triton(patch, text, 2))  # triton's own


@needs_ext
def test_auto_dispatch_and_env_override(monkeypatch):
    patch, text = random_inputs(2, 49, 72)
    op = K.get_op("topk_mask")
    monkeypatch.delenv("SEMMIM_BACKEND", raising=False)
    if not interpret_mode():
        assert op.select(None, patch, text, 24).name == "cpu"
    monkeypatch.setenv("SEMMIM_BACKEND", "reference")
    assert op.select(None, patch, text, 24).name == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        K.topk_mask(patch, text, 24, backend="nope")


@needs_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cuda_entry_point_without_gpu_raises_clear_error():
    ext = tm.extension()
    want = "needs a CUDA GPU" if ext.build_info()["cuda"] else "built without CUDA"
    with pytest.raises(RuntimeError, match=want):
        ext.tm_topk_mask_cuda(0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0, 1e-12, 0, 0, 0, 0, 1, 4, 8, 2, 1, 0)
    patch, text = random_inputs(1, 4, 8)
    assert any("CUDA" in r for r in tm.supports_cuda(patch, text, 2))


@needs_ext
def test_opcheck_cpu_custom_op():
    patch, text = random_inputs(2, 49, 72)
    noise = K.gumbel_noise((2, 49), seed=0, device="cpu")
    op = tm._CUSTOM_OPS["cpu"]
    torch.library.opcheck(op, (patch, text, 24, noise, 0.5))
    torch.library.opcheck(op, (patch.half(), text, 1, None, 1.0))


@needs_ext
def test_custom_op_under_torch_compile():
    patch, text = random_inputs(2, 49, 72)
    op = tm._CUSTOM_OPS["cpu"]
    f = torch.compile(lambda p, t: op(p, t, 24, None, 1.0), backend="eager", fullgraph=True)
    assert_same(f(patch, text), tm.topk_mask_reference(patch, text, 24))


def test_info_example_runs_on_every_cpu_backend():
    args, kwargs = K.get_op("topk_mask").example(torch.device("cpu"))
    for backend in cpu_backends():
        check_invariants(K.topk_mask(*args, **kwargs, backend=backend), 2, 49, 24)


# ------------------------------------------------------------------ hypothesis fuzz


@needs_ext
@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(0, 3),
    P=st.integers(2, 80),
    d=st.integers(1, 40),
    m_frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    noisy=st.booleans(),
    dup=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_cpu_vs_reference(B, P, d, m_frac, dtype, noisy, dup, seed):
    M = min(P - 1, max(1, round(m_frac * P)))
    patch, text = random_inputs(B, P, d, dtype, seed=seed)
    if dup and B > 0:  # exact ties: repeat a few patches
        patch[:, P // 2 :] = patch[:, : P - P // 2].clone()
    noise = K.gumbel_noise((B, P), seed=seed, device="cpu") if noisy else None
    ref = tm.topk_mask_reference(patch, text, M, noise=noise, tau=0.5)
    out = tm.topk_mask_cpu(patch, text, M, noise=noise, tau=0.5)
    check_invariants(out, B, P, M)
    if B:
        s = tm.topk_mask_scores(patch, text, noise, 0.5)
        assert_matches_reference(out, ref, s, M, 2 * GAP_TOL[dtype])


# ------------------------------------------------------------------ build: Triton -> sm_90 PTX


@pytest.mark.skipif(tm.triton_import_error() != "", reason="triton is not importable")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("P,d", [(576, 768), (196, 256), (49, 72), (1024, 72)])
def test_triton_kernel_compiles_for_sm90(P, d, dtype):
    """Ahead-of-time compile for an H100 target (no GPU needed): catches GPU-only lowering errors
    the interpreter cannot, and checks the score math uses IEEE division/sqrt (Triton's default
    fp32 `/` and sqrt are approximate on GPU)."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception as e:  # pragma: no cover - depends on the triton build
        pytest.skip(f"triton AOT compile API unavailable: {e}")
    kernel = tm._topk_mask_fwd_kernel
    kinds = {"patch_ptr": f"*{dtype}", "text_ptr": "*fp32", "noise_ptr": "*fp32",
             "keep_ptr": "*i64", "mask_idx_ptr": "*i64", "mask_ptr": "*u8",
             "nonfinite_ptr": "*i32", "tau": "fp32", "eps": "fp32",
             "HAS_NOISE": "constexpr", "BLOCK_P": "constexpr", "BLOCK_D": "constexpr",
             "RESCUE_D": "constexpr"}  # fmt: skip
    sig = {n: kinds.get(n, "i32") for n in kernel.arg_names}
    block_p, block_d, num_warps = tm._triton_tiles(P, d)
    src = ASTSource(
        fn=kernel, signature=sig,
        constexprs={"HAS_NOISE": True, "BLOCK_P": block_p, "BLOCK_D": block_d,
                    "RESCUE_D": tm._rescue_d(block_d)},
    )  # fmt: skip
    try:
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    except RuntimeError as e:  # e.g. no ptxas in this triton wheel
        if "ptxas" in str(e).lower():
            pytest.skip(f"no ptxas: {e}")
        raise
    ptx = c.asm["ptx"]
    assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx
    assert "div.full.f32" not in ptx and "sqrt.approx.f32" not in ptx
    assert len(c.asm["cubin"]) > 0
    # no register spills (the rare overflow pass must not push the hot path over the limit)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    if os.path.exists(tool):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(c.asm["cubin"])
            f.flush()
            usage = subprocess.run(
                [tool, "--dump-resource-usage", f.name], capture_output=True, text=True
            ).stdout
        stack = [int(v) for v in re.findall(r"STACK:(\d+)", usage)]
        assert stack and max(stack) == 0, usage


# ------------------------------------------------------------------ interpret tier (Triton)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("P,d", [(2, 1), (49, 72), (197, 40), (1024, 16), (33, 300)])
def test_triton_interpret_matches_reference(P, d, dtype, poison):
    B = 2
    for M in ms_for(P):
        patch, text, top = separated_inputs(B, P, d, M, dtype, seed=P + M)
        out = tm.topk_mask_triton(patch, text, M)
        check_invariants(out, B, P, M)
        assert_same(out, tm.topk_mask_reference(patch, text, M), f"P={P} d={d} M={M}")
    patch, text = random_inputs(3, P, d, dtype)
    noise = K.gumbel_noise((3, P), seed=1, device="cpu")
    M = max(1, P // 2)
    out = tm.topk_mask_triton(patch, text, M, noise=noise, tau=0.3)
    ref = tm.topk_mask_reference(patch, text, M, noise=noise, tau=0.3)
    check_invariants(out, 3, P, M)
    assert_matches_reference(out, ref, tm.topk_mask_scores(patch, text, noise, 0.3), M, 1e-3)


@pytest.mark.interpret
def test_triton_interpret_ties_zero_norm_strided(poison):
    B, P, d = 2, 50, 24
    patch = torch.randn(d).expand(B, P, d).contiguous()
    text = torch.randn(B, d)
    _, midx, _ = tm.topk_mask_triton(patch, text, 9)
    assert midx.tolist() == [list(range(9))] * B
    patch, text = random_inputs(B, 20, 16)
    text[1] = 0
    patch[0, [2, 5, 11]] = 0
    text[0] = -text[0].abs()
    patch[0] = patch[0].abs()
    _, midx, _ = tm.topk_mask_triton(patch, text, 3)
    assert midx.tolist() == [[2, 5, 11], [0, 1, 2]]
    big, text = random_inputs(B, 2 * P, d + 3)
    patch = big[:, ::2, 1 : 1 + d]
    noise = torch.randn(P, B).t()
    out = tm.topk_mask_triton(patch, text[:, :d], 20, noise=noise)
    assert_same(out, tm.topk_mask_reference(patch, text[:, :d], 20, noise=noise))
    assert K.get_op("topk_mask").select(None, patch, text[:, :d], 20).name == "triton"
    patch = patch.clone()
    patch[1, 7, 3] = float("nan")
    with pytest.raises(ValueError, match="patch .*NaN or inf"):
        tm.topk_mask_triton(patch, text[:, :d], 20)
    check_invariants(tm.topk_mask_triton(patch, text[:, :d], 20, validate=False), B, P, 20)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_interpret_huge_finite_inputs(dtype, poison):
    check_huge_inputs("triton", dtype)


@pytest.mark.interpret
def test_triton_interpret_opcheck():
    patch, text = random_inputs(2, 49, 72)
    torch.library.opcheck(tm._CUSTOM_OPS["triton"], (patch, text, 24, None, 1.0))


# ------------------------------------------------------------------ cuda tier

GPU_SHAPES = [(2, 1), (49, 72), (196, 256), (196, 768), (197, 256), (576, 768), (1024, 72),
              (1024, 1024), (49, 13), (64, 5000)]  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P,d", GPU_SHAPES)
def test_gpu_backends_match_reference(backend, dtype, P, d, poison):
    B = 4
    for M in ms_for(P):
        patch, text, top = separated_inputs(B, P, d, M, dtype, device="cuda", seed=P + d + M)
        ref = tm.topk_mask_reference(patch, text, M)
        assert torch.equal(ref[2].cpu(), top)
        out = K.topk_mask(patch, text, M, backend=backend)
        check_invariants(out, B, P, M)
        assert_same(out, ref, f"{backend} P={P} d={d} M={M} {dtype}")
    patch, text = random_inputs(B, P, d, dtype, device="cuda")
    noise = K.gumbel_noise((B, P), seed=0, device="cuda")
    for M in ms_for(P):
        for nz in (None, noise):
            out = K.topk_mask(patch, text, M, noise=nz, tau=0.3, backend=backend)
            ref = tm.topk_mask_reference(patch, text, M, noise=nz, tau=0.3)
            check_invariants(out, B, P, M)
            s = tm.topk_mask_scores(patch, text, nz, 0.3)
            assert_matches_reference(out, ref, s, M, GAP_TOL[dtype] / 0.3)
        if has_cpu_ext():  # the cpu backend on the same (copied) inputs agrees on clear gaps
            out = K.topk_mask(patch, text, M, backend=backend)
            cpu = tm.topk_mask_cpu(patch.cpu(), text.cpu(), M)
            assert_matches_reference(out, cpu, tm.topk_mask_scores(patch, text), M, GAP_TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_ties_zero_norm_strided(backend, dtype, poison):
    B, P, d = 3, 300, 72
    patch = torch.randn(d, device="cuda").expand(B, P, d).to(dtype).contiguous()
    text = torch.randn(B, d, device="cuda").to(dtype)
    _, midx, _ = K.topk_mask(patch, text, 100, backend=backend)
    assert midx.cpu().tolist() == [list(range(100))] * B
    patch, text = random_inputs(2, 20, 16, dtype, device="cuda")
    text[1] = 0
    patch[0, [2, 5, 11]] = 0
    text[0] = -text[0].abs()
    patch[0] = patch[0].abs()
    _, midx, _ = K.topk_mask(patch, text, 3, backend=backend)
    assert midx.cpu().tolist() == [[2, 5, 11], [0, 1, 2]]
    big, text = random_inputs(B, 2 * P, d + 3, dtype, device="cuda")
    patch = big[:, ::2, 1 : 1 + d]  # misaligned rows: the cuda kernel's scalar path
    noise = torch.randn(P, B, device="cuda").t()
    out = K.topk_mask(patch, text[:, :d], 150, noise=noise, backend=backend)
    assert_same(out, tm.topk_mask_reference(patch, text[:, :d], 150, noise=noise))
    noise[1, 5] = float("inf")
    with pytest.raises(ValueError, match="noise .*NaN or inf"):
        K.topk_mask(patch, text[:, :d], 150, noise=noise, backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_huge_finite_inputs(backend, dtype, poison):
    check_huge_inputs(backend, dtype, device="cuda")


@pytest.mark.cuda
def test_gpu_opcheck_and_large_batch():
    patch, text = random_inputs(2, 49, 72, device="cuda")
    for name in ("cuda", "triton"):
        torch.library.opcheck(tm._CUSTOM_OPS[name], (patch, text, 24, None, 1.0))
    patch, text = random_inputs(256, 576, 768, torch.bfloat16, device="cuda")
    noise = K.gumbel_noise((256, 576), seed=0, device="cuda")
    ref = tm.topk_mask_reference(patch, text, 288, noise=noise)
    s = tm.topk_mask_scores(patch, text, noise)
    for name in ("cuda", "triton"):
        out = K.topk_mask(patch, text, 288, noise=noise, backend=name)
        check_invariants(out, 256, 576, 288)
        assert_matches_reference(out, ref, s, 288, GAP_TOL[torch.bfloat16])
