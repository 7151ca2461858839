"""Text-guided masking: fused text–patch cosine similarity → noise → per-row top-M → sorted indices.

Math
    For each image b and patch p (fp32 math whatever the input dtype, EPS = 1e-12):
        dot[b,p]  = Σ_k patch[b,p,k] · text[b,k]
        s[b,p]    = dot[b,p] / (max(‖patch[b,p]‖, EPS) · max(‖text[b]‖, EPS))
    which is ⟨patch/max(‖patch‖,EPS), text/max(‖text‖,EPS)⟩ (cosine similarity; a zero-norm patch
    or text vector gets score 0, never NaN). With ``noise`` (B, P): s = s / tau + noise.
    The M = ``num_masked`` largest s per row are masked; among exactly equal scores the lower patch
    index is masked first (-0.0 and +0.0 count as equal).

Shapes
    patch (B, P, d)  any float dtype, last dim contiguous (other strides free)
    text  (B, d)     last dim contiguous
    noise (B, P)     optional, any float dtype (read as fp32), e.g. :func:`gumbel_noise`
    -> keep_idx (B, R) int64 ascending, mask_idx (B, M) int64 ascending, mask (B, P) bool,
       R = P - M; keep_idx and mask_idx are disjoint and together cover 0..P-1.

Backward
    None: the selection is not differentiable. Inputs that require grad are accepted (they are
    detached); the outputs are integer/bool tensors and never require grad.

Limits
    1 <= M <= P-1. Fused backends (triton, cuda, cpu): P <= 1024 (the whole row's scores live in
    registers / shared memory); the reference runs on any P. cuda: d <= 8192 (text row in shared
    memory). Inputs must be finite: the public op raises ValueError on NaN/inf in patch, text or
    noise — this check is a host sync (one ``.item()``-style read per call); pass
    ``check_finite=False`` to skip it, in which case results for non-finite inputs are unspecified
    (but no backend reads or writes out of bounds). Values whose squared norm overflows fp32
    (|x| ≳ 1e19) are unsupported.

Differences vs reference
    Every backend computes s with the same fp32 formula, but the summation order of the dot
    product and of the squared norm differs (reference: BLAS / torch reductions; cpu: 16 partial
    sums; triton/cuda: tree reductions), so scores can differ in the last bits and the selected
    sets can differ only at near-ties: where the M-th and (M+1)-th largest scores are separated by
    more than the dtype tolerance, indices are identical. Exactly equal scores (e.g. duplicate
    patches) follow the lower-index rule in every backend.

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
    stream_of,
    triton_import_error,
    triton_reasons,
)
from .registry import get_op, register, set_example

EPS = 1e-12  # normalisation floor: x / max(|x|, EPS), identical in every backend
MAX_P_FUSED = 1024  # fused backends keep one row's P scores on chip
MAX_D_CUDA = 8192  # cuda backend keeps one text row (fp32) in shared memory

TopkMaskOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# input validation (shared by every backend entry point and the public op)
# ---------------------------------------------------------------------------------------------
def _check_shapes(
    patch: torch.Tensor, text: torch.Tensor, num_masked: int, noise: torch.Tensor | None, tau: float
) -> None:
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
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    check_same_device(patch=patch, text=text, noise=noise)


def _check_finite(patch: torch.Tensor, text: torch.Tensor, noise: torch.Tensor | None) -> None:
    """Raise ValueError when an input holds NaN/inf. One host sync for all inputs."""
    flags = [torch.isfinite(patch).all(), torch.isfinite(text).all()]
    if noise is not None:
        flags.append(torch.isfinite(noise).all())
    ok = torch.stack(flags).tolist()  # the host sync
    for name, t, good in zip(("patch", "text", "noise"), (patch, text, noise), ok):
        if not good:
            raise ValueError(
                f"{name} {tuple(t.shape)} contains NaN or inf; topk_mask needs finite inputs"
            )


def _validate(patch, text, num_masked, noise, tau, check_finite: bool) -> None:
    _check_shapes(patch, text, num_masked, noise, tau)
    if check_finite:
        _check_finite(patch, text, noise)


def _alloc_outputs(patch: torch.Tensor, num_masked: int) -> TopkMaskOut:
    B, P, _ = patch.shape
    dev = patch.device
    keep_idx = torch.empty(B, P - num_masked, dtype=torch.int64, device=dev)
    mask_idx = torch.empty(B, num_masked, dtype=torch.int64, device=dev)
    mask = torch.empty(B, P, dtype=torch.bool, device=dev)
    return keep_idx, mask_idx, mask


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------
def topk_mask_scores(
    patch: torch.Tensor, text: torch.Tensor, noise: torch.Tensor | None = None, tau: float = 1.0
) -> torch.Tensor:
    """The fp32 scores s (B, P) that every backend ranks (see the module docstring)."""
    p32 = patch.detach().float()  # (B, P, d)
    t32 = text.detach().float()  # (B, d)
    dot = torch.bmm(p32, t32.unsqueeze(-1)).squeeze(-1)  # (B, P)
    p_norm = torch.linalg.vector_norm(p32, dim=-1).clamp_min(EPS)  # (B, P)
    t_norm = torch.linalg.vector_norm(t32, dim=-1, keepdim=True).clamp_min(EPS)  # (B, 1)
    s = dot / (p_norm * t_norm)
    if noise is not None:
        s = s / tau + noise.detach().float()
    return s


def _topk_mask_reference_impl(
    patch: torch.Tensor,
    text: torch.Tensor,
    num_masked: int,
    noise: torch.Tensor | None = None,
    tau: float = 1.0,
) -> TopkMaskOut:
    B, P, _ = patch.shape
    with torch.no_grad():
        s = topk_mask_scores(patch, text, noise, tau)  # (B, P) fp32
        s = s + 0.0  # -0.0 -> +0.0: equal scores must rank by index alone
        # stable descending sort: equal scores keep ascending index order -> lower index first
        order = torch.sort(s, dim=1, descending=True, stable=True).indices  # (B, P)
        mask_idx = order[:, :num_masked].sort(dim=1).values  # (B, M)
        keep_idx = order[:, num_masked:].sort(dim=1).values  # (B, R)
        mask = torch.zeros(B, P, dtype=torch.bool, device=patch.device)
        mask.scatter_(1, mask_idx, True)
    return keep_idx, mask_idx, mask


def topk_mask_reference(
    patch: torch.Tensor,
    text: torch.Tensor,
    num_masked: int,
    *,
    noise: torch.Tensor | None = None,
    tau: float = 1.0,
    check_finite: bool = True,
) -> TopkMaskOut:
    """Readable PyTorch specification: normalise + bmm + sort + scatter.

    patch (B, P, d), text (B, d), noise (B, P) or None
    -> keep_idx (B, P-M) int64, mask_idx (B, M) int64, mask (B, P) bool.
    """
    _validate(patch, text, num_masked, noise, tau, check_finite)
    return _topk_mask_reference_impl(patch, text, num_masked, noise, tau)


# ---------------------------------------------------------------------------------------------
# noise
# ---------------------------------------------------------------------------------------------
def gumbel_noise(
    shape: Sequence[int] | torch.Size, *, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Reproducible fp32 Gumbel(0, 1) samples of ``shape`` (e.g. (B, P)) for :func:`topk_mask`.

    Uses a ``torch.Generator`` on ``device`` seeded with ``seed``: the same (seed, shape, device
    type) gives the same values, but CPU and CUDA generators produce different streams, so values
    differ between devices. Always finite: uniforms are clamped to [tiny, 1).
    """
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    u = torch.rand(tuple(shape), generator=gen, device=device, dtype=torch.float32)
    u = u.clamp_min(torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


# ---------------------------------------------------------------------------------------------
# public op
# ---------------------------------------------------------------------------------------------
_OP = get_op("topk_mask")


def topk_mask(
    patch: torch.Tensor,
    text: torch.Tensor,
    num_masked: int,
    *,
    noise: torch.Tensor | None = None,
    tau: float = 1.0,
    backend: str | None = None,
    check_finite: bool = True,
) -> TopkMaskOut:
    """Mask the ``num_masked`` patches per image most similar to the text (no gradient).

    patch (B, P, d), text (B, d), noise (B, P) or None (e.g. ``gumbel_noise((B, P), ...)``)
    -> keep_idx (B, P-M) int64 ascending, mask_idx (B, M) int64 ascending, mask (B, P) bool.
    Scores s = cos(patch, text) [/ tau + noise]; ties mask the lower patch index first.
    Raises ValueError on bad shapes, M out of range, or (``check_finite``, a host sync) NaN/inf.
    """
    _validate(patch, text, num_masked, noise, tau, check_finite)
    chosen = _OP.select(backend, patch, text, num_masked, noise=noise, tau=tau)
    return chosen.fn(patch, text, num_masked, noise=noise, tau=tau)


def _reference_backend(patch, text, num_masked, *, noise=None, tau=1.0) -> TopkMaskOut:
    return _topk_mask_reference_impl(patch, text, num_masked, noise, tau)


def supports_reference(patch, text, num_masked, *, noise=None, tau=1.0) -> list[str]:
    return []


register("topk_mask", "reference", _reference_backend, supports_reference, priority=0)


def _example(device: torch.device) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    patch = torch.randn(2, 49, 72, generator=gen).to(device)
    text = torch.randn(2, 72, generator=gen).to(device)
    return (patch, text, 24), {"noise": gumbel_noise((2, 49), seed=0, device=device)}


set_example("topk_mask", _example)
