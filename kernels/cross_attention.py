"""Flash cross-attention: softmax(scale · Q Kᵀ + key padding bias) · V with Lq ≠ Lk.

Math
    out[b, i, h] = Σ_j softmax_j(scale · q[b, i, h] · k[b, j, h]  over keys j with key_mask[b, j])
                   · v[b, j, h]
    A query whose batch row has no real key gets zeros (never NaN), and zero gradients.
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
    Two deterministic kernels: dK/dV per key block (looping over query blocks) and dQ per query
    block (looping over key blocks); no atomics.

Limits
    triton: Dh ∈ {32, 64, 80, 128} (80 runs in a 128-wide padded tile with a mask on d), fp32 /
    fp16 / bf16, any Lq, Lk ≥ 1, q/k/v with any strides whose last dim is contiguous (the
    (B, L, H·Dh) projections viewed as (B, L, H, Dh) run without copies; a non-unit last-dim stride
    is copied once). Accumulation in fp32; fp32 inputs use IEEE fp32 dot products (no TF32).
    sdpa: torch.nn.functional.scaled_dot_product_attention; with a key mask torch cannot use its
    flash backend. No varlen (cu_seqlens) form yet.

Differences vs reference
    The reference materialises the (B, H, Lq, Lk) score matrix in fp32 (fp64 for fp64 inputs) and
    returns the input dtype. triton never materialises it and rounds P to the input dtype before the
    P·V and dS·K products (as FlashAttention does), so low-precision results differ from the
    reference by about the reference's own low-precision error; the tests bound it by 2× that error
    (3× for gradients) plus a small floor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import interpret_mode, triton_import_error, triton_reasons
from .registry import get_op, register, set_example

__all__ = [
    "cross_attention",
    "cross_attention_reference",
    "cross_attention_sdpa",
    "cross_attention_triton",
    "supports_reference",
    "supports_sdpa",
    "supports_triton",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_HEAD_DIMS = (32, 64, 80, 128)


# --------------------------------------------------------------------------------------------
# input checks (shared by every backend)
# --------------------------------------------------------------------------------------------
def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float | None,
) -> float:
    """Validate the arguments; returns the effective scale. Raises ValueError naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, L, H, Dh), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch mismatch: q has B={q.shape[0]}, k has B={k.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head mismatch: q has H={q.shape[2]}, k has H={k.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head dim mismatch: q has Dh={q.shape[3]}, k has Dh={k.shape[3]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    devs = {q.device, k.device, v.device}
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor):
            raise ValueError(f"key_mask must be a bool tensor or None, got {type(key_mask).__name__}")
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
        return q.shape[3] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
def _attention_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """The reference math in ``compute_dtype`` (tests also run it in low precision)."""
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


def cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch cross-attention (the specification); fp32 math (fp64 for fp64 inputs).

    q (B, Lq, H, Dh), k/v (B, Lk, H, Dh), key_mask (B, Lk) bool or None -> (B, Lq, H, Dh) in q's
    dtype. Differentiable by autograd.
    """
    sc = _check_inputs(q, k, v, key_mask, scale)
    compute = torch.promote_types(q.dtype, torch.float32)
    return _attention_math(q, k, v, key_mask, sc, compute).to(q.dtype)


# --------------------------------------------------------------------------------------------
# sdpa (torch.nn.functional.scaled_dot_product_attention)
# --------------------------------------------------------------------------------------------
def cross_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Cross-attention through torch's SDPA (whichever of its backends torch picks).

    The bool key mask becomes a (B, 1, 1, Lk) attention mask; batch rows with no real key are
    given an all-True dummy mask and then zeroed, because some SDPA backends return NaN for them.
    """
    sc = _check_inputs(q, k, v, key_mask, scale)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
    if key_mask is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, scale=sc)
        return out.transpose(1, 2)  # (B, Lq, H, Dh)
    empty = ~key_mask.any(dim=1)  # (B,)
    mask = (key_mask | empty[:, None])[:, None, None, :]  # (B, 1, 1, Lk)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=sc)
    out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out.transpose(1, 2)  # (B, Lq, H, Dh)


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
) -> torch.Tensor:
    """Multi-head cross-attention with a key padding mask.

    q (B, Lq, H, Dh), k and v (B, Lk, H, Dh), key_mask (B, Lk) bool (True = real token) or None;
    scale defaults to Dh ** -0.5. Returns (B, Lq, H, Dh) in q's dtype; a query whose batch row has no
    real key gets zeros. ``backend`` picks "reference", "sdpa" or "triton" (default: the registry's
    choice, see :mod:`semmim.kernels.registry`).
    """
    _check_inputs(q, k, v, key_mask, scale)
    return _OP(q, k, v, key_mask, scale=scale, backend=backend)


def _example(device: torch.device) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 2, 32, generator=g).to(device)
    k = torch.randn(2, 7, 2, 32, generator=g).to(device)
    v = torch.randn(2, 7, 2, 32, generator=g).to(device)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3]).to(device)
    return (q, k, v, mask), {}


register("cross_attention", "reference", cross_attention_reference, supports_reference, 0)
register("cross_attention", "sdpa", cross_attention_sdpa, supports_sdpa, 10)
set_example("cross_attention", _example)
_OP = get_op("cross_attention")
