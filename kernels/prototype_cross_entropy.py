"""Fused prototype cross-entropy (kernel 4 of the SemMIM spec): student and teacher logits over
K prototypes, a centred sharpened teacher softmax and the student's cross-entropy against it,
without the (N, K) logit tensors on the fast backends.

Math
    wn = normalise(prototypes), wt = normalise(prototypes_teacher)   row-wise L2 (F.normalize)
    s = z @ wn.T,  t = z_teacher @ wt.T                                (N, K) cosine logits
    q = softmax((t - center) / teacher_temp)
    loss[n] = -Σ_k q[n, k] · log_softmax(s[n] / student_temp)[k]
            = LSE_k(s[n] / τs) − Σ_k q[n, k] · s[n, k] / τs          (Σ_k q = 1)
    teacher_logit_mean[k] = mean_n t[n, k]  (the centre update's batch statistic)
    This is ``agreement_loss(PrototypeHead(x), PrototypeHead_ema(x_m), ...)`` of
    semmim.losses with the head's MLP and feature normalisation done by the caller.

Where the normalisations run
    z and z_teacher arrive L2-normalised (the head's feature normalisation belongs to the head).
    The prototypes arrive raw and are normalised here, once for every backend, in the op's
    ``_prepare`` (``F.normalize`` under autograd): the head's weight norm (g fixed to 1) is
    exactly this, and its gradient (a (K, E) projection, cheap) is left to autograd instead of
    being written into every backend. The backends and the fused kernels take the normalised
    matrices.

Shapes
    z, z_teacher (N, E); prototypes, prototypes_teacher (K, E); center (K,)
    -> loss (N,), teacher_logit_mean (K,).  N rows (B for the global loss, B·M for MIM),
    E the head's bottleneck width, K prototypes.

Backward
    d loss[n] / d s[n, k] = (softmax(s[n] / τs)[k] − q[n, k]) / τs, so with ds = g[n] · that:
    dz = ds @ wn, dwn = dsᵀ @ z, then autograd carries dwn through the normalisation.
    Gradients flow to z and prototypes only: z_teacher, prototypes_teacher and center are
    constants (detached). The fast backends save only per-row log-sum-exps (fp32) of s/τs and of
    (t − c)/τt (the running max is folded into each) and recompute s and t tile by tile.

Backends
    reference  the materialising math, the specification (plain PyTorch and autograd).
    chunked    pure PyTorch custom op: rows in chunks (4 MiB per (chunk, K) buffer, at least 128
               rows), s and t recomputed in backward; peak extra memory O(chunk · K + K · E).
               Runs anywhere (any device, float64 too): the CPU backend and the fallback.
    triton     custom op: forward = one pass over K tiles with online softmaxes of s and t;
               backward = a dz kernel (rows × K tiles) and a dprototypes kernel (K tiles × rows),
               both recomputing s and t; no (N, K) tensor, no atomics (deterministic).

Precision
    The matmul operands keep their dtype (normalised prototypes are cast to z's dtype);
    products accumulate in fp32; the softmaxes, log-sum-exps and the loss are fp32 (fp64 for
    fp64 inputs): logits are never rounded to 16 bits. loss and teacher_logit_mean are returned
    in that compute dtype. The op turns autocast off inside itself. Under autocast, prototypes
    and prototypes_teacher may be in another float dtype than z (the autocast rule: normalised
    in their dtype, then cast to z's); outside autocast a dtype mismatch is a ValueError. center
    may be any float dtype (a statistic, used in the compute dtype). The model hands fp32
    features and fp32 prototypes, so its products are fp32 under autocast too.

Limits
    N, K, E ≥ 1. ``validate=False`` skips the value checks (one device→host sync): finiteness
    of the five tensors, and of a temperature given as a 0-d tensor (> 0 too); shapes, dtypes,
    devices and temperatures given as numbers are always checked. triton: E ≤ 512,
    fp32/fp16/bf16 (bf16 declined under the Triton interpreter, which computes bf16 dot
    products wrongly), last dims made contiguous. Tiles come from a small
    table (``_tiles``), not autotuned (no GPU has run them yet).

Differences vs reference
    chunked computes s/τs as z @ (wn/τs)ᵀ and (t − c)/τt as one addmm; chunked and triton compute
    teacher_logit_mean as (mean_n z_teacher) @ wtᵀ (linear, so equal in exact arithmetic): fp32
    rounding-level differences. triton rounds ds to the input dtype before the gradient products (as flash
    attention rounds P); 16-bit gradients differ from the reference by about that rounding.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from ._common import (
    cast_to_input,
    check_float,
    check_not_meta,
    check_same_device,
    check_tensor,
    interpret_mode,
    new_output,
    triton_import_error,
    triton_reasons,
)
from .registry import custom_op, define_op, no_grad_placeholder

__all__ = [
    "prototype_cross_entropy",
    "supports_reference",
    "supports_chunked",
    "supports_triton",
]

OP_NAME = "prototype_cross_entropy"
TRITON_MAX_E = 512
_FLOAT16 = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# the one validator, which also prepares the call for every backend
# --------------------------------------------------------------------------------------------


def _prepare(
    z, z_teacher, prototypes, prototypes_teacher, center, student_temp, teacher_temp, *,
    validate: bool = True,
):  # fmt: skip
    """ValueError naming the argument (the value checks only when ``validate``), then the
    call as every backend takes it: ``(z, z_teacher, wn, wt, center, τs, τt), {}`` with
    wn = normalise(prototypes) under autograd in z's dtype (the autocast rule),
    wt = normalise(prototypes_teacher) and a copy of center in the compute dtype (constants),
    z_teacher detached, each temperature a float or (given as a tensor) a copy in the compute
    dtype (``_snapshot``)."""
    for name, t in (("z_teacher", z_teacher), ("prototypes", prototypes),
                    ("prototypes_teacher", prototypes_teacher), ("center", center)):  # fmt: skip
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    check_tensor("z", z, "N, E")
    N, E = z.shape
    if N < 1 or E < 1:
        raise ValueError(f"z must have N >= 1 rows and E >= 1 columns, got {tuple(z.shape)}")
    if tuple(z_teacher.shape) != (N, E):
        raise ValueError(
            f"z_teacher must be (N, E) = {(N, E)} like z, got {tuple(z_teacher.shape)}"
        )
    if prototypes.dim() != 2 or prototypes.shape[0] < 1:
        raise ValueError(f"prototypes must be (K, E) with K >= 1, got {tuple(prototypes.shape)}")
    K = prototypes.shape[0]
    if prototypes.shape[1] != E:
        raise ValueError(
            f"prototypes (K, E) = {tuple(prototypes.shape)} has E={prototypes.shape[1]}, "
            f"z (N, E) = {tuple(z.shape)} has E={E}"
        )
    if tuple(prototypes_teacher.shape) != (K, E):
        raise ValueError(
            f"prototypes_teacher must be (K, E) = {(K, E)} like prototypes, "
            f"got {tuple(prototypes_teacher.shape)}"
        )
    if tuple(center.shape) != (K,):
        raise ValueError(f"center must be (K,) = ({K},), got {tuple(center.shape)}")
    check_float("z", z, allow_double=True)
    if z_teacher.dtype != z.dtype:
        raise ValueError(f"z_teacher dtype {z_teacher.dtype} != z dtype {z.dtype}")
    for name, w in (("prototypes", prototypes), ("prototypes_teacher", prototypes_teacher)):
        check_float(name, w, allow_double=True)
        cast_to_input(name, w[:0], z, "z")  # the autocast rule, checked before any math
    if not center.dtype.is_floating_point:
        raise ValueError(f"center must be a float tensor, got {center.dtype}")
    check_same_device(
        z=z, z_teacher=z_teacher, prototypes=prototypes,
        prototypes_teacher=prototypes_teacher, center=center,
    )  # fmt: skip
    check_not_meta(OP_NAME, z=z)  # one device: z speaks for all five
    # Logits are bounded by 1 (unit vectors) and divided by τ; a softmax takes differences of
    # them (up to ~4/τ with the centre), which must stay finite in the compute dtype.
    min_temp = 4.0 / torch.finfo(_compute_dtype(z)).max
    temps = {"student_temp": student_temp, "teacher_temp": teacher_temp}
    for name, v in temps.items():
        if isinstance(v, torch.Tensor):  # its value is checked below, with validate
            if v.dim() != 0 or not v.dtype.is_floating_point:
                raise ValueError(
                    f"{name} must be a number or a 0-d float tensor, "
                    f"got a {v.dtype} tensor of shape {tuple(v.shape)}"
                )
            check_same_device(z=z, **{name: v})
            continue
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool)
        if not ok or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if v < min_temp:
            raise ValueError(
                f"{name} must be >= {min_temp:.3g} for {str(z.dtype).removeprefix('torch.')} "
                f"inputs (the logits are divided by it and would overflow), got {v!r}"
            )
    if validate:
        named = (("z", z), ("z_teacher", z_teacher), ("prototypes", prototypes),
                 ("prototypes_teacher", prototypes_teacher), ("center", center))  # fmt: skip
        tensor_temps = [(n, v.detach()) for n, v in temps.items() if isinstance(v, torch.Tensor)]
        oks = [t.detach().isfinite().all() for _, t in named]
        oks += [v.isfinite() & (v >= min_temp) for _, v in tensor_temps]
        ok = torch.stack(oks).tolist()  # 1 sync
        bad = [name for (name, _), good in zip(named, ok) if not good]
        errors = [f"non-finite values (NaN or inf) in {', '.join(bad)}"] if bad else []
        errors += [
            f"{name} must be a finite number >= {min_temp:.3g} (> 0), got {v.item()!r} (a tensor)"
            for (name, v), good in zip(tensor_temps, ok[len(named) :])
            if not good
        ]
        if errors:
            raise ValueError("; ".join(errors))
    with _no_autocast(z):
        # normalised in the prototypes' own dtype, then (under autocast: checked above) cast
        wn = F.normalize(prototypes, dim=-1).to(z.dtype)
        wt = F.normalize(prototypes_teacher.detach(), dim=-1).to(z.dtype)
    cd = _compute_dtype(z)
    c = _snapshot(center.detach().to(cd))
    ts, tt = (
        _snapshot(v.detach().to(cd)) if isinstance(v, torch.Tensor) else float(v)
        for v in (student_temp, teacher_temp)
    )
    return (z, z_teacher.detach(), wn, wt, c, ts, tt), {}


def _snapshot_impl(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


# The centre (and a tensor temperature) as the backends see them: a copy made by an opaque op.
# The model updates its centre buffer in place after the loss, before backward (and a schedule
# may refill a temperature buffer). Under torch.compile the min-cut partitioner may recompute
# a plain `.clone()` or `.to()` in backward from the graph input, i.e. the updated buffer
# (wrong gradients, or autograd's "modified by an inplace operation" error); it never
# recomputes a custom op, so it saves this copy. One rule for every backend.
_snapshot = custom_op(
    "prototype_cross_entropy_snapshot", _snapshot_impl, fake=lambda x: torch.empty_like(x)
)


# --------------------------------------------------------------------------------------------
# shared pieces: compute dtype, autocast off, the centre statistic
# --------------------------------------------------------------------------------------------


def _compute_dtype(z: torch.Tensor) -> torch.dtype:
    return torch.promote_types(z.dtype, torch.float32)


def _no_autocast(t: torch.Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


@torch.no_grad()
def _teacher_logit_mean(z_teacher: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """mean_n (z_teacher @ wtᵀ)[n] = (mean_n z_teacher[n]) @ wtᵀ: a (K,) matvec, no (N, K)."""
    cd = _compute_dtype(z_teacher)
    return wt.to(cd) @ z_teacher.to(cd).mean(0)


# --------------------------------------------------------------------------------------------
# reference (the specification: materialises s, t, q and log_softmax; autograd)
# --------------------------------------------------------------------------------------------


def _reference(z, z_teacher, wn, wt, center, student_temp, teacher_temp):
    """Plain PyTorch on the prepared arguments, as the model computed it before the op:
    (loss (N,), teacher_logit_mean (K,)) in the compute dtype (fp32; fp64 for fp64)."""
    with _no_autocast(z):
        cd = _compute_dtype(z)
        s = F.linear(z.to(cd), wn.to(cd))  # (N, K)
        with torch.no_grad():
            t = F.linear(z_teacher.to(cd), wt.to(cd))  # (N, K)
            q = F.softmax((t - center) / teacher_temp, dim=-1)
        loss = -(q * F.log_softmax(s / student_temp, dim=-1)).sum(-1)
        return loss, t.mean(0)


# --------------------------------------------------------------------------------------------
# chunked (pure PyTorch, rows in chunks, recomputation in backward)
# --------------------------------------------------------------------------------------------

# one (chunk, K) compute-dtype buffer of about this many bytes: small enough to stay in cache,
CHUNK_BYTES = 4 << 20
# but at least this many rows: every chunk re-reads the (K, E) prototypes (and the backward
# updates the (K, E) gradient accumulator), ~rows/2 flop per byte moved; 16-row chunks at
# K = 65536 made fwd+bwd 1.4x slower than 128-row ones on CPU
MIN_CHUNK_ROWS = 128


def _chunk_rows(N: int, K: int, dtype: torch.dtype) -> int:
    return max(1, min(N, max(MIN_CHUNK_ROWS, CHUNK_BYTES // (K * dtype.itemsize))))


class _ChunkedImpl:
    """Row chunks of (chunk, K) buffers; ``ws = wn/τs`` folds the student temperature into the
    matmul and ``-c/τt`` + zt @ (wt/τt)ᵀ is one addmm for the teacher."""

    name = "chunked"

    @staticmethod
    def _scaled(z, zt, wn, wt, center, student_temp, teacher_temp):
        cd = _compute_dtype(z)
        ws = wn.to(cd) / student_temp  # (K, E): s/τs = z @ wsᵀ
        wts = wt.to(cd) / teacher_temp  # (K, E)
        cb = center.to(cd) / -teacher_temp  # (K,): (t - c)/τt = cb + zt @ wtsᵀ
        return cd, ws, wts, cb

    def forward(self, z, zt, wn, wt, center, student_temp, teacher_temp):
        N, K = z.shape[0], wn.shape[0]
        cd, ws, wts, cb = self._scaled(z, zt, wn, wt, center, student_temp, teacher_temp)
        loss = new_output((N,), dtype=cd, device=z.device)
        lse_s = new_output((N,), dtype=cd, device=z.device)
        lse_t = new_output((N,), dtype=cd, device=z.device)
        rows = _chunk_rows(N, K, cd)
        s_buf = z.new_empty((rows, K), dtype=cd)
        u_buf = z.new_empty((rows, K), dtype=cd)
        for i in range(0, N, rows):
            j = min(N, i + rows)
            s, u = s_buf[: j - i], u_buf[: j - i]
            torch.mm(z[i:j].to(cd), ws.T, out=s)  # s/τs
            torch.addmm(cb, zt[i:j].to(cd), wts.T, out=u)  # (t - c)/τt
            torch.logsumexp(s, 1, out=lse_s[i:j])
            torch.logsumexp(u, 1, out=lse_t[i:j])
            q = u.sub_(lse_t[i:j, None]).exp_()
            # loss = LSE(s/τs) - Σ q s/τs
            torch.sub(lse_s[i:j], q.mul_(s).sum(1), out=loss[i:j])
        return loss, lse_s, lse_t

    def backward(self, g, z, zt, wn, wt, center, lse_s, lse_t, student_temp, teacher_temp,
                 need_z, need_w):  # fmt: skip
        N, K = z.shape[0], wn.shape[0]
        cd, ws, wts, cb = self._scaled(z, zt, wn, wt, center, student_temp, teacher_temp)
        g = g.to(cd)
        dz = new_output(tuple(z.shape), dtype=z.dtype, device=z.device) if need_z else None
        dws = torch.zeros_like(ws) if need_w else None  # Σ g(p - q)ᵀ z, then / τs
        rows = _chunk_rows(N, K, cd)
        s_buf = z.new_empty((rows, K), dtype=cd)
        u_buf = z.new_empty((rows, K), dtype=cd)
        for i in range(0, N, rows):
            j = min(N, i + rows)
            zc = z[i:j].to(cd)
            s, u = s_buf[: j - i], u_buf[: j - i]
            p = torch.mm(zc, ws.T, out=s).sub_(lse_s[i:j, None]).exp_()
            q = torch.addmm(cb, zt[i:j].to(cd), wts.T, out=u).sub_(lse_t[i:j, None]).exp_()
            d = p.sub_(q).mul_(g[i:j, None])  # τs · ds
            if need_z:
                dz[i:j] = d @ ws  # ds @ wn
            if need_w:
                dws.addmm_(d.T, zc)
        dw = (dws / student_temp).to(wn.dtype) if need_w else None
        return dz, dw


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------

if not triton_import_error():
    import triton
    import triton.language as tl

    # N and K (row and prototype counts) only bound loops and row masks: not specialised, so
    # one variant per (dtype, E tile) serves every batch and prototype count. E and the row
    # strides stay specialised (16-byte vector loads of the E-wide rows).
    @triton.jit
    def _pce_inv_temps(TS, TT):
        """1/τs, 1/τt from the two 0-d temperature tensors (read on the device: a schedule's
        temperature is a tensor, so no host read and no recompile per step)."""
        return 1.0 / tl.load(TS).to(tl.float32), 1.0 / tl.load(TT).to(tl.float32)

    @triton.jit
    def _pce_tile(z, zt, w, wt, c, k_ok, inv_ts, inv_tt, DOT_PRECISION: tl.constexpr):
        """s/τs and (t - c)/τt for one (rows, K tile) block, -inf at padded prototypes."""
        s = tl.dot(z, tl.trans(w), input_precision=DOT_PRECISION) * inv_ts
        u = (tl.dot(zt, tl.trans(wt), input_precision=DOT_PRECISION) - c[None, :]) * inv_tt
        s = tl.where(k_ok[None, :], s, float("-inf"))
        u = tl.where(k_ok[None, :], u, float("-inf"))
        return s, u

    @triton.jit
    def _pce_load_rows(Z, ZT, rows, offs_e, n_ok, e_ok, stride_zn, stride_ztn):
        m = n_ok[:, None] & e_ok[None, :]
        r = rows.to(tl.int64)[:, None]
        z = tl.load(Z + r * stride_zn + offs_e[None, :], mask=m, other=0.0)
        zt = tl.load(ZT + r * stride_ztn + offs_e[None, :], mask=m, other=0.0)
        return z, zt

    @triton.jit
    def _pce_load_protos(W, WT, C, ks, offs_e, k_ok, e_ok, stride_wk, stride_wtk):
        m = k_ok[:, None] & e_ok[None, :]
        k = ks.to(tl.int64)[:, None]
        w = tl.load(W + k * stride_wk + offs_e[None, :], mask=m, other=0.0)
        wt = tl.load(WT + k * stride_wtk + offs_e[None, :], mask=m, other=0.0)
        c = tl.load(C + ks, mask=k_ok, other=0.0)
        return w, wt, c

    @triton.jit
    def _pce_ds(s, u, lse_s, lse_t, gs, n_ok):
        """ds = (softmax(s/τs) − q) · g/τs for one block (gs = g/τs); 0 at padded rows (padded
        prototypes give exp(-inf) = 0 already)."""
        ds = (tl.exp(s - lse_s[:, None]) - tl.exp(u - lse_t[:, None])) * gs[:, None]
        return tl.where(n_ok[:, None], ds, 0.0)

    @triton.jit(do_not_specialize=["N", "K"])
    def _pce_fwd_kernel(
        Z, ZT, W, WT, C, LOSS, LSE_S, LSE_T,
        N, K, E, stride_zn, stride_ztn, stride_wk, stride_wtk, TS, TT,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        inv_ts, inv_tt = _pce_inv_temps(TS, TT)
        # one program per BLOCK_N rows; online softmax of s/τs and of (t - c)/τt over K tiles,
        # plus a = Σ exp(u - m_t) · s/τs rescaled with the teacher's running max
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_e = tl.arange(0, BLOCK_E)
        n_ok = rows < N
        e_ok = offs_e < E
        z, zt = _pce_load_rows(Z, ZT, rows, offs_e, n_ok, e_ok, stride_zn, stride_ztn)
        m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        l_s = tl.zeros((BLOCK_N,), tl.float32)
        m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        l_t = tl.zeros((BLOCK_N,), tl.float32)
        a = tl.zeros((BLOCK_N,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            w, wt, c = _pce_load_protos(W, WT, C, ks, offs_e, k_ok, e_ok, stride_wk, stride_wtk)
            s, u = _pce_tile(z, zt, w, wt, c, k_ok, inv_ts, inv_tt, DOT_PRECISION)
            m_s_new = tl.maximum(m_s, tl.max(s, 1))
            l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s - m_s_new[:, None]), 1)
            m_s = m_s_new
            m_t_new = tl.maximum(m_t, tl.max(u, 1))
            alpha = tl.exp(m_t - m_t_new)
            pu = tl.exp(u - m_t_new[:, None])  # 0 at padded prototypes
            l_t = l_t * alpha + tl.sum(pu, 1)
            a = a * alpha + tl.sum(pu * tl.where(k_ok[None, :], s, 0.0), 1)
            m_t = m_t_new
        lse_s = m_s + tl.log(l_s)
        lse_t = m_t + tl.log(l_t)
        tl.store(LOSS + rows, lse_s - a / l_t, mask=n_ok)
        tl.store(LSE_S + rows, lse_s, mask=n_ok)
        tl.store(LSE_T + rows, lse_t, mask=n_ok)

    @triton.jit(do_not_specialize=["N", "K"])
    def _pce_bwd_dz_kernel(
        Z, ZT, W, WT, C, LSE_S, LSE_T, G, DZ,
        N, K, E, stride_zn, stride_ztn, stride_wk, stride_wtk, stride_dzn, TS, TT,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        inv_ts, inv_tt = _pce_inv_temps(TS, TT)
        # one program per BLOCK_N rows: dz = Σ over K tiles of ds @ wn
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_e = tl.arange(0, BLOCK_E)
        n_ok = rows < N
        e_ok = offs_e < E
        z, zt = _pce_load_rows(Z, ZT, rows, offs_e, n_ok, e_ok, stride_zn, stride_ztn)
        lse_s = tl.load(LSE_S + rows, mask=n_ok, other=0.0)
        lse_t = tl.load(LSE_T + rows, mask=n_ok, other=0.0)
        gs = tl.load(G + rows, mask=n_ok, other=0.0) * inv_ts
        dz = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            w, wt, c = _pce_load_protos(W, WT, C, ks, offs_e, k_ok, e_ok, stride_wk, stride_wtk)
            s, u = _pce_tile(z, zt, w, wt, c, k_ok, inv_ts, inv_tt, DOT_PRECISION)
            ds = _pce_ds(s, u, lse_s, lse_t, gs, n_ok)
            dz += tl.dot(ds.to(w.dtype), w, input_precision=DOT_PRECISION)
        m = n_ok[:, None] & e_ok[None, :]
        dz_ptrs = DZ + rows.to(tl.int64)[:, None] * stride_dzn + offs_e[None, :]
        tl.store(dz_ptrs, dz.to(DZ.dtype.element_ty), mask=m)

    @triton.jit(do_not_specialize=["N", "K"])
    def _pce_bwd_dw_kernel(
        Z, ZT, W, WT, C, LSE_S, LSE_T, G, DW,
        N, K, E, stride_zn, stride_ztn, stride_wk, stride_wtk, stride_dwk, TS, TT,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        inv_ts, inv_tt = _pce_inv_temps(TS, TT)
        # one program per BLOCK_K prototypes: dwn = Σ over row blocks of dsᵀ @ z
        ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_e = tl.arange(0, BLOCK_E)
        k_ok = ks < K
        e_ok = offs_e < E
        w, wt, c = _pce_load_protos(W, WT, C, ks, offs_e, k_ok, e_ok, stride_wk, stride_wtk)
        dw = tl.zeros((BLOCK_K, BLOCK_E), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            n_ok = rows < N
            z, zt = _pce_load_rows(Z, ZT, rows, offs_e, n_ok, e_ok, stride_zn, stride_ztn)
            lse_s = tl.load(LSE_S + rows, mask=n_ok, other=0.0)
            lse_t = tl.load(LSE_T + rows, mask=n_ok, other=0.0)
            gs = tl.load(G + rows, mask=n_ok, other=0.0) * inv_ts
            s, u = _pce_tile(z, zt, w, wt, c, k_ok, inv_ts, inv_tt, DOT_PRECISION)
            ds = _pce_ds(s, u, lse_s, lse_t, gs, n_ok)
            dw += tl.dot(tl.trans(ds.to(z.dtype)), z, input_precision=DOT_PRECISION)
        m = k_ok[:, None] & e_ok[None, :]
        dw_ptrs = DW + ks.to(tl.int64)[:, None] * stride_dwk + offs_e[None, :]
        tl.store(dw_ptrs, dw.to(DW.dtype.element_ty), mask=m)


def _tiles(E: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_E, num_warps) from a small table (not autotuned: no GPU has run
    these kernels yet). Every kernel holds two (BLOCK_N, BLOCK_E) row tiles and two
    (BLOCK_K, BLOCK_E) prototype tiles plus one fp32 accumulator.

    Each entry compiles for sm_90 without register spills (ptxas of the Triton 3.6 wheel,
    tests/test_triton_compiles.py): 16-bit E = 256 at (64, 64) needed 255 registers and spilled
    8 B in the dw kernel (255 in dz) with ~200 KB of shared memory; (32, 64) takes 155 / 175 registers
    (dz / dw) and ~100 KB. fp32 E = 128 at (32, 32) spilled 16 B; (16, 32) takes 70 / 76."""
    block_e = max(16, 1 << max(0, (E - 1).bit_length()))
    if dtype == torch.float32:
        if block_e > 256:
            return 16, 16, block_e, 8
        return (16, 32, block_e, 8) if block_e == 128 else (32, 32, block_e, 8)
    if block_e > 256:
        return 32, 32, block_e, 8
    return (32, 64, block_e, 8) if block_e == 256 else (64, 64, block_e, 8)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must match the fp32 reference: no TF32 rounding
    return "ieee" if dtype == torch.float32 else "tf32"


