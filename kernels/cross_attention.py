"""Flash cross-attention: softmax(scale · Q Kᵀ + key padding bias) · V with Lq ≠ Lk.

Math
    out[b, i, h] = Σ_j softmax_j(scale · q[b, i, h] · k[b, j, h]  over keys j with key_mask[b, j])
                   · v[b, j, h]
    A query whose batch row has no real key gets zeros (never NaN), and zero gradients.
    Masked-out key slots take no part in the math on any backend: whatever k / v hold there
    (NaN / inf included) never reaches the output or the gradients, and their dk / dv are zero.
    scale defaults to Dh ** -0.5.

Shapes
    q (B, Lq, H, Dh); k, v (B, Lk, H, Dh); key_mask (B, Lk) bool, True = real token (the Hugging
    Face attention_mask convention) or None (every key is real)  ->  out (B, Lq, H, Dh).
    Cross-attention in VLP: text→image Lq≈25–40, Lk=197–577 (keys unpadded); image→text
    Lq=P+1, Lk≈25–40 (keys = padded text).

Backward
    FlashAttention-2: the forward saves the per-row log-sum-exp LSE (B, H, Lq) in fp32; the backward
    computes D = rowsum(dO ∘ O), recomputes P = exp(scale · Q Kᵀ − LSE) block by block, and
    dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − D), dQ = scale · dS K, dK = scale · dSᵀ Q.
    Deterministic, no atomics. Three plans (``_bwd_plan``):
      short_k  all keys fit one tile (image→text, Lk ≈ 40) and B·H fills the GPU: one kernel per
               (head, batch) keeps K, V, dK, dV on chip, walks the query blocks, computes D on the
               fly and writes dQ per block — q, out, dO, k, v read once (the bandwidth floor);
      short_q  the mirror when all queries fit one tile (text→image, Lq ≈ 40);
      general  D preprocessing kernel, dK/dV per key block (looping over query blocks), dQ per
               query block (looping over key blocks).

Limits
    triton: Dh ∈ {32, 64, 80, 128} (80 runs in a 128-wide padded tile with a mask on d), fp32 /
    fp16 / bf16, any Lq, Lk ≥ 1, q/k/v with any strides whose last dim is contiguous (the
    (B, L, H·Dh) projections viewed as (B, L, H, Dh) run without copies; a non-unit last-dim stride
    is copied once). Accumulation in fp32; fp32 inputs use IEEE fp32 dot products (no TF32).
    sdpa: torch.nn.functional.scaled_dot_product_attention; with a key mask torch cannot use its
    flash backend. No varlen (cu_seqlens) form: in the padded case (image→text) all keys already
    fit one tile and k, v are a small part of the traffic, so packing would save little.
    Block sizes come from a small table (``_tiles``), checked spill-free with ptxas for sm_90,
    not from autotuning.

Differences vs reference
    The reference materialises the (B, H, Lq, Lk) score matrix in fp32 (fp64 for fp64 inputs) and
    returns the input dtype. triton never materialises it and rounds P to the input dtype before the
    P·V and dS·K products (as FlashAttention does), so low-precision results differ from the
    reference by about the reference's own low-precision error; the tests bound it by 2× that error
    (3× for gradients) plus a small floor.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ._common import interpret_mode, new_output, triton_import_error, triton_reasons
from .registry import custom_op, define_op

__all__ = [
    "cross_attention",
    "cross_attention_reference",
    "supports_reference",
    "supports_sdpa",
    "supports_triton",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_HEAD_DIMS = (32, 64, 80, 128)


# --------------------------------------------------------------------------------------------
# input checks (shared by every backend)
# --------------------------------------------------------------------------------------------
def _prepare(q, k, v, key_mask=None, *, scale=None, validate: bool = True):
    """The one validator: shape/dtype/device checks (nothing reads tensor values, so
    ``validate`` changes nothing here) -> ``(q, k, v, key_mask), {"scale": float}``.

    Under autocast q, k, v of different dtypes are cast to the autocast dtype (as torch's
    scaled_dot_product_attention is); outside autocast a mismatch is a ValueError."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, L, H, Dh), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got k {tuple(k.shape)} v {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch mismatch: q has B={q.shape[0]}, k has B={k.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head mismatch: q has H={q.shape[2]}, k has H={k.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head dim mismatch: q has Dh={q.shape[3]}, k has Dh={k.shape[3]}")
    if not (q.dtype == k.dtype == v.dtype) and torch.is_autocast_enabled(q.device.type):
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    devs = {q.device, k.device, v.device}
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor):
            raise ValueError(
                f"key_mask must be a bool tensor or None, got {type(key_mask).__name__}"
            )
        if key_mask.dtype != torch.bool:
            raise ValueError(f"key_mask must be bool (True = real token), got {key_mask.dtype}")
        if tuple(key_mask.shape) != (k.shape[0], k.shape[1]):
            raise ValueError(
                f"key_mask must have shape (B, Lk) = {(k.shape[0], k.shape[1])}, "
                f"got {tuple(key_mask.shape)}"
            )
        devs.add(key_mask.device)
    if len(devs) > 1:
        desc = f"q on {q.device}, k on {k.device}, v on {v.device}"
        if key_mask is not None:
            desc += f", key_mask on {key_mask.device}"
        raise ValueError(f"all tensors must be on one device, got {desc}")
    if scale is None:
        scale = q.shape[3] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return (q, k, v, key_mask), {"scale": float(scale)}


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
def _zero_masked_keys(k, v, key_mask):
    """k, v with the masked-out key slots replaced by zeros: whatever they hold (NaN/inf
    included) takes no part in the math (0 · NaN would still be NaN in P·V), and they get zero
    gradients."""
    if key_mask is None:
        return k, v
    real = key_mask[:, :, None, None]  # (B, Lk, 1, 1)
    return torch.where(real, k, 0.0), torch.where(real, v, 0.0)


