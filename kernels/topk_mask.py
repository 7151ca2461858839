"""Text-guided masking: fused text–patch cosine similarity → noise → per-row top-M → sorted indices.

Math
    For each image b and patch p (fp32 math whatever the input dtype, EPS = 1e-12):
        dot[b,p]  = Σ_k patch[b,p,k] · text[b,k]
        s[b,p]    = dot[b,p] / (max(‖patch[b,p]‖, EPS) · max(‖text[b]‖, EPS))
    which is ⟨patch/max(‖patch‖,EPS), text/max(‖text‖,EPS)⟩ (cosine similarity; a zero-norm patch
    or text vector gets score 0, never NaN). With ``noise`` (B, P): s = s / tau + noise.
    The M = ``num_masked`` largest s per row are masked; among exactly equal scores the lower patch
    index is masked first (-0.0 and +0.0 count as equal).
    Huge inputs: where the plain fp32 evaluation overflows (|x| ≳ 1e19 squares to inf), every
    backend recomputes that score with patch[b,p] and text[b] pre-scaled by powers of two
    2^-e, e = clamp(floor(log2 max|x|), 0, 126) (exact; the cosine is scale invariant and the EPS
    floors scale along), so finite inputs of any magnitude get their true score (rare path: a
    second pass over that patch row, no cost otherwise; triton recomputes the whole row b, which
    for the other patches gives the same value up to subnormal rounding).

Shapes
    patch (B, P, d)  float32/float16/bfloat16; fused backends need the last dim contiguous (other
                     strides free; otherwise auto-dispatch falls back to the reference)
    text  (B, d)     any float dtype and layout (the fused backends read a (B, d) fp32 copy)
    noise (B, P)     optional, any float dtype and strides (fp32 is read in place; other dtypes
                     are converted once), e.g. :func:`gumbel_noise`
    -> keep_idx (B, R) int64 ascending, mask_idx (B, M) int64 ascending, mask (B, P) bool,
       R = P - M; keep_idx and mask_idx are disjoint and together cover 0..P-1.

Backward
    None: the selection is not differentiable. Inputs that require grad are accepted (they are
    detached); the outputs are integer/bool tensors and never require grad.

Limits
    1 <= M <= P-1. Fused backends (triton, cuda, cpu): P <= 1024 (the whole row's scores live in
    registers / shared memory; the cpu/cuda limits come from ``semmim._C.limits()``); the
    reference runs on any P. cuda: d <= 8192 (text row in shared memory). Inputs must be finite:
    NaN/inf anywhere in patch[b], text[b] or noise[b] makes some score of row b NaN/inf, so every
    backend also returns a per-row count of non-finite scores (computed in the same pass, no
    second read of patch) and ``validate=True`` (default) raises ValueError naming the offending
    argument when a count is nonzero. That check is a host sync (reading B int32s, once per
    call); ``validate=False`` skips it, and then the selection for rows with non-finite scores
    is unspecified (invariants still hold, no backend reads or writes out of bounds). Finite
    inputs whose noisy scores overflow (a tiny tau) also raise ValueError.

Differences vs reference
    Every backend computes s with the same fp32 formula, but the summation order of the dot
    product and of the squared norm differs (reference: BLAS / torch reductions; cpu: 16 partial
    sums; triton/cuda: tree reductions), so scores can differ in the last bits and the selected
    sets can differ only at near-ties: where the M-th and (M+1)-th largest scores are separated by
    more than the dtype tolerance, indices are identical. Exactly equal scores (e.g. duplicate
    patches) follow the lower-index rule in every backend. The cpu backend uses AVX2/FMA/F16C
    code on x86-64-v3 machines and portable code elsewhere (same lane order, FMA rounding only).
    Selection: reference = stable descending sort; cpu = nth_element on unique 64-bit
    (score key, ~index) keys; triton/cuda = 32-round bitwise search for the M-th largest score
    key, ties at that key taken in index order, then prefix sums to place each index.

torch.compile
    ``semmim::topk_mask_{cpu,cuda,triton}`` are torch.library custom ops with fake (meta)
    implementations, so they trace without graph breaks. The public op's finiteness check (a host
    sync) does break a graph: inside compiled regions pass ``validate=False``.

Backends: reference (PyTorch), triton, cuda (semmim._C), cpu (semmim._C, C++ OpenMP over rows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._common import (
    DTYPE_CODE,
    check_float,
    check_same_device,
    cpu_ext_reasons,
    cuda_ext_reasons,
    extension,
    limits,
    new_output,
    stream_of,
    triton_import_error,
    triton_reasons,
)
from .registry import custom_op, define_op

EPS = 1e-12  # normalisation floor: x / max(|x|, EPS), identical in every backend
MAX_P_TRITON = 1024  # the Triton kernel keeps one row's P scores in registers
# the cpu / cuda limits (P, and d for cuda) are owned by csrc/topk_mask.h: semmim._C.limits()

TopkMaskOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

__all__ = [
    "EPS",
    "gumbel_noise",
    "topk_mask",
    "topk_mask_cpu",
    "topk_mask_reference",
    "topk_mask_scores",
    "topk_mask_triton",
]


# ---------------------------------------------------------------------------------------------
# prepare: the one validator
# ---------------------------------------------------------------------------------------------
def _prepare(patch, text, num_masked, *, noise=None, tau=1.0, validate: bool = True):
    """Shape/dtype/device checks (always; nothing here reads tensor values) -> the detached call
    ``(patch, text, num_masked), {noise, tau}`` every backend gets."""
    if not isinstance(patch, torch.Tensor) or patch.dim() != 3:
        raise ValueError(
            f"patch must be a (B, P, d) tensor, got "
            f"{tuple(patch.shape) if isinstance(patch, torch.Tensor) else type(patch).__name__}"
        )
    if not isinstance(text, torch.Tensor) or text.dim() != 2:
        raise ValueError(
            f"text must be a (B, d) tensor, got "
            f"{tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__}"
        )
    check_float("patch", patch)
    check_float("text", text)
    B, P, d = patch.shape
    if text.shape[0] != B or text.shape[1] != d:
        raise ValueError(
            f"text must have shape (B, d) = ({B}, {d}) to match patch {tuple(patch.shape)}, "
            f"got {tuple(text.shape)}"
        )
    if d < 1:
        raise ValueError(f"patch feature dim d must be >= 1, got patch {tuple(patch.shape)}")
    if isinstance(num_masked, bool) or not isinstance(num_masked, int):
        raise ValueError(f"num_masked must be an int, got {type(num_masked).__name__}")
    if not 1 <= num_masked <= P - 1:
        raise ValueError(
            f"num_masked must satisfy 1 <= num_masked <= P-1 = {P - 1} for patch "
            f"{tuple(patch.shape)}, got {num_masked}"
        )
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (B, P):
            raise ValueError(
                f"noise must have shape (B, P) = ({B}, {P}) to match patch {tuple(patch.shape)}, "
                f"got {tuple(noise.shape) if isinstance(noise, torch.Tensor) else noise!r}"
            )
        check_float("noise", noise)
    if (
        isinstance(tau, bool)
        or not isinstance(tau, (int, float))
        or not math.isfinite(tau)
        or not tau > 0
    ):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    check_same_device(patch=patch, text=text, noise=noise)
    noise = noise.detach() if noise is not None else None
    return (patch.detach(), text.detach(), num_masked), {"noise": noise, "tau": float(tau)}


def _raise_non_finite(patch, text, noise, tau, rows: list[int]) -> None:
    """Error path only: find which input holds NaN/inf (extra passes are fine here)."""
    for name, t in (("patch", patch), ("text", text), ("noise", noise)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"{name} {tuple(t.shape)} contains NaN or inf (rows {rows[:8]}); topk_mask needs "
                "finite inputs"
            )
    raise ValueError(
        f"topk_mask: scores overflow to inf in rows {rows[:8]} although the inputs are finite "
        f"(tau={tau} too small)"
    )


def _finish(out, args: tuple, kwargs: dict, validate: bool) -> TopkMaskOut:
    """(keep_idx, mask_idx, mask, nonfinite) -> the public triple; with ``validate`` raise on
    non-finite scores (reads the B per-row counts the kernel wrote: one host sync)."""
    keep_idx, mask_idx, mask, nonfinite = out
    if validate and nonfinite.numel() and bool(nonfinite.any()):  # the host sync
        rows = nonfinite.nonzero().flatten().tolist()
        patch, text, _ = args
        _raise_non_finite(patch, text, kwargs["noise"], kwargs["tau"], rows)
    return keep_idx, mask_idx, mask


def _alloc_outputs(patch: torch.Tensor, num_masked: int):
    """keep_idx (B, R) int64, mask_idx (B, M) int64, mask (B, P) bool, nonfinite (B,) int32."""
    B, P, _ = patch.shape
    dev = patch.device
    keep_idx = new_output((B, P - num_masked), dtype=torch.int64, device=dev)
    mask_idx = new_output((B, num_masked), dtype=torch.int64, device=dev)
    mask = new_output((B, P), dtype=torch.bool, device=dev)
    nonfinite = new_output((B,), dtype=torch.int32, device=dev)
    return keep_idx, mask_idx, mask, nonfinite


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------
def _pow2_scale(maxabs: torch.Tensor) -> torch.Tensor:
    """2^-e, e = clamp(floor(log2(maxabs)), 0, 126): exact powers of two that only scale down."""
    e = ((maxabs.view(torch.int32) >> 23) & 0xFF) - 127
    return torch.ldexp(torch.ones_like(maxabs), -e.clamp(0, 126))


def _cosine(p32, t32, eps_p=EPS, eps_t=EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) fp32 cosine with the EPS floors, and where the plain fp32 evaluation overflowed."""
    dot = torch.bmm(p32, t32.unsqueeze(-1)).squeeze(-1)  # (B, P)
    ss = (p32 * p32).sum(-1)  # (B, P)
    p_norm = torch.linalg.vector_norm(p32, dim=-1)  # (B, P)
    t_norm = torch.linalg.vector_norm(t32, dim=-1, keepdim=True)  # (B, 1)
    denom = torch.maximum(p_norm, torch.as_tensor(eps_p)) * torch.maximum(
        t_norm, torch.as_tensor(eps_t)
    )
    ovf = ~(dot.isfinite() & ss.isfinite() & (t_norm * t_norm).isfinite() & denom.isfinite())
    return dot / denom, ovf