class _TritonImpl:
    name = "triton"

    def forward(self, z, zt, wn, wt, center, student_temp, teacher_temp):
        N, E = z.shape
        K = wn.shape[0]
        loss = new_output((N,), dtype=torch.float32, device=z.device)
        lse_s = new_output((N,), dtype=torch.float32, device=z.device)
        lse_t = new_output((N,), dtype=torch.float32, device=z.device)
        bn, bk, be, warps = _tiles(E, z.dtype)
        _pce_fwd_kernel[(triton.cdiv(N, bn),)](
            z, zt, wn, wt, center, loss, lse_s, lse_t,
            N, K, E, z.stride(0), zt.stride(0), wn.stride(0), wt.stride(0),
            student_temp, teacher_temp,
            BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=be, DOT_PRECISION=_dot_precision(z.dtype),
            num_warps=warps, num_stages=2,
        )  # fmt: skip
        return loss, lse_s, lse_t

    def backward(self, g, z, zt, wn, wt, center, lse_s, lse_t, student_temp, teacher_temp,
                 need_z, need_w):  # fmt: skip
        N, E = z.shape
        K = wn.shape[0]
        g = g.to(torch.float32).contiguous()  # autograd may hand an expanded (stride 0) grad
        bn, bk, be, warps = _tiles(E, z.dtype)
        args = (z, zt, wn, wt, center, lse_s, lse_t, g)
        sizes = (N, K, E, z.stride(0), zt.stride(0), wn.stride(0), wt.stride(0))
        meta = dict(
            BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=be, DOT_PRECISION=_dot_precision(z.dtype),
            num_warps=warps, num_stages=2,
        )  # fmt: skip
        dz = dw = None
        if need_z:
            dz = new_output((N, E), dtype=z.dtype, device=z.device)
            _pce_bwd_dz_kernel[(triton.cdiv(N, bn),)](
                *args, dz, *sizes, dz.stride(0), student_temp, teacher_temp, **meta
            )
        if need_w:
            dw = new_output((K, E), dtype=wn.dtype, device=wn.device)
            _pce_bwd_dw_kernel[(triton.cdiv(K, bk),)](
                *args, dw, *sizes, dw.stride(0), student_temp, teacher_temp, **meta
            )
        return dz, dw