def _attention_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """The reference math in ``compute_dtype`` (tests also run it in low precision)."""
    k, v = _zero_masked_keys(k, v, key_mask)
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    s = torch.einsum("bihd,bjhd->bhij", qc, kc) * scale  # (B, H, Lq, Lk)
    empty = None
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        # softmax over an all -inf row is NaN: give rows without a real key a finite dummy row,
        # then zero their probabilities (and so their output and gradients)
        empty = ~key_mask.any(dim=1)[:, None, None, None]  # (B, 1, 1, 1)
        s = s.masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1)
    if empty is not None:
        p = p.masked_fill(empty, 0.0)
    return torch.einsum("bhij,bjhd->bihd", p, vc)  # (B, Lq, H, Dh)


def _reference(q, k, v, key_mask, *, scale: float) -> torch.Tensor:
    """Plain PyTorch cross-attention (the specification); fp32 math (fp64 for fp64 inputs).

    q (B, Lq, H, Dh), k/v (B, Lk, H, Dh), key_mask (B, Lk) bool or None -> (B, Lq, H, Dh) in q's
    dtype. Differentiable by autograd.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    return _attention_math(q, k, v, key_mask, scale, compute).to(q.dtype)


# --------------------------------------------------------------------------------------------
# sdpa (torch.nn.functional.scaled_dot_product_attention)
# --------------------------------------------------------------------------------------------
def _sdpa(q, k, v, key_mask, *, scale: float) -> torch.Tensor:
    """Cross-attention through torch's SDPA (whichever of its backends torch picks).

    The bool key mask becomes a (B, 1, 1, Lk) attention mask. Masked-out k/v slots are zeroed
    first (one copy of k and v): SDPA lets a NaN stored there into the whole row. Batch rows
    with no real key get an all-True dummy mask (some SDPA backends return NaN for an all-False
    row): they attend uniformly over those zeroed keys and values, so their output is exactly 0
    and their gradients too (dQ = dS·K = 0; dS = P∘(dP − D) = 0 since V = 0 and out = 0), with
    no extra pass over the output (its copy forward and backward was most of this backend's
    overhead over a direct SDPA call on CPU).
    """
    k, v = _zero_masked_keys(k, v, key_mask)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
    mask = None
    if key_mask is not None:
        empty = ~key_mask.any(dim=1)  # (B,)
        mask = (key_mask | empty[:, None])[:, None, None, :]  # (B, 1, 1, Lk)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)  # (B, Lq, H, Dh)


# --------------------------------------------------------------------------------------------
# triton
# --------------------------------------------------------------------------------------------
_LOG2E = 1.4426950408889634

if not triton_import_error():
    import triton
    import triton.language as tl

    # Sequence lengths, the mask's batch stride (= Lk) and the lse strides (H·Lq, Lq) are not
    # specialised (Triton would otherwise compile one variant per "== 1" / "% 16 == 0" pattern
    # of them): they bound loops and masks along rows, where divisibility buys no vector width.
    # The q/k/v/o strides stay specialised: their divisibility is what lets the Dh-wide rows
    # load as 16-byte vectors.
    _SIZE_ARGS = ["stride_mb", "stride_lb", "stride_lh", "Lq", "Lk"]

    # ---- shared @triton.jit helpers: one copy of each loop body (as flash-attention's Triton
    # code factors its inner loops), used by the forward and the four backward kernels

    @triton.jit
    def _load_rows(base, rows, stride_row, offs_d, mask):
        """(len(rows), BLOCK_D) tile of a (L, Dh) head slice; masked elements read as 0."""
        return tl.load(base + rows[:, None] * stride_row + offs_d[None, :], mask=mask, other=0.0)

    @triton.jit
    def _store_rows(base, rows, stride_row, offs_d, value, mask):
        tl.store(base + rows[:, None] * stride_row + offs_d[None, :], value, mask=mask)

    @triton.jit
    def _load_keys(k_base, v_base, stride_kn, stride_vn, mask_row, n, Lk, offs_d, in_d,
                   HAS_MASK: tl.constexpr, ZERO_K: tl.constexpr, ZERO_V: tl.constexpr):  # fmt: skip
        """k, v tiles of keys ``n`` and which of them are real (``valid_n``).

        Masked-out key slots take no part in the math whatever they hold (NaN/inf included):
        their scores become -inf (P = 0) and dS is zeroed there (:func:`_bwd_block`), but a
        product with the tile itself (P·V, dS·K) would still turn 0 · NaN into NaN, so the tile
        a kernel multiplies is loaded with masked slots as zeros (ZERO_K / ZERO_V). Only that
        one: a data-dependent load mask costs registers (measured with ptxas for sm_90)."""
        valid_n = n < Lk
        bound = valid_n[:, None] & in_d[None, :]
        if HAS_MASK:
            real = tl.load(mask_row + n, mask=valid_n, other=0)
            valid_n = valid_n & (real != 0)
        real_mask = valid_n[:, None] & in_d[None, :]
        k = _load_rows(k_base, n, stride_kn, offs_d, real_mask if ZERO_K else bound)
        v = _load_rows(v_base, n, stride_vn, offs_d, real_mask if ZERO_V else bound)
        return k, v, valid_n

    @triton.jit
    def _load_lse2(lse_row, m, in_m):
        """LSE of queries ``m`` in base 2 (+inf for padding: P = 0 there)."""
        return tl.load(lse_row + m, mask=in_m, other=float("inf")) * 1.4426950408889634

    @triton.jit
    def _bwd_block(q, do, lse2, delta, in_m, k, v, valid_n, qk_scale,
                   DOT_PRECISION: tl.constexpr):  # fmt: skip
        """P and dS = P ∘ (dO Vᵀ − D) of one (query block, key block): (BLOCK_M, BLOCK_N);
        both exactly 0 at masked keys and padded queries (whatever K/V hold there)."""
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        real = in_m[:, None] & valid_n[None, :]
        p = tl.where(real, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        return p, tl.where(real, p * (dp - delta[:, None]), 0.0)

    @triton.jit
    def _bwd_block_t(q, do, lse2, delta, in_m, k, v, valid_n, qk_scale,
                     DOT_PRECISION: tl.constexpr):  # fmt: skip
        """The same block transposed (rows = keys): Pᵀ, dSᵀ (BLOCK_N, BLOCK_M), for the kernels
        that accumulate dK, dV over query blocks."""
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        real = valid_n[:, None] & in_m[None, :]
        p_t = tl.where(real, tl.exp2(s_t - lse2[None, :]), 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        return p_t, tl.where(real, p_t * (dp_t - delta[None, :]), 0.0)

    @triton.jit(do_not_specialize=_SIZE_ARGS)
    def _cross_attention_fwd_kernel(
        Q, K, V, MASK, O, LSE,
        stride_qb, stride_qm, stride_qh,
        stride_kb, stride_kn, stride_kh,
        stride_vb, stride_vn, stride_vh,
        stride_ob, stride_om, stride_oh,
        stride_mb, stride_lb, stride_lh,
        Lq, Lk,
        Dh: tl.constexpr,
        qk_scale,  # qk_scale = scale · log2(e): the softmax runs in base 2
        HAS_MASK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        in_m = offs_m < Lq
        in_d = offs_d < Dh
        qm = in_m[:, None] & in_d[None, :]
        q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d, qm)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max (base 2)
        l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start_n in range(0, Lk, BLOCK_N):
            k, v, valid_n = _load_keys(k_base, v_base, stride_kn, stride_vn, MASK + b * stride_mb,
                                       start_n + offs_n, Lk, offs_d, in_d, HAS_MASK,
                                       False, True)  # fmt: skip
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            s = tl.where(valid_n[None, :], s, float("-inf"))  # key padding bias
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # no real key seen yet: keep the row at exp2(-inf) = 0 instead of exp2(-inf + inf) = NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        empty = l_i == 0.0  # the batch row has no real key: output zeros, LSE = +inf (so P = 0)
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(
            empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634
        )
        _store_rows(O + b * stride_ob + h * stride_oh, offs_m, stride_om, offs_d,
                    acc.to(O.dtype.element_ty), qm)  # fmt: skip
        tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse, mask=in_m)

    @triton.jit(do_not_specialize=["stride_lb", "stride_lh", "Lq"])
    def _cross_attention_bwd_preprocess_kernel(
        O, DO, DELTA,
        stride_ob, stride_om, stride_oh,
        stride_dob, stride_dom, stride_doh,
        stride_lb, stride_lh,
        Lq,
        Dh: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        msk = (offs_m < Lq)[:, None] & (offs_d < Dh)[None, :]
        o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, stride_om, offs_d, msk)
        do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_dom, offs_d, msk)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + b * stride_lb + h * stride_lh + offs_m, delta, mask=offs_m < Lq)

    @triton.jit(do_not_specialize=_SIZE_ARGS)
    def _cross_attention_bwd_dkdv_kernel(
        Q, K, V, MASK, DO, LSE, DELTA, DK, DV,
        stride_qb, stride_qm, stride_qh,
        stride_kb, stride_kn, stride_kh,
        stride_vb, stride_vn, stride_vh,
        stride_dob, stride_dom, stride_doh,
        stride_dkb, stride_dkn, stride_dkh,
        stride_dvb, stride_dvn, stride_dvh,
        stride_mb, stride_lb, stride_lh,
        Lq, Lk,
        Dh: tl.constexpr, scale, qk_scale,
        HAS_MASK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # one program per (key block, head, batch); loops over all query blocks
        pid_n = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        in_d = offs_d < Dh
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        k, v, valid_n = _load_keys(k_base, v_base, stride_kn, stride_vn, MASK + b * stride_mb,
                                   offs_n, Lk, offs_d, in_d, HAS_MASK, False, False)  # fmt: skip
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        l_base = b * stride_lb + h * stride_lh
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for start_m in range(0, Lq, BLOCK_M):
            m = start_m + offs_m
            in_m = m < Lq
            qm = in_m[:, None] & in_d[None, :]
            q = _load_rows(q_base, m, stride_qm, offs_d, qm)
            do = _load_rows(do_base, m, stride_dom, offs_d, qm)
            lse2 = _load_lse2(LSE + l_base, m, in_m)
            delta = tl.load(DELTA + l_base + m, mask=in_m, other=0.0)
            p_t, ds_t = _bwd_block_t(q, do, lse2, delta, in_m, k, v, valid_n, qk_scale,
                                     DOT_PRECISION)  # fmt: skip
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        st_mask = (offs_n < Lk)[:, None] & in_d[None, :]
        _store_rows(DK + b * stride_dkb + h * stride_dkh, offs_n, stride_dkn, offs_d,
                    (dk * scale).to(DK.dtype.element_ty), st_mask)  # fmt: skip
        _store_rows(DV + b * stride_dvb + h * stride_dvh, offs_n, stride_dvn, offs_d,
                    dv.to(DV.dtype.element_ty), st_mask)  # fmt: skip

    @triton.jit(do_not_specialize=_SIZE_ARGS)
    def _cross_attention_bwd_dq_kernel(
        Q, K, V, MASK, DO, LSE, DELTA, DQ,
        stride_qb, stride_qm, stride_qh,
        stride_kb, stride_kn, stride_kh,
        stride_vb, stride_vn, stride_vh,
        stride_dob, stride_dom, stride_doh,
        stride_dqb, stride_dqm, stride_dqh,
        stride_mb, stride_lb, stride_lh,
        Lq, Lk,
        Dh: tl.constexpr, scale, qk_scale,
        HAS_MASK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # one program per (query block, head, batch); loops over all key blocks
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        in_m = offs_m < Lq
        in_d = offs_d < Dh
        qm = in_m[:, None] & in_d[None, :]
        q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d, qm)
        do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_dom, offs_d, qm)
        l_base = b * stride_lb + h * stride_lh
        lse2 = _load_lse2(LSE + l_base, offs_m, in_m)
        delta = tl.load(DELTA + l_base + offs_m, mask=in_m, other=0.0)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start_n in range(0, Lk, BLOCK_N):
            k, v, valid_n = _load_keys(k_base, v_base, stride_kn, stride_vn, MASK + b * stride_mb,
                                       start_n + offs_n, Lk, offs_d, in_d, HAS_MASK,
                                       True, False)  # fmt: skip
            p, ds = _bwd_block(q, do, lse2, delta, in_m, k, v, valid_n, qk_scale, DOT_PRECISION)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        _store_rows(DQ + b * stride_dqb + h * stride_dqh, offs_m, stride_dqm, offs_d,
                    (dq * scale).to(DQ.dtype.element_ty), qm)  # fmt: skip

    @triton.jit(do_not_specialize=_SIZE_ARGS)
    def _cross_attention_bwd_short_k_kernel(
        Q, K, V, MASK, O, DO, LSE, DQ, DK, DV,
        stride_qb, stride_qm, stride_qh,
        stride_kb, stride_kn, stride_kh,
        stride_vb, stride_vn, stride_vh,
        stride_ob, stride_om, stride_oh,
        stride_dob, stride_dom, stride_doh,
        stride_dqb, stride_dqm, stride_dqh,
        stride_dkb, stride_dkn, stride_dkh,
        stride_dvb, stride_dvn, stride_dvh,
        stride_mb, stride_lb, stride_lh,
        Lq, Lk,
        Dh: tl.constexpr, scale, qk_scale,
        HAS_MASK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # The whole backward in one pass when every key fits in one BLOCK_N tile (image→text,
        # Lk ≈ 40): one program per (head, batch) keeps K, V, dK, dV on chip, walks the query
        # blocks once, computes D = rowsum(dO ∘ O) on the fly and writes each dQ block directly.
        # q, out, dO, k, v are read once; dq, dk, dv written once.
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        in_d = offs_d < Dh
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        k, v, valid_n = _load_keys(k_base, v_base, stride_kn, stride_vn, MASK + b * stride_mb,
                                   offs_n, Lk, offs_d, in_d, HAS_MASK, True, False)  # fmt: skip
        q_base = Q + b * stride_qb + h * stride_qh
        o_base = O + b * stride_ob + h * stride_oh
        do_base = DO + b * stride_dob + h * stride_doh
        dq_base = DQ + b * stride_dqb + h * stride_dqh
        l_base = b * stride_lb + h * stride_lh
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for start_m in range(0, Lq, BLOCK_M):
            m = start_m + offs_m
            in_m = m < Lq
            qm = in_m[:, None] & in_d[None, :]
            q = _load_rows(q_base, m, stride_qm, offs_d, qm)
            do = _load_rows(do_base, m, stride_dom, offs_d, qm)
            o = _load_rows(o_base, m, stride_om, offs_d, qm)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
            lse2 = _load_lse2(LSE + l_base, m, in_m)
            p_t, ds_t = _bwd_block_t(q, do, lse2, delta, in_m, k, v, valid_n, qk_scale,
                                     DOT_PRECISION)  # fmt: skip
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PRECISION) * scale
            _store_rows(dq_base, m, stride_dqm, offs_d, dq.to(DQ.dtype.element_ty), qm)
        st_mask = (offs_n < Lk)[:, None] & in_d[None, :]
        _store_rows(DK + b * stride_dkb + h * stride_dkh, offs_n, stride_dkn, offs_d,
                    (dk * scale).to(DK.dtype.element_ty), st_mask)  # fmt: skip
        _store_rows(DV + b * stride_dvb + h * stride_dvh, offs_n, stride_dvn, offs_d,
                    dv.to(DV.dtype.element_ty), st_mask)  # fmt: skip

    @triton.jit(do_not_specialize=_SIZE_ARGS)
    def _cross_attention_bwd_short_q_kernel(
        Q, K, V, MASK, O, DO, LSE, DQ, DK, DV,
        stride_qb, stride_qm, stride_qh,
        stride_kb, stride_kn, stride_kh,
        stride_vb, stride_vn, stride_vh,
        stride_ob, stride_om, stride_oh,
        stride_dob, stride_dom, stride_doh,
        stride_dqb, stride_dqm, stride_dqh,
        stride_dkb, stride_dkn, stride_dkh,
        stride_dvb, stride_dvn, stride_dvh,
        stride_mb, stride_lb, stride_lh,
        Lq, Lk,
        Dh: tl.constexpr, scale, qk_scale,
        HAS_MASK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # The mirror of the short-K kernel when every query fits in one BLOCK_M tile (text→image,
        # Lq ≈ 40): one program per (head, batch) keeps Q, dO, dQ on chip, walks the key blocks
        # once and writes each dK, dV block directly (all queries are in this program).
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        in_m = offs_m < Lq
        in_d = offs_d < Dh
        qm = in_m[:, None] & in_d[None, :]
        q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d, qm)
        do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_dom, offs_d, qm)
        o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, stride_om, offs_d, qm)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        lse2 = _load_lse2(LSE + b * stride_lb + h * stride_lh, offs_m, in_m)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        dk_base = DK + b * stride_dkb + h * stride_dkh
        dv_base = DV + b * stride_dvb + h * stride_dvh
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start_n in range(0, Lk, BLOCK_N):
            n = start_n + offs_n
            k, v, valid_n = _load_keys(k_base, v_base, stride_kn, stride_vn, MASK + b * stride_mb,
                                       n, Lk, offs_d, in_d, HAS_MASK, True, False)  # fmt: skip
            p, ds = _bwd_block(q, do, lse2, delta, in_m, k, v, valid_n, qk_scale, DOT_PRECISION)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION) * scale
            kv_mask = (n < Lk)[:, None] & in_d[None, :]
            _store_rows(dk_base, n, stride_dkn, offs_d, dk.to(DK.dtype.element_ty), kv_mask)
            _store_rows(dv_base, n, stride_dvn, offs_d, dv.to(DV.dtype.element_ty), kv_mask)
        _store_rows(DQ + b * stride_dqb + h * stride_dqh, offs_m, stride_dqm, offs_d,
                    (dq * scale).to(DQ.dtype.element_ty), qm)  # fmt: skip


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _tiles(kind: str, lq: int, lk: int, block_d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for one kernel from a small table instead of autotuning.

    ``kind``: "fwd", "short_k", "short_q" or "general" (the backward plans). The sizes are the
    largest that compile for sm_90 without register spills (every entry is compiled by
    tests/test_triton_compiles.py with the ptxas of the Triton wheel):
    16-bit inputs use tensor-core tiles up to 128; fp32 (IEEE dots, no tensor cores: a test and
    reference dtype here) uses 16/32-wide tiles. Short sides get one tile: next power of 2 ≥ L.
    """
    pm = max(16, _next_pow2(lq))
    pn = max(16, _next_pow2(lk))
    wide = block_d >= 128
    if dtype == torch.float32:
        if kind == "fwd":
            t = min(pm, 16 if wide else 32), min(pn, 16 if wide else 32)
        elif kind == "short_k":
            t = 16, pn
        elif kind == "short_q":
            t = pm, 16
        else:
            t = min(pm, 16), min(pn, 32)
        # 4 warps spill on sm_90 at a 32x32 forward tile with BLOCK_D >= 64 (168 registers, 8 B
        # of stack) and at the 16x16 dQ tile (4 B); 8 warps take 70 / 52-56 registers
        more = (kind == "fwd" and t == (32, 32) and block_d >= 64) or (
            kind == "general" and t == (16, 16)
        )
        return t[0], t[1], 8 if more else 4
    if kind == "fwd":
        bm = min(pm, 128)
        bn = min(pn, 64) if wide or lk > 128 else pn
        # wide 32-row tiles: 4 warps cap at 128 registers and spill 4 B on sm_90; 8 take 104
        return bm, bn, 8 if bm >= 128 or (wide and bm >= 32) else 4
    if kind == "short_k":  # K, V, dK, dV resident: BLOCK_N = all keys
        return (32 if pn > 64 or wide else 64), pn, 8
    if kind == "short_q":  # Q, dO, dQ resident: BLOCK_M = all queries
        return pm, (32 if wide else 64), 8
    # wide 32-row dQ tiles spill 4 B at 8 warps (128 registers) on sm_90; 4 warps take 140-192
    # (dK/dV: up to 246), no spills
    bm = min(pm, 64)
    return bm, min(pn, 64), 4 if wide and bm == 32 else 8