def topk_mask_scores(
    patch: torch.Tensor, text: torch.Tensor, noise: torch.Tensor | None = None, tau: float = 1.0
) -> torch.Tensor:
    """The fp32 scores s (B, P) that every backend ranks (see the module docstring)."""
    p32 = patch.detach().float()  # (B, P, d)
    t32 = text.detach().float()  # (B, d)
    s, ovf = _cosine(p32, t32)
    # where the plain evaluation overflowed (|x| >~ 1e19): both vectors pre-scaled by powers of
    # two (computed everywhere, no data-dependent branch: the reference reads no values on the
    # host either)
    sa = _pow2_scale(p32.abs().amax(dim=-1))  # (B, P)
    st = _pow2_scale(t32.abs().amax(dim=-1))  # (B,)
    rescued, _ = _cosine(p32 * sa[..., None], t32 * st[:, None], EPS * sa, EPS * st[:, None])
    s = torch.where(ovf, rescued, s)
    if noise is not None:
        s = s / tau + noise.detach().float()
    return s


def _topk_mask_reference_impl(
    patch: torch.Tensor,
    text: torch.Tensor,
    num_masked: int,
    noise: torch.Tensor | None,
    tau: float,
):
    """-> keep_idx, mask_idx, mask, nonfinite (B,) int32 (per-row count of NaN/inf scores)."""
    B, P, _ = patch.shape
    with torch.no_grad():
        s = topk_mask_scores(patch, text, noise, tau)  # (B, P) fp32
        nonfinite = (~torch.isfinite(s)).sum(dim=1, dtype=torch.int32)  # (B,)
        s = s + 0.0  # -0.0 -> +0.0: equal scores must rank by index alone
        # stable descending sort: equal scores keep ascending index order -> lower index first
        order = torch.sort(s, dim=1, descending=True, stable=True).indices  # (B, P)
        mask_idx = order[:, :num_masked].sort(dim=1).values  # (B, M)
        keep_idx = order[:, num_masked:].sort(dim=1).values  # (B, R)
        mask = torch.zeros(B, P, dtype=torch.bool, device=patch.device)
        mask.scatter_(1, mask_idx, True)
    return keep_idx, mask_idx, mask, nonfinite


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------
if not triton_import_error():
    import triton
    import triton.language as tl

    @triton.jit
    def _tl_finite(x):
        return (x.to(tl.int32, bitcast=True) & 0x7F800000) != 0x7F800000

    @triton.jit
    def _tl_pow2_scale(maxabs):
        # 2^-e, e = clamp(floor(log2(maxabs)), 0, 126): exact, scales down only (as the C++)
        e = ((maxabs.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.minimum(tl.maximum(e, 0), 126)
        return ((127 - e) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _tl_rescued_cosine(
        row_ptr, row_off, valid, t_ptr, D, eps, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        """(BLOCK_P,) cosines of the patch rows and the text with both pre-scaled by powers of
        two (cosine is scale invariant, the EPS floors scale along): finite at any magnitude."""
        ap = tl.zeros([BLOCK_P], dtype=tl.float32)
        at = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            t = tl.load(t_ptr + offs_d, mask=d_ok, other=0.0)
            x = tl.load(
                row_ptr + row_off[:, None] + offs_d[None, :],
                mask=valid[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            ap = tl.maximum(ap, tl.max(tl.abs(x), axis=1))
            at = tl.maximum(at, tl.abs(t))
        sa = _tl_pow2_scale(ap)  # (BLOCK_P,)
        st = _tl_pow2_scale(tl.max(at, axis=0))
        dot = tl.zeros([BLOCK_P], dtype=tl.float32)
        ss = tl.zeros([BLOCK_P], dtype=tl.float32)
        tss = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            t = tl.load(t_ptr + offs_d, mask=d_ok, other=0.0) * st
            x = (
                tl.load(
                    row_ptr + row_off[:, None] + offs_d[None, :],
                    mask=valid[:, None] & d_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                * sa[:, None]
            )
            dot += tl.sum(x * t[None, :], axis=1)
            ss += tl.sum(x * x, axis=1)
            tss += t * t
        t_norm = tl.maximum(tl.sqrt_rn(tl.sum(tss, axis=0)), eps * st)
        return tl.math.div_rn(dot, tl.maximum(tl.sqrt_rn(ss), eps * sa) * t_norm)

    # P, M (one variant per mask count otherwise) and the noise strides (one fp32 value per
    # patch) are not specialised; D and the patch strides are (16-byte loads along D).
    @triton.jit(do_not_specialize=["P", "M", "stride_nb", "stride_np"])
    def _topk_mask_fwd_kernel(
        patch_ptr, text_ptr, noise_ptr, keep_ptr, mask_idx_ptr, mask_ptr, nonfinite_ptr,
        P, D, M, stride_pb, stride_pp, stride_tb, stride_nb, stride_np, tau, eps,
        HAS_NOISE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
        RESCUE_D: tl.constexpr,
    ):  # fmt: skip
        """One program per row b: scores of all P patches in registers, then top-M selection."""
        b = tl.program_id(0).to(tl.int64)
        offs_p = tl.arange(0, BLOCK_P)
        valid = offs_p < P
        row_off = offs_p.to(tl.int64) * stride_pp  # (BLOCK_P,)
        dot = tl.zeros([BLOCK_P], dtype=tl.float32)
        ss = tl.zeros([BLOCK_P], dtype=tl.float32)
        tss = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            t = tl.load(text_ptr + b * stride_tb + offs_d, mask=d_ok, other=0.0)  # fp32
            x = tl.load(
                patch_ptr + b * stride_pb + row_off[:, None] + offs_d[None, :],
                mask=valid[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)  # (BLOCK_P, BLOCK_D)
            dot += tl.sum(x * t[None, :], axis=1)
            ss += tl.sum(x * x, axis=1)
            tss += t * t
        t_norm = tl.maximum(tl.sqrt_rn(tl.sum(tss, axis=0)), eps)
        # IEEE sqrt / division (Triton's default fp32 `/` and tl.sqrt are approximate on GPU)
        denom = tl.maximum(tl.sqrt_rn(ss), eps) * t_norm
        s = tl.math.div_rn(dot, denom)
        # plain fp32 overflowed (|x| >~ 1e19 squares to inf; NaN/inf inputs land here too):
        # recompute those patches with both vectors pre-scaled by powers of two (rare path)
        # the whole row then (not just those patches: nothing of the plain pass stays live
        # through the rescue; for the others the pre-scaled formula gives the same value up to
        # subnormal rounding). Narrower tiles there keep the rare path under the hot path's
        # register count.
        ovf = valid & ~(_tl_finite(dot) & _tl_finite(ss) & _tl_finite(denom) & _tl_finite(t_norm))
        if tl.sum(ovf.to(tl.int32), axis=0) > 0:
            s = _tl_rescued_cosine(
                patch_ptr + b * stride_pb, row_off, valid, text_ptr + b * stride_tb, D, eps,
                BLOCK_P, RESCUE_D,
            )  # fmt: skip
        if HAS_NOISE:
            nz = tl.load(noise_ptr + b * stride_nb + offs_p.to(tl.int64) * stride_np,
                         mask=valid, other=0.0)  # fmt: skip
            s = tl.math.div_rn(s, tl.zeros_like(s) + tau) + nz
        exp_bits = s.to(tl.int32, bitcast=True) & 0x7F800000  # all ones: NaN or inf
        bad = valid & (exp_bits == 0x7F800000)
        tl.store(nonfinite_ptr + b, tl.sum(bad.to(tl.int32), axis=0))

        # order-preserving float -> int64 key in [0, 2^32); -0.0 == +0.0; padding -> -1
        bits = s.to(tl.int32, bitcast=True)
        bits = tl.where((bits & 0x7FFFFFFF) == 0, 0, bits)
        skey = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        key = tl.where(valid, skey.to(tl.int64) + 2147483648, -1)

        # thr = M-th largest key: the largest value with #{key >= thr} >= M, built bit by bit
        thr = tl.zeros([], dtype=tl.int64)
        one = tl.full([], 1, dtype=tl.int64)
        for i in range(32):
            cand = thr + (one << (31 - i))
            cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
            thr = tl.where(cnt >= M, cand, thr)
        gt = key > thr
        eq = key == thr
        need = M - tl.sum(gt.to(tl.int32), axis=0)  # ties at thr: lowest indices first
        eq_i = eq.to(tl.int32)
        eq_rank = tl.cumsum(eq_i, axis=0) - eq_i
        masked = gt | (eq & (eq_rank < need))
        m_i = masked.to(tl.int32)
        m_rank = tl.cumsum(m_i, axis=0) - m_i  # slot in mask_idx; p - m_rank is the keep slot
        idx = offs_p.to(tl.int64)
        tl.store(mask_ptr + b * P + offs_p, m_i.to(tl.uint8), mask=valid)
        tl.store(mask_idx_ptr + b * M + m_rank, idx, mask=valid & masked)
        tl.store(keep_ptr + b * (P - M) + (offs_p - m_rank), idx, mask=valid & (m_i == 0))


def _triton_tiles(P: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_D, num_warps): (BLOCK_P, BLOCK_D) tiles of ~16 elements per thread; no
    register spills on sm_90 (checked with ptxas -v for P = 2..1024, fp32 and bf16)."""
    block_p = max(16, 1 << (P - 1).bit_length())
    num_warps = 16 if block_p >= 512 else 8 if block_p >= 256 else 4
    tile = 16 * 32 * num_warps
    block_d = min(max(8, tile // block_p), max(8, 1 << (d - 1).bit_length()))
    return block_p, block_d, num_warps


def _rescue_d(block_d: int) -> int:
    """BLOCK_D of the rare overflow pass: a quarter of the hot pass's (fewer registers)."""
    return max(1, block_d // 4)


def _run_triton(patch, text, num_masked, noise, tau) -> TopkMaskOut:
    B, P, d = patch.shape
    keep_idx, mask_idx, mask, nonfinite = out = _alloc_outputs(patch, num_masked)
    if B == 0:
        return out
    t32 = text.float().contiguous()
    n32 = noise.float() if noise is not None else None
    block_p, block_d, num_warps = _triton_tiles(P, d)
    _topk_mask_fwd_kernel[(B,)](
        patch, t32, n32 if n32 is not None else t32, keep_idx, mask_idx, mask.view(torch.uint8),
        nonfinite,
        P, d, num_masked, patch.stride(0), patch.stride(1), t32.stride(0),
        n32.stride(0) if n32 is not None else 0, n32.stride(1) if n32 is not None else 0,
        float(tau), EPS,
        HAS_NOISE=n32 is not None, BLOCK_P=block_p, BLOCK_D=block_d,
        RESCUE_D=_rescue_d(block_d), num_warps=num_warps,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# compiled backends over semmim._C
# ---------------------------------------------------------------------------------------------
def _vec_width(patch: torch.Tensor) -> int:
    """16-byte vectors when d, the strides and the address allow it (cuda), else 1."""
    vec = 16 // patch.element_size()
    d = patch.shape[2]
    ok = d % vec == 0 and patch.stride(0) % vec == 0 and patch.stride(1) % vec == 0
    ok = ok and patch.data_ptr() % 16 == 0
    return vec if ok else 1


def _run_compiled(name: str, patch, text, num_masked, noise, tau) -> TopkMaskOut:
    B, P, d = patch.shape
    keep_idx, mask_idx, mask, nonfinite = out = _alloc_outputs(patch, num_masked)
    if B == 0:
        return out
    t32 = text.float().contiguous()  # (B, d): tiny; kernels read the text row as fp32
    n32 = noise.float() if noise is not None else None  # no copy for fp32 noise
    args = (
        patch.data_ptr(), patch.stride(0), patch.stride(1), DTYPE_CODE[patch.dtype],
        t32.data_ptr(), t32.stride(0),
        n32.data_ptr() if n32 is not None else 0,
        n32.stride(0) if n32 is not None else 0, n32.stride(1) if n32 is not None else 0,
        float(tau), EPS, keep_idx.data_ptr(), mask_idx.data_ptr(), mask.data_ptr(),
        nonfinite.data_ptr(), B, P, d, num_masked,
    )  # fmt: skip
    ext = extension()
    if name == "cuda":
        ext.tm_topk_mask_cuda(*args, _vec_width(patch), stream_of(patch))
    else:
        ext.tm_topk_mask_cpu(*args)
    return out


_RUNNERS = {
    "triton": _run_triton,
    "cuda": lambda *a: _run_compiled("cuda", *a),
    "cpu": lambda *a: _run_compiled("cpu", *a),
}


def _make_custom_op(name: str):
    """semmim::topk_mask_<name> through the factory (fake impl -> composes with torch.compile).
    No autograd: the outputs are integer/bool and the public op detaches the inputs."""
    run = _RUNNERS[name]

    def impl(
        patch: torch.Tensor, text: torch.Tensor, num_masked: int, noise: torch.Tensor | None,
        tau: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        return run(patch, text, num_masked, noise, tau)

    def fake(patch, text, num_masked, noise, tau):
        B, P, _ = patch.shape
        return (
            patch.new_empty((B, P - num_masked), dtype=torch.int64),
            patch.new_empty((B, num_masked), dtype=torch.int64),
            patch.new_empty((B, P), dtype=torch.bool),
            patch.new_empty((B,), dtype=torch.int32),
        )

    return custom_op(f"topk_mask_{name}", impl, fake=fake)


_CUSTOM_OPS = {name: _make_custom_op(name) for name in _RUNNERS}


def _backend_fn(name: str):
    """Registry entry: the custom op with the prepared (keyword) arguments."""
    op = _CUSTOM_OPS[name]

    def fn(patch, text, num_masked, *, noise, tau):
        return op(patch, text, num_masked, noise, tau)

    return fn


# ---------------------------------------------------------------------------------------------
# supports_*: cheap reasons a backend cannot run (empty list = can run)
# ---------------------------------------------------------------------------------------------
def _fused_reasons(patch, max_p: int | None, max_d: int | None = None) -> list[str]:
    reasons = []
    B, P, d = patch.shape
    if max_p is not None and P > max_p:
        reasons.append(f"P={P} > {max_p} (fused kernels keep a row's scores on chip)")
    if max_d is not None and d > max_d:
        reasons.append(f"d={d} > {max_d} (text row kept in shared memory)")
    if d > 1 and patch.stride(2) != 1:
        reasons.append(f"patch needs a contiguous last dim, got strides {tuple(patch.stride())}")
    return reasons


def supports_reference(patch, text, num_masked, *, noise=None, tau=1.0) -> list[str]:
    return []


def supports_triton(patch, text, num_masked, *, noise=None, tau=1.0) -> list[str]:
    return triton_reasons(patch, text, noise) + _fused_reasons(patch, MAX_P_TRITON)


def supports_cuda(patch, text, num_masked, *, noise=None, tau=1.0) -> list[str]:
    lim = limits()
    return cuda_ext_reasons(patch, text, noise) + _fused_reasons(
        patch, lim.get("topk_mask_max_p"), lim.get("topk_mask_max_d_cuda")
    )


def supports_cpu(patch, text, num_masked, *, noise=None, tau=1.0) -> list[str]:
    return cpu_ext_reasons(patch, text, noise) + _fused_reasons(
        patch, limits().get("topk_mask_max_p")
    )


# ---------------------------------------------------------------------------------------------
# registration, noise and the public op
# ---------------------------------------------------------------------------------------------
def _reference_backend(patch, text, num_masked, *, noise, tau):
    return _topk_mask_reference_impl(patch, text, num_masked, noise, tau)


def _example(device: torch.device) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    patch = torch.randn(2, 49, 72, generator=gen).to(device)
    text = torch.randn(2, 72, generator=gen).to(device)
    return (patch, text, 24), {"noise": gumbel_noise((2, 49), seed=0, device=device)}


OP = define_op("topk_mask", prepare=_prepare, finish=_finish, example=_example)
OP.register("cuda", _backend_fn("cuda"), supports_cuda)
OP.register("triton", _backend_fn("triton"), supports_triton)
OP.register("cpu", _backend_fn("cpu"), supports_cpu)
OP.register("reference", _reference_backend, supports_reference)


def gumbel_noise(
    shape: Sequence[int] | torch.Size, *, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Reproducible fp32 Gumbel(0, 1) samples of ``shape`` (e.g. (B, P)) for :func:`topk_mask`.

    ``shape`` is a sequence of non-negative ints; ``seed`` an int in [0, 2**63). Uses a
    ``torch.Generator`` on ``device`` seeded with ``seed``: the same (seed, shape, device type)
    gives the same values, but CPU and CUDA generators produce different streams, so values
    differ between devices. Always finite: uniforms are clamped to [tiny, 1).
    """
    if isinstance(shape, (int, str, bytes)) or not isinstance(shape, (Sequence, torch.Size)):
        raise ValueError(f"shape must be a sequence of ints such as (B, P), got {shape!r}")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"shape must hold non-negative ints, got {tuple(shape)!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must name a torch device, got {device!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} but CUDA is not available here "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False); use device='cpu'"
        )
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    u = torch.rand(tuple(shape), generator=gen, device=device, dtype=torch.float32)
    u = u.clamp_min(torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


def topk_mask(
    patch: torch.Tensor,
    text: torch.Tensor,
    num_masked: int,
    *,
    noise: torch.Tensor | None = None,
    tau: float = 1.0,
    backend: str | None = None,
    validate: bool = True,
) -> TopkMaskOut:
    """Mask the ``num_masked`` patches per image most similar to the text (no gradient).

    Args:
        patch: (B, P, d) float32/float16/bfloat16 patch features (fast backends: last dim
            contiguous, P <= 1024).
        text: (B, d) text features (any float dtype).
        num_masked: M, 1 <= M <= P-1.
        noise: optional (B, P) float noise, e.g. ``gumbel_noise((B, P), seed=..., device=...)``.
        tau: temperature > 0; scores become s / tau + noise (ignored without noise).
        backend: "reference" | "triton" | "cuda" | "cpu"; default: ``SEMMIM_BACKEND`` or the
            fastest that can run.
        validate: raise ValueError when a score is NaN/inf, i.e. on NaN/inf inputs (a host
            sync reading B int32 counts that the kernel computes in its single pass). False
            skips it: then the selection in such rows is unspecified (still a partition).

    Returns:
        keep_idx (B, P-M) int64 ascending, mask_idx (B, M) int64 ascending, mask (B, P) bool
        (True = masked). Scores s = cos(patch, text) [/ tau + noise]; ties mask the lower patch
        index first. Not differentiable (inputs that require grad are detached).
    """
    return OP(patch, text, num_masked, noise=noise, tau=tau, backend=backend, validate=validate)


def _topk_on(backend: str):
    def fn(patch, text, num_masked, *, noise=None, tau=1.0, validate: bool = True):
        return topk_mask(
            patch, text, num_masked, noise=noise, tau=tau, backend=backend, validate=validate
        )

    fn.__name__ = f"topk_mask_{backend}"
    fn.__doc__ = f"``topk_mask(..., backend={backend!r})`` (same contract)."
    return fn


topk_mask_reference = _topk_on("reference")
topk_mask_triton = _topk_on("triton")
topk_mask_cpu = _topk_on("cpu")