# --------------------------------------------------------------------------------------------
# torch.library custom ops (one factory for the fused backends) with fake and autograd
# --------------------------------------------------------------------------------------------


def _make_custom_op(impl):
    """semmim::prototype_cross_entropy_<backend>(z, zt, wn, wt, center, τs, τt) ->
    (loss, lse_s, lse_t), differentiable in z and wn, the temperatures 0-d tensors in the
    compute dtype; its backward is the custom op semmim::prototype_cross_entropy_bwd_<backend>.

    The backward recomputes the teacher's softmax from the saved centre and temperatures: the
    copies ``_prepare`` made (see ``_snapshot``), not the model's buffers."""
    b = impl.name

    def fwd_impl(
        z: torch.Tensor,
        z_teacher: torch.Tensor,
        wn: torch.Tensor,
        wt: torch.Tensor,
        center: torch.Tensor,
        student_temp: torch.Tensor,
        teacher_temp: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with _no_autocast(z):
            return impl.forward(z, z_teacher, wn, wt, center, student_temp, teacher_temp)

    def fwd_fake(z, z_teacher, wn, wt, center, student_temp, teacher_temp):
        stat = z.new_empty((z.shape[0],), dtype=_compute_dtype(z))
        return stat, torch.empty_like(stat), torch.empty_like(stat)

    def bwd_impl(
        g: torch.Tensor,
        z: torch.Tensor,
        z_teacher: torch.Tensor,
        wn: torch.Tensor,
        wt: torch.Tensor,
        center: torch.Tensor,
        lse_s: torch.Tensor,
        lse_t: torch.Tensor,
        student_temp: torch.Tensor,
        teacher_temp: torch.Tensor,
        need_z: bool,
        need_w: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with _no_autocast(z):
            dz, dw = impl.backward(
                g, z, z_teacher, wn, wt, center, lse_s, lse_t, student_temp, teacher_temp,
                need_z, need_w,
            )  # fmt: skip
        return (dz if dz is not None else no_grad_placeholder(z),
                dw if dw is not None else no_grad_placeholder(wn))  # fmt: skip

    def bwd_fake(g, z, z_teacher, wn, wt, center, lse_s, lse_t, student_temp, teacher_temp,
                 need_z, need_w):  # fmt: skip
        return (z.new_empty(z.shape) if need_z else no_grad_placeholder(z),
                wn.new_empty(wn.shape) if need_w else no_grad_placeholder(wn))  # fmt: skip

    bwd_op = custom_op(f"prototype_cross_entropy_bwd_{b}", bwd_impl, fake=bwd_fake)

    def setup_context(ctx, inputs, output):
        z, z_teacher, wn, wt, center, student_temp, teacher_temp = inputs
        _, lse_s, lse_t = output
        ctx.save_for_backward(z, z_teacher, wn, wt, center, lse_s, lse_t, student_temp,
                              teacher_temp)  # fmt: skip
        ctx.mark_non_differentiable(lse_s, lse_t)

    def backward(ctx, g_loss, g_lse_s, g_lse_t):
        z, z_teacher, wn, wt, center, lse_s, lse_t, ts, tt = ctx.saved_tensors
        need_z, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        dz, dw = bwd_op(g_loss, z, z_teacher, wn, wt, center, lse_s, lse_t, ts, tt, need_z, need_w)
        return (dz if need_z else None, None, dw if need_w else None, None, None, None, None)

    return custom_op(
        f"prototype_cross_entropy_{b}", fwd_impl, fake=fwd_fake, backward=backward,
        setup_context=setup_context,
    )  # fmt: skip


_IMPLS = {"chunked": _ChunkedImpl()}
if not triton_import_error():
    _IMPLS["triton"] = _TritonImpl()
_CUSTOM_OPS = {name: _make_custom_op(impl) for name, impl in _IMPLS.items()}


def _contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _fused(name: str):
    """The backend function of custom op ``name``: (loss (N,), teacher_logit_mean (K,))."""

    def fn(z, z_teacher, wn, wt, center, student_temp, teacher_temp):
        if name == "triton":  # the kernels take a row stride and a unit column stride
            z, z_teacher, wn, wt = (_contiguous_rows(t) for t in (z, z_teacher, wn, wt))
        # the op takes 0-d tensors (a number becomes one here: no host read, no recompile)
        ts, tt = (
            t if isinstance(t, torch.Tensor) else z.new_full((), t, dtype=center.dtype)
            for t in (student_temp, teacher_temp)
        )
        with _no_autocast(z):
            loss = _CUSTOM_OPS[name](z, z_teacher, wn, wt, center, ts, tt)[0]
            return loss, _teacher_logit_mean(z_teacher, wt)

    return fn


# --------------------------------------------------------------------------------------------
# supports_*: cheap reasons a backend cannot run on the prepared arguments (empty = can run)
# --------------------------------------------------------------------------------------------


def supports_reference(*args, **kwargs) -> list[str]:
    return []


def supports_chunked(*args, **kwargs) -> list[str]:
    return []


def supports_triton(z, z_teacher, wn, wt, center, student_temp, teacher_temp) -> list[str]:
    reasons = triton_reasons(z, z_teacher, wn, wt, center)
    if z.dtype not in (torch.float32, *_FLOAT16):
        reasons.append(f"dtype {z.dtype} not in (float32, float16, bfloat16)")
    elif z.dtype == torch.bfloat16 and interpret_mode():
        reasons.append("the Triton interpreter computes bf16 dot products wrongly")
    if z.shape[1] > TRITON_MAX_E:
        reasons.append(f"E={z.shape[1]} > {TRITON_MAX_E}")
    return reasons


# --------------------------------------------------------------------------------------------
# registration and the public op
# --------------------------------------------------------------------------------------------


def _example(device: torch.device) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(6, 32, generator=g), dim=-1).to(device)
    zt = F.normalize(torch.randn(6, 32, generator=g), dim=-1).to(device)
    w = torch.randn(40, 32, generator=g).to(device)
    wt = torch.randn(40, 32, generator=g).to(device)
    return (z, zt, w, wt, torch.zeros(40, device=device), 0.1, 0.04), {}


OP = define_op(OP_NAME, prepare=_prepare, example=_example)
OP.register("triton", _fused("triton"), supports_triton)
OP.register("chunked", _fused("chunked"), supports_chunked)
OP.register("reference", _reference, supports_reference)


def prototype_cross_entropy(
    z: torch.Tensor,
    z_teacher: torch.Tensor,
    prototypes: torch.Tensor,
    prototypes_teacher: torch.Tensor,
    center: torch.Tensor,
    student_temp: float | torch.Tensor,
    teacher_temp: float | torch.Tensor,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the student's prototype softmax against the centred, sharpened teacher's.

    Args:
        z: (N, E) L2-normalised student features, float32/float16/bfloat16 (float64 on the
            reference and chunked backends).
        z_teacher: (N, E) L2-normalised teacher features, z's dtype (no gradient).
        prototypes: (K, E) student prototypes, raw: normalised here (row-wise, under autograd).
            z's dtype; under autocast a different float dtype is cast to z's.
        prototypes_teacher: (K, E) teacher prototypes, raw (no gradient), as prototypes.
        center: (K,) teacher centre, any float dtype (no gradient).
        student_temp, teacher_temp: temperatures τs, τt > 0, and at least 4 / (largest
            float of the compute dtype), ~1.2e-38 for fp32/fp16/bf16 inputs, so that the
            logits divided by them stay finite (a ValueError otherwise). Numbers, or 0-d float
            tensors on z's device (a schedule's value: a compiled caller then reads it as an
            input instead of recompiling for each new float; a tensor's value is checked only
            with ``validate``).
        backend: "reference" | "chunked" | "triton"; default: ``SEMMIM_BACKEND`` or the fastest
            that can run (triton on CUDA, chunked elsewhere).
        validate: check that every input is finite (one device→host sync); shape, dtype and
            device checks always run.

    Returns:
        loss (N,): −Σ_k softmax((t − center)/τt)[k] · log_softmax(s/τs)[k] per row, with
        s = z @ normalise(prototypes)ᵀ and t = z_teacher @ normalise(prototypes_teacher)ᵀ;
        teacher_logit_mean (K,): mean of t over the rows (for the centre update). Both fp32
        (fp64 for fp64 inputs). Differentiable in z and prototypes.
    """
    return OP(
        z, z_teacher, prototypes, prototypes_teacher, center, student_temp, teacher_temp,
        backend=backend, validate=validate,
    )  # fmt: skip