def _block_d(dh: int) -> int:
    return max(16, _next_pow2(dh))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must match the fp32 reference: no TF32 rounding of Q, K, P, dO
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _mask_arg(q: torch.Tensor, key_mask: torch.Tensor | None) -> tuple[torch.Tensor, int, bool]:
    if key_mask is None:
        return q, 0, False  # dummy pointer; HAS_MASK=False never reads it
    if key_mask.stride(1) != 1:  # e.g. a (B, 1) mask expanded over the keys
        key_mask = key_mask.contiguous()
    m = key_mask.view(torch.uint8)  # same storage, bool -> 0/1 bytes
    return m, m.stride(0), True


def _fwd_impl(q, k, v, key_mask, scale):
    """Launch the forward -> out (B, Lq, H, Dh), lse (B, H, Lq) fp32 (both from new_output)."""
    B, Lq, H, Dh = q.shape
    Lk = k.shape[1]
    out = new_output((B, Lq, H, Dh), dtype=q.dtype, device=q.device)
    lse = new_output((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if Lk == 0:
        out.zero_()
        lse.fill_(float("inf"))
        return out, lse
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    block_d = _block_d(Dh)
    block_m, block_n, num_warps = _tiles("fwd", Lq, Lk, block_d, q.dtype)
    mask, stride_mb, has_mask = _mask_arg(q, key_mask)
    grid = (triton.cdiv(Lq, block_m), H, B)
    _cross_attention_fwd_kernel[grid](
        q,
        k,
        v,
        mask,
        out,
        lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        stride_mb,
        lse.stride(0),
        lse.stride(1),
        Lq,
        Lk,
        Dh,
        scale * _LOG2E,
        HAS_MASK=has_mask,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps,
        num_stages=2,
    )
    return out, lse


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _bwd_plan(B: int, Lq: int, Lk: int, H: int, block_d: int, dtype: torch.dtype, device) -> str:
    """Which backward to run: "short_k" / "short_q" (one fused kernel, when all keys resp. all
    queries fit one tile and the (head, batch) pairs alone fill the GPU) or "general" (D
    preprocessing + dK/dV kernel + dQ kernel). fp32 always takes "general" (small tiles)."""
    if dtype != torch.float32 and B * H >= _num_sms(device):
        if Lk <= (32 if block_d >= 128 else 128):
            return "short_k"
        if Lq <= 64:
            return "short_q"
    return "general"


def _bwd_impl(do, q, k, v, key_mask, out, lse, scale, plan=None):
    """Launch the backward -> (dq, dk, dv) contiguous (from new_output). ``plan`` forces
    "short_k", "short_q" or "general" (default: :func:`_bwd_plan`)."""
    B, Lq, H, Dh = q.shape
    Lk = k.shape[1]
    dq = new_output((B, Lq, H, Dh), dtype=q.dtype, device=q.device)
    dk = new_output((B, Lk, H, Dh), dtype=k.dtype, device=k.device)
    dv = new_output((B, Lk, H, Dh), dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    # autograd may hand over an expanded (stride 0) or differently-typed gradient
    do = _last_dim_contiguous(do.to(q.dtype))
    q, k, v, out = (_last_dim_contiguous(t) for t in (q, k, v, out))
    block_d = _block_d(Dh)
    mask, stride_mb, has_mask = _mask_arg(q, key_mask)
    precision = _dot_precision(q.dtype)
    plan = plan or _bwd_plan(B, Lq, Lk, H, block_d, q.dtype, q.device)
    strides = (
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
    )  # fmt: skip

    if (plan == "short_k" and Lk > 128) or (plan == "short_q" and Lq > 64):
        raise ValueError(f"plan {plan!r} needs all keys (short_k) or queries (short_q) in one tile")
    if plan in ("short_k", "short_q"):
        kernel = (
            _cross_attention_bwd_short_k_kernel
            if plan == "short_k"
            else _cross_attention_bwd_short_q_kernel
        )
        block_m, block_n, num_warps = _tiles(plan, Lq, Lk, block_d, q.dtype)
        kernel[(1, H, B)](
            q, k, v, mask, out, do, lse, dq, dk, dv,
            *strides,
            *out.stride()[:3], *do.stride()[:3],
            *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
            stride_mb,
            lse.stride(0), lse.stride(1),
            Lq, Lk, Dh, scale, scale * _LOG2E,
            HAS_MASK=has_mask,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            DOT_PRECISION=precision,
            num_warps=num_warps,
            num_stages=2,
        )  # fmt: skip
        return dq, dk, dv
    if plan != "general":
        raise ValueError(f"plan must be 'short_k', 'short_q' or 'general', got {plan!r}")

    delta = new_output(tuple(lse.shape), dtype=torch.float32, device=lse.device)  # rowsum(dO ∘ O)
    pre_m = 64
    _cross_attention_bwd_preprocess_kernel[(triton.cdiv(Lq, pre_m), H, B)](
        out, do, delta,
        *out.stride()[:3], *do.stride()[:3],
        lse.stride(0), lse.stride(1),
        Lq, Dh,
        BLOCK_M=pre_m, BLOCK_D=block_d,
    )  # fmt: skip
    block_m, block_n, num_warps = _tiles("general", Lq, Lk, block_d, q.dtype)
    common = dict(
        HAS_MASK=has_mask,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_PRECISION=precision,
        num_warps=num_warps,
        num_stages=2,
    )
    _cross_attention_bwd_dkdv_kernel[(triton.cdiv(Lk, block_n), H, B)](
        q, k, v, mask, do, lse, delta, dk, dv,
        *strides,
        *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        stride_mb,
        lse.stride(0), lse.stride(1),
        Lq, Lk, Dh, scale, scale * _LOG2E,
        **common,
    )  # fmt: skip
    _cross_attention_bwd_dq_kernel[(triton.cdiv(Lq, block_m), H, B)](
        q, k, v, mask, do, lse, delta, dq,
        *strides,
        *do.stride()[:3], *dq.stride()[:3],
        stride_mb,
        lse.stride(0), lse.stride(1),
        Lq, Lk, Dh, scale, scale * _LOG2E,
        **common,
    )  # fmt: skip
    return dq, dk, dv


def _fwd_op_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: out (B, Lq, H, Dh), lse (B, H, Lq) fp32 natural log (+inf: no real key)."""
    return _fwd_impl(q, k, v, key_mask, scale)


def _fwd_op_fake(q, k, v, key_mask, scale):
    B, Lq, H, Dh = q.shape
    return q.new_empty((B, Lq, H, Dh)), q.new_empty((B, H, Lq), dtype=torch.float32)


def _bwd_op_impl(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: (dq, dk, dv), contiguous, in the inputs' dtype."""
    return _bwd_impl(do, q, k, v, key_mask, out, lse, scale)


def _bwd_op_fake(do, q, k, v, key_mask, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_bwd_op = custom_op("cross_attention_bwd_triton", _bwd_op_impl, fake=_bwd_op_fake)


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_mask, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, key_mask, out, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(dout, q, k, v, key_mask, out, lse, ctx.scale)
    return dq, dk, dv, None, None


_fwd_op = custom_op(
    "cross_attention_triton",
    _fwd_op_impl,
    fake=_fwd_op_fake,
    backward=_backward,
    setup_context=_setup_context,
)


def _triton(q, k, v, key_mask, *, scale: float) -> torch.Tensor:
    """Flash cross-attention in Triton (forward and backward kernels); see the module docstring."""
    return _fwd_op(q, k, v, key_mask, scale)[0]


# --------------------------------------------------------------------------------------------
# supports
# --------------------------------------------------------------------------------------------
def supports_reference(q, k, v, key_mask=None, *, scale=None) -> list[str]:
    return []


def supports_sdpa(q, k, v, key_mask=None, *, scale=None) -> list[str]:
    if not hasattr(F, "scaled_dot_product_attention"):
        return ["torch has no scaled_dot_product_attention"]
    return []


def supports_triton(q, k, v, key_mask=None, *, scale=None) -> list[str]:
    reasons = triton_reasons(q, k, v, key_mask)
    if isinstance(q, torch.Tensor) and q.dim() == 4:
        if q.shape[3] not in TRITON_HEAD_DIMS:
            reasons.append(f"Dh={q.shape[3]} not in {TRITON_HEAD_DIMS}")
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            reasons.append(f"dtype {q.dtype} not in (float32, float16, bfloat16)")
        elif q.dtype == torch.bfloat16 and interpret_mode():
            reasons.append("the Triton interpreter computes bf16 dot products wrongly")
    return reasons


# --------------------------------------------------------------------------------------------
# public op and registration
# --------------------------------------------------------------------------------------------
def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Multi-head cross-attention with a key padding mask (no Lq × Lk matrix on the fast path).

    Args:
        q: (B, Lq, H, Dh) queries, float32/float16/bfloat16 (float64 on reference and sdpa). Any
            strides; the triton backend reads (B, L, H·Dh) projections viewed as (B, L, H, Dh)
            without copies.
        k, v: (B, Lk, H, Dh), same dtype and device as q.
        key_mask: optional (B, Lk) bool, True = real token (Hugging Face ``attention_mask``).
        scale: softmax scale, default Dh ** -0.5.
        backend: "reference" | "sdpa" | "triton"; default: ``SEMMIM_BACKEND`` or the fastest
            that can run (triton on CUDA, sdpa on CPU).
        validate: accepted for the common op contract; this op reads no tensor values on the
            host, so it changes nothing.

    Returns:
        (B, Lq, H, Dh) in q's dtype: ``softmax(scale · q kᵀ + mask bias) v`` per head; a query
        whose batch row has no real key gets zeros (and zero gradients), never NaN.
        Differentiable in q, k, v.
    """
    return OP(q, k, v, key_mask, scale=scale, backend=backend, validate=validate)


def _example(device: torch.device) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 2, 32, generator=g).to(device)
    k = torch.randn(2, 7, 2, 32, generator=g).to(device)
    v = torch.randn(2, 7, 2, 32, generator=g).to(device)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3]).to(device)
    return (q, k, v, mask), {}


OP = define_op("cross_attention", prepare=_prepare, example=_example)
OP.register("reference", _reference, supports_reference)
OP.register("sdpa", _sdpa, supports_sdpa)
OP.register("triton", _triton, supports_triton)


def _on(backend: str):
    def fn(q, k, v, key_mask=None, *, scale=None, validate: bool = True):
        return cross_attention(q, k, v, key_mask, scale=scale, backend=backend, validate=validate)

    fn.__name__ = f"cross_attention_{backend}"
    fn.__doc__ = f"``cross_attention(..., backend={backend!r})`` (same contract)."
    return fn


cross_attention_reference = _on("reference")
