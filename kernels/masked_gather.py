"""Masked-patch gather and scatter-with-fill (kernel 1 of the SemMIM spec).

Math
    masked_gather:       out[b, r, :] = x[b, index[b, r], :] (+ pos[index[b, r], :])
    masked_scatter_fill: out[b, p, :] = y[b, r, :] if index[b, r] == p for some r, else fill;
                         then out[b, p, :] += pos[p, :] when pos is given
    The fast path of SemMIM runs the ViT on the kept patches only: ``masked_gather`` picks them
    (adding position embeddings in the same pass) and ``masked_scatter_fill`` rebuilds the full
    sequence with [MASK] + position embedding at the dropped slots.

Shapes
    x (B, P, D) any strides (e.g. the patch embedding, a transposed conv output with strides
    (P·D, 1, P)), index (B, R) int32/int64 whose rows hold unique entries in [0, P), pos (P, D)
    or None, y (B, R, D) any strides, fill (D,), out as above (contiguous).

Backward
    gather:  grad_x = scatter of grad_out with zeros elsewhere (exact data movement);
             grad_pos[p] = sum over b of grad_x[b, p] (fp32 accumulation in batch order).
    scatter: grad_y = gather of grad_out (exact); grad_pos = sum over b of grad_out[b, p];
             grad_fill = sum of grad_out over the dropped slots (fp32 accumulation).
    Indices get no gradient. An empty batch (B = 0) gives zero grad_pos / grad_fill.

Validation (the op contract, ``kernels/README.md``)
    Shapes, dtypes and devices are always checked. ``validate=True`` (default) also checks on
    the host that every index entry lies in [0, P) and that rows are unique (one device sync
    for both). ``validate=False`` skips that; then the result for an invalid index is
    unspecified, but no backend reads or writes out of bounds, and: the C++ CPU kernels check
    every entry anyway and raise ValueError (out of range, or duplicate where the inverse map
    is built: scatter forward, gather backward); the CUDA and Triton gathers write NaN rows
    for out-of-range entries and the Triton inverse map ignores them (no host sync to report
    them). Under autocast, ``pos`` / ``fill`` in another float dtype are cast to
    the input's dtype (outside autocast a mismatch is a ValueError).

Layouts
    triton reads x / y through their three strides (no copy). The cpu and cuda backends read
    rows with a contiguous last dim; other layouts are copied once with ``.contiguous()``.
    index, pos and fill are made dense by the public op (small).

Differences vs reference
    Forward outputs and grad_x / grad_y are bit-identical to the reference in every dtype (the
    fused ``+ pos`` is one float add rounded once, as torch rounds float16/bfloat16 adds); NaN
    stays NaN but its payload bits may differ (torch's own vectorised and scalar paths differ).
    grad_pos and grad_fill are sums whose order differs from the reference's index_put/sum
    order: the difference is bounded by B * eps(dtype) * sum|grad| per element (fp32
    accumulation, one final rounding; the reference accumulates float16/bfloat16 grad_pos in its
    own order) and tested against that bound. Under TRITON_INTERPRET=1 the triton backend
    declines bfloat16 with ``pos`` (the interpreter truncates fp32 -> bf16 casts, so ``+ pos`` is
    not bit-exact there); bfloat16 without ``pos`` casts nothing to bf16 and runs.
"""

from __future__ import annotations

import torch

from ._common import (
    DTYPE_CODE,
    cast_to_input,
    check_float,
    check_same_device,
    check_tensor,
    cpu_ext_reasons,
    cuda_ext_reasons,
    extension,
    interpret_mode,
    new_output,
    stream_of,
    triton_import_error,
    triton_reasons,
)
from .registry import custom_op, define_op, no_grad_placeholder

__all__ = [
    "masked_gather",
    "masked_scatter_fill",
    "masked_gather_reference",
    "masked_scatter_fill_reference",
]


# --------------------------------------------------------------------------------------------
# prepare: the one validator (+ autocast rule, dense small operands)
# --------------------------------------------------------------------------------------------
def _check_index(index, batch: int, num_patches: int, rows_name: str) -> None:
    """Shape/dtype checks of index (free)."""
    if not isinstance(index, torch.Tensor):
        raise ValueError(f"index must be a (B, R) int32/int64 tensor, got {type(index).__name__}")
    if index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be int32 or int64, got {index.dtype}")
    if index.dim() != 2:
        raise ValueError(f"index must be (B, R), got shape {tuple(index.shape)}")
    if index.shape[0] != batch:
        raise ValueError(
            f"index batch {index.shape[0]} != {rows_name} batch {batch} "
            f"(index {tuple(index.shape)})"
        )
    if index.shape[1] > num_patches:
        raise ValueError(f"index has R={index.shape[1]} entries per row but P={num_patches}")


def _check_index_values(index: torch.Tensor, num_patches: int) -> None:
    """Range and per-row uniqueness, read on the host in ONE sync (the validate=True part)."""
    if index.numel() == 0:
        return
    lo, hi = torch.aminmax(index)
    srt = index.sort(dim=1).values
    dup = (srt[:, 1:] == srt[:, :-1]).sum()
    lo, hi, dup = (int(v) for v in torch.stack([lo.long(), hi.long(), dup.long()]).tolist())
    if lo < 0 or hi >= num_patches:
        raise ValueError(
            f"index entries must lie in [0, {num_patches}), got min {lo}, max {hi} "
            f"(index {tuple(index.shape)})"
        )
    if dup:
        raise ValueError(
            f"index rows must hold unique entries: {dup} duplicate(s) in index {tuple(index.shape)}"
        )


def _prepare_pos(pos, num_patches: int, dim: int, ref: torch.Tensor, ref_name: str):
    if pos is None:
        return None
    if not isinstance(pos, torch.Tensor) or tuple(pos.shape) != (num_patches, dim):
        shape = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
        raise ValueError(f"pos must be (P, D) = ({num_patches}, {dim}), got {shape}")
    return cast_to_input("pos", pos, ref, ref_name).contiguous()


def _prepare_gather(x, index, pos=None, *, validate: bool = True):
    check_tensor("x", x, "B, P, D")
    check_float("x", x, allow_double=True)
    _check_index(index, x.shape[0], x.shape[1], "x")
    check_same_device(x=x, index=index, pos=pos if isinstance(pos, torch.Tensor) else None)
    pos = _prepare_pos(pos, x.shape[1], x.shape[2], x, "input")
    if validate:
        _check_index_values(index, x.shape[1])
    return (x, index.contiguous(), pos), {}


def _prepare_scatter(y, index, fill, num_patches, pos=None, *, validate: bool = True):
    check_tensor("y", y, "B, R, D")
    check_float("y", y, allow_double=True)
    if isinstance(num_patches, bool) or not isinstance(num_patches, int) or num_patches < 1:
        raise ValueError(f"num_patches must be a positive int, got {num_patches!r}")
    if not isinstance(fill, torch.Tensor) or tuple(fill.shape) != (y.shape[2],):
        shape = tuple(fill.shape) if isinstance(fill, torch.Tensor) else type(fill).__name__
        raise ValueError(f"fill must be (D,) = ({y.shape[2]},), got {shape}")
    _check_index(index, y.shape[0], num_patches, "y")
    if index.shape[1] != y.shape[1]:
        raise ValueError(
            f"index (B, R) = {tuple(index.shape)} does not match y (B, R, D) = {tuple(y.shape)}"
        )
    check_same_device(
        y=y, index=index, fill=fill, pos=pos if isinstance(pos, torch.Tensor) else None
    )
    fill = cast_to_input("fill", fill, y, "y").contiguous()
    pos = _prepare_pos(pos, num_patches, y.shape[2], y, "input")
    if validate:
        _check_index_values(index, num_patches)
    return (y, index.contiguous(), fill, num_patches, pos), {}


# --------------------------------------------------------------------------------------------
# reference (plain PyTorch: the specification; differentiable through autograd)
# --------------------------------------------------------------------------------------------
def _gather_reference(x, index, pos):
    idx = index.long()
    out = torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[2]))  # (B, R, D)
    if pos is not None:
        out = out + pos[idx]  # pos[idx]: (B, R, D)
    return out


def _scatter_reference(y, index, fill, num_patches, pos):
    B, R, D = y.shape
    base = fill.expand(B, num_patches, D)  # (B, P, D) view, no copy
    idx = index.long()[:, :, None].expand(B, R, D)
    out = base.scatter(1, idx, y)
    if pos is not None:
        out = out + pos
    return out


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------

if not triton_import_error():
    import triton
    import triton.language as tl

    # Row counts (B·R, B·P, P, R, B, the per-chunk batch count) are not specialised: they only
    # bound rows, so "== 1" / "% 16 == 0" variants of them would be compiled for nothing. D and
    # the strides stay specialised (contiguous, 16-byte aligned rows load as vectors).
    @triton.jit(do_not_specialize=["n_rows", "P", "R"])
    def _masked_gather_fwd_kernel(
        x_ptr, idx_ptr, pos_ptr, out_ptr,
        n_rows, P, R, D, stride_xb, stride_xp, stride_xd,
        HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # rows are flattened (b, r) pairs; each program moves BLOCK_R rows x BLOCK_D columns.
        # x is read through all three strides (the patch embedding has stride_xd = P).
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = rows < n_rows
        p = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        b = rows.to(tl.int64) // R
        m = row_ok[:, None] & (cols[None, :] < D)
        # an out-of-range entry (possible only with validate=False) gives a NaN row, never an
        # out-of-bounds read (as the CUDA kernel does)
        ld = m & ((p >= 0) & (p < P))[:, None]
        src = (
            b[:, None] * stride_xb + p[:, None] * stride_xp + cols.to(tl.int64)[None, :] * stride_xd
        )
        v = tl.load(x_ptr + src, mask=ld, other=float("nan"))
        if HAS_POS:
            w = tl.load(pos_ptr + p[:, None] * D + cols[None, :], mask=ld, other=float("nan"))
            v = (v.to(tl.float32) + w.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], v, mask=m)

    @triton.jit(do_not_specialize=["n_rows", "P"])
    def _masked_scatter_fill_fwd_kernel(
        y_ptr, inv_ptr, fill_ptr, pos_ptr, out_ptr,
        n_rows, P, D, stride_yb, stride_yr, stride_yd,
        HAS_FILL: tl.constexpr, HAS_POS: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # rows are flattened (b, p) pairs of the output; inv[b, p] = r or -1
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = rows < n_rows
        col_ok = cols < D
        r = tl.load(inv_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
        rows64 = rows.to(tl.int64)
        b = rows64 // P
        p = rows64 - b * P
        hit = r >= 0
        m = row_ok[:, None] & col_ok[None, :]
        src = (
            b[:, None] * stride_yb + r[:, None] * stride_yr + cols.to(tl.int64)[None, :] * stride_yd
        )
        v = tl.load(y_ptr + src, mask=m & hit[:, None], other=0.0)
        if HAS_FILL:
            f = tl.load(fill_ptr + cols, mask=col_ok, other=0.0)
            v = tl.where(hit[:, None], v, f[None, :])
        if HAS_POS:
            w = tl.load(pos_ptr + p[:, None] * D + cols[None, :], mask=m)
            v = (v.to(tl.float32) + w.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows64[:, None] * D + cols[None, :], v, mask=m)

    @triton.jit(do_not_specialize=["B", "P", "R", "per"])
    def _masked_gather_bwd_kernel(
        g_ptr, inv_ptr, gx_ptr, part_pos_ptr, part_fill_ptr,
        B, P, R, D, per,
        COMPACT: tl.constexpr, WANT_X: tl.constexpr, WANT_POS: tl.constexpr,
        WANT_FILL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # Column pass over the batch for one (p block, d block, batch chunk):
        #   COMPACT (gather backward): v = g[b, inv[b,p]] or 0; grad_x[b,p] = v; sum_pos += v
        #   else   (scatter backward): v = g[b, p]; sum_pos += v; sum_fill += v where inv < 0
        ps = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        c = tl.program_id(2)
        p_ok = ps < P
        m = p_ok[:, None] & (cols[None, :] < D)
        ps64 = ps.to(tl.int64)
        acc_pos = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        acc_fill = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        b0 = c * per
        b1 = tl.minimum(B, b0 + per)
        for b in range(b0, b1):
            r = tl.load(inv_ptr + b * P + ps, mask=p_ok, other=-1).to(tl.int64)
            if COMPACT:
                v = tl.load(
                    g_ptr + (b * R + r)[:, None] * D + cols[None, :],
                    mask=m & (r >= 0)[:, None],
                    other=0.0,
                )
                if WANT_X:
                    tl.store(gx_ptr + (b * P + ps64)[:, None] * D + cols[None, :], v, mask=m)
            else:
                v = tl.load(g_ptr + (b * P + ps64)[:, None] * D + cols[None, :], mask=m, other=0.0)
                if WANT_FILL:
                    acc_fill += tl.where((r < 0)[:, None], v.to(tl.float32), 0.0)
            acc_pos += v.to(tl.float32)
        o = (c * P + ps64)[:, None] * D + cols[None, :]
        if WANT_POS:
            tl.store(part_pos_ptr + o, acc_pos, mask=m)
        if WANT_FILL:
            tl.store(part_fill_ptr + o, acc_fill, mask=m)


def _row_blocks(D: int) -> tuple[int, int]:
    import triton

    block_d = min(triton.next_power_of_2(max(D, 1)), 256)
    return max(1, 4096 // block_d), block_d


def _num_chunks(B: int, P: int, D: int, device: torch.device) -> int:
    """Batch chunks of the backward column pass: enough parallel work, few fp32 partials."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want_threads = sms * 2048
    per_chunk = max(1, P * max(1, D // 8))
    return int(max(1, min(B, 64, -(-want_threads // per_chunk))))


def _out(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None):
    return new_output(shape, dtype=dtype or like.dtype, device=like.device)


class _Kernels:
    """The four primitives a fast backend provides; the op logic on top (forward, backward,
    custom ops) is shared by triton, cuda and cpu."""

    name = ""

    def gather_rows(self, x, index, pos):  # -> (B, R, D)
        raise NotImplementedError

    def inverse(self, index, P):  # -> (B, P) int32, r or -1
        raise NotImplementedError

    def scatter_rows(self, y, inv, fill, pos):  # -> (B, P, D)
        raise NotImplementedError

    def column_pass(self, g, inv, compact, gx, pp, pf, nchunk):
        """Fill grad_x ``gx`` (B,P,D) and fp32 partial sums ``pp``/``pf`` (C,P,D); None = skip."""
        raise NotImplementedError

    def partials(self, g, inv, compact, want_x, want_pos, want_fill):
        B, P = inv.shape
        D = g.shape[2]
        nchunk = _num_chunks(B, P, D, g.device)
        gx = _out((B, P, D), g) if want_x else None
        pp = _out((nchunk, P, D), g, torch.float32) if want_pos else None
        pf = _out((nchunk, P, D), g, torch.float32) if want_fill else None
        if B == 0:  # no rows to sum: the partial sums are zero (the kernels write nothing)
            for t in (pp, pf):
                if t is not None:
                    t.zero_()
            return gx, pp, pf
        self.column_pass(g, inv, compact, gx, pp, pf, nchunk)
        return gx, pp, pf


class _TritonKernels(_Kernels):
    name = "triton"

    def gather_rows(self, x, index, pos):
        B, P, D = x.shape
        R = index.shape[1]
        out = _out((B, R, D), x)
        if out.numel() == 0:
            return out
        br, bd = _row_blocks(D)
        grid = (triton.cdiv(B * R, br), triton.cdiv(D, bd))
        _masked_gather_fwd_kernel[grid](
            x, index, pos if pos is not None else x, out,
            B * R, P, R, D, x.stride(0), x.stride(1), x.stride(2),
            HAS_POS=pos is not None, BLOCK_R=br, BLOCK_D=bd,
        )  # fmt: skip
        return out

    def inverse(self, index, P):
        # out-of-range entries (possible only with validate=False) land in a spare column P
        # that is dropped: never an out-of-bounds write
        B, R = index.shape
        inv = torch.full((B, P + 1), -1, dtype=torch.int32, device=index.device)
        ar = torch.arange(R, dtype=torch.int32, device=index.device).expand(B, R)
        idx = index.long()
        idx = torch.where((idx >= 0) & (idx < P), idx, P)
        return inv.scatter_(1, idx, ar)[:, :P].contiguous()

    def scatter_rows(self, y, inv, fill, pos):
        B, R, D = y.shape
        P = inv.shape[1]
        out = _out((B, P, D), y)
        if out.numel() == 0:
            return out
        br, bd = _row_blocks(D)
        grid = (triton.cdiv(B * P, br), triton.cdiv(D, bd))
        _masked_scatter_fill_fwd_kernel[grid](
            y, inv, fill if fill is not None else y, pos if pos is not None else y, out,
            B * P, P, D, y.stride(0), y.stride(1), y.stride(2),
            HAS_FILL=fill is not None, HAS_POS=pos is not None, BLOCK_R=br, BLOCK_D=bd,
        )  # fmt: skip
        return out

    def column_pass(self, g, inv, compact, gx, pp, pf, nchunk):
        B, P = inv.shape
        R, D = g.shape[1], g.shape[2]
        if B * P * D == 0:
            return
        block_d = min(triton.next_power_of_2(D), 128)
        block_p = max(1, min(16, 2048 // block_d))
        per = -(-B // nchunk)
        grid = (triton.cdiv(P, block_p), triton.cdiv(D, block_d), nchunk)
        dummy = g
        _masked_gather_bwd_kernel[grid](
            g, inv, gx if gx is not None else dummy,
            pp if pp is not None else dummy, pf if pf is not None else dummy,
            B, P, R, D, per,
            COMPACT=bool(compact), WANT_X=gx is not None, WANT_POS=pp is not None,
            WANT_FILL=pf is not None, BLOCK_P=block_p, BLOCK_D=block_d,
        )  # fmt: skip


def _vec_width(*tensors: torch.Tensor | None, D: int, strides: tuple[int, ...] = ()) -> int:
    """Widest vector (elements, at most 16 bytes) dividing D, every stride and every address."""
    ts = [t for t in tensors if t is not None]
    esize = ts[0].element_size()
    vec = 16 // esize
    while vec > 1:
        ok = D % vec == 0 and all(s % vec == 0 for s in strides)
        ok = ok and all(t.data_ptr() % (vec * esize) == 0 for t in ts)
        if ok:
            return vec
        vec //= 2
    return 1


def _rows_layout(t: torch.Tensor) -> torch.Tensor:
    """The compiled kernels read rows with a contiguous last dim: copy other layouts once."""
    return t if t.stride(2) == 1 or t.shape[2] <= 1 else t.contiguous()


class _CompiledKernels(_Kernels):
    """Shared by the C++ CPU and CUDA backends of semmim._C (same entry points, suffixed)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _fn(self, what: str):
        return getattr(extension(), f"mg_{what}_{self.name}")

    def _tail(self, ref: torch.Tensor, vec: int) -> tuple:
        return (vec, stream_of(ref)) if self.name == "cuda" else ()

    def gather_rows(self, x, index, pos):
        x = _rows_layout(x)
        B, P, D = x.shape
        R = index.shape[1]
        out = _out((B, R, D), x)
        vec = _vec_width(x, pos, out, D=D, strides=(x.stride(0), x.stride(1)))
        self._fn("gather_rows")(
            x.data_ptr(), x.stride(0), x.stride(1), index.data_ptr(), DTYPE_CODE[index.dtype],
            pos.data_ptr() if pos is not None else 0, out.data_ptr(),
            B, P, R, D, DTYPE_CODE[x.dtype], *self._tail(x, vec),
        )  # fmt: skip
        return out

    def inverse(self, index, P):
        B, R = index.shape
        inv = _out((B, P), index, torch.int32)
        args = (index.data_ptr(), DTYPE_CODE[index.dtype], inv.data_ptr(), B, P, R)
        self._fn("build_inverse")(*args, *((stream_of(index),) if self.name == "cuda" else ()))
        return inv

    def scatter_rows(self, y, inv, fill, pos):
        y = _rows_layout(y)
        B, R, D = y.shape
        P = inv.shape[1]
        out = _out((B, P, D), y)
        vec = _vec_width(y, fill, pos, out, D=D, strides=(y.stride(0), y.stride(1)))
        self._fn("scatter_rows")(
            y.data_ptr(), y.stride(0), y.stride(1), inv.data_ptr(),
            fill.data_ptr() if fill is not None else 0, pos.data_ptr() if pos is not None else 0,
            out.data_ptr(), B, P, R, D, DTYPE_CODE[y.dtype], *self._tail(y, vec),
        )  # fmt: skip
        return out

    def column_pass(self, g, inv, compact, gx, pp, pf, nchunk):
        B, P = inv.shape
        R, D = g.shape[1], g.shape[2]
        vec = _vec_width(g, gx, D=D)
        self._fn("column_pass")(
            g.data_ptr(), int(compact), inv.data_ptr(),
            gx.data_ptr() if gx is not None else 0, pp.data_ptr() if pp is not None else 0,
            pf.data_ptr() if pf is not None else 0, nchunk, B, P, R, D, DTYPE_CODE[g.dtype],
            *self._tail(g, vec),
        )  # fmt: skip


_KERNELS: dict[str, _Kernels] = {"triton": _TritonKernels(), "cuda": _CompiledKernels("cuda"),
                                 "cpu": _CompiledKernels("cpu")}  # fmt: skip


# --------------------------------------------------------------------------------------------
# op logic shared by the fast backends, as custom ops (fake impl + autograd) from the factory
# --------------------------------------------------------------------------------------------
def _gather_bwd(kern: _Kernels, g, index, P: int, need_x: bool, need_pos: bool):
    g = g.contiguous()  # autograd may hand over an expanded (stride 0) gradient
    inv = kern.inverse(index, P)
    grad_x = grad_pos = None
    if need_pos:
        grad_x, part_pos, _ = kern.partials(g, inv, True, need_x, True, False)
        grad_pos = part_pos.sum(0).to(g.dtype)
    elif need_x:
        grad_x = kern.scatter_rows(g, inv, None, None)
    return grad_x, grad_pos


def _scatter_bwd(kern: _Kernels, g, index, need_y: bool, need_fill: bool, need_pos: bool):
    g = g.contiguous()
    grad_y = kern.gather_rows(g, index, None) if need_y else None
    grad_fill = grad_pos = None
    if need_fill or need_pos:
        inv = kern.inverse(index, g.shape[1])
        _, part_pos, part_fill = kern.partials(g, inv, False, False, need_pos, need_fill)
        if need_pos:
            grad_pos = part_pos.sum(0).to(g.dtype)
        if need_fill:
            grad_fill = part_fill.sum((0, 1)).to(g.dtype)
    return grad_y, grad_fill, grad_pos


def _make_custom_ops(kern: _Kernels):
    """semmim::masked_gather_<backend> and semmim::masked_scatter_fill_<backend> (+ their
    backward ops), through the one factory :func:`semmim.kernels.registry.custom_op`."""
    b = kern.name
    none = no_grad_placeholder

    def gather_impl(x: torch.Tensor, index: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        return kern.gather_rows(x, index, pos)

    def gather_fake(x, index, pos):
        return x.new_empty((x.shape[0], index.shape[1], x.shape[2]))

    def gather_bwd_impl(
        g: torch.Tensor, index: torch.Tensor, num_patches: int, need_x: bool, need_pos: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gx, gp = _gather_bwd(kern, g, index, num_patches, need_x, need_pos)
        return (gx if gx is not None else none(g), gp if gp is not None else none(g))

    def gather_bwd_fake(g, index, num_patches, need_x, need_pos):
        B, _, D = g.shape
        gx = g.new_empty((B, num_patches, D)) if need_x else none(g)
        return gx, (g.new_empty((num_patches, D)) if need_pos else none(g))

    gather_bwd_op = custom_op(f"masked_gather_bwd_{b}", gather_bwd_impl, fake=gather_bwd_fake)

    def gather_setup(ctx, inputs, output):
        x, index, pos = inputs
        ctx.save_for_backward(index)
        ctx.num_patches = x.shape[1]
        ctx.has_pos = pos is not None

    def gather_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        need_pos = ctx.has_pos and ctx.needs_input_grad[2]
        gx, gp = gather_bwd_op(grad, index, ctx.num_patches, need_x, need_pos)
        return (gx if need_x else None, None, gp if need_pos else None)

    gather_op = custom_op(
        f"masked_gather_{b}",
        gather_impl,
        fake=gather_fake,
        backward=gather_backward,
        setup_context=gather_setup,
    )

    def scatter_impl(
        y: torch.Tensor,
        index: torch.Tensor,
        fill: torch.Tensor,
        num_patches: int,
        pos: torch.Tensor | None,
    ) -> torch.Tensor:
        return kern.scatter_rows(y, kern.inverse(index, num_patches), fill, pos)

    def scatter_fake(y, index, fill, num_patches, pos):
        return y.new_empty((y.shape[0], num_patches, y.shape[2]))

    def scatter_bwd_impl(
        g: torch.Tensor, index: torch.Tensor, need_y: bool, need_fill: bool, need_pos: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gy, gf, gp = _scatter_bwd(kern, g, index, need_y, need_fill, need_pos)
        return tuple(t if t is not None else none(g) for t in (gy, gf, gp))

    def scatter_bwd_fake(g, index, need_y, need_fill, need_pos):
        B, P, D = g.shape
        gy = g.new_empty((B, index.shape[1], D)) if need_y else none(g)
        gf = g.new_empty((D,)) if need_fill else none(g)
        return gy, gf, (g.new_empty((P, D)) if need_pos else none(g))

    scatter_bwd_op = custom_op(
        f"masked_scatter_fill_bwd_{b}", scatter_bwd_impl, fake=scatter_bwd_fake
    )

    def scatter_setup(ctx, inputs, output):
        _, index, _, _, pos = inputs
        ctx.save_for_backward(index)
        ctx.has_pos = pos is not None

    def scatter_backward(ctx, grad):
        (index,) = ctx.saved_tensors
        need_y, need_fill = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_pos = ctx.has_pos and ctx.needs_input_grad[4]
        gy, gf, gp = scatter_bwd_op(grad, index, need_y, need_fill, need_pos)
        return (
            gy if need_y else None,
            None,
            gf if need_fill else None,
            None,
            gp if need_pos else None,
        )

    scatter_op = custom_op(
        f"masked_scatter_fill_{b}",
        scatter_impl,
        fake=scatter_fake,
        backward=scatter_backward,
        setup_context=scatter_setup,
    )
    return gather_op, scatter_op


_CUSTOM_OPS = {name: _make_custom_ops(kern) for name, kern in _KERNELS.items()}


# --------------------------------------------------------------------------------------------
# supports: what decides whether a backend can run (prepared arguments only)
# --------------------------------------------------------------------------------------------
def _dtype_reasons(t: torch.Tensor, backend: str, pos: torch.Tensor | None) -> list[str]:
    if t.dtype not in DTYPE_CODE:
        return [f"unsupported dtype {t.dtype}"]
    # Only the fused ``+ pos`` rounds an fp32 sum to bf16; without pos the kernels move bf16
    # values (fill included) and accumulate gradients in fp32 buffers, exact in the interpreter.
    if backend == "triton" and t.dtype == torch.bfloat16 and pos is not None and interpret_mode():
        return ["the Triton interpreter truncates fp32 -> bf16 casts (bf16 + pos not exact)"]
    return []


_DEVICE_REASONS = {"triton": triton_reasons, "cuda": cuda_ext_reasons, "cpu": cpu_ext_reasons}


def _supports_gather(backend: str):
    def supports(x, index, pos=None) -> list[str]:
        return _DEVICE_REASONS[backend](x, index, pos) + _dtype_reasons(x, backend, pos)

    return supports


def _supports_scatter(backend: str):
    def supports(y, index, fill, num_patches, pos=None) -> list[str]:
        return _DEVICE_REASONS[backend](y, index, fill, pos) + _dtype_reasons(y, backend, pos)

    return supports


def supports_reference(*args, **kwargs) -> list[str]:
    return []


# --------------------------------------------------------------------------------------------
# the ops, their backends and the public functions
# --------------------------------------------------------------------------------------------
def _example_gather(device: torch.device):
    x = torch.randn(2, 8, 16, device=device)
    index = torch.tensor([[0, 3, 5], [1, 2, 7]], device=device)
    return (x, index, torch.randn(8, 16, device=device)), {}


def _example_scatter(device: torch.device):
    y = torch.randn(2, 3, 16, device=device)
    index = torch.tensor([[0, 3, 5], [1, 2, 7]], device=device)
    return (y, index, torch.randn(16, device=device), 8, torch.randn(8, 16, device=device)), {}


GATHER = define_op("masked_gather", prepare=_prepare_gather, example=_example_gather)
SCATTER = define_op("masked_scatter_fill", prepare=_prepare_scatter, example=_example_scatter)
for _name, (_gather_op, _scatter_op) in _CUSTOM_OPS.items():
    GATHER.register(_name, _gather_op, _supports_gather(_name))
    SCATTER.register(_name, _scatter_op, _supports_scatter(_name))
GATHER.register("reference", _gather_reference, supports_reference)
SCATTER.register("reference", _scatter_reference, supports_reference)


def masked_gather(
    x: torch.Tensor,
    index: torch.Tensor,
    pos: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Gather kept patches, adding their position embeddings in the same pass.

    Args:
        x: (B, P, D) float32/float16/bfloat16 patch tokens, any strides (float64: reference).
        index: (B, R) int32/int64, each row's entries unique and in [0, P).
        pos: optional (P, D) position embeddings, same dtype as x (under autocast any float
            dtype: cast to x's).
        backend: "reference" | "triton" | "cuda" | "cpu"; default: ``SEMMIM_BACKEND`` or the
            fastest that can run.
        validate: check index range and uniqueness on the host (one device sync); False skips
            it (shape/dtype/device checks always run).

    Returns:
        (B, R, D): ``out[b, r] = x[b, index[b, r]] + pos[index[b, r]]``. Differentiable in x, pos.
    """
    return GATHER(x, index, pos, backend=backend, validate=validate)


def masked_scatter_fill(
    y: torch.Tensor,
    index: torch.Tensor,
    fill: torch.Tensor,
    num_patches: int,
    pos: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Rebuild the full (B, P, D) sequence from kept rows ``y`` placed at ``index``.

    Args:
        y: (B, R, D) kept-token features, any strides.
        index: (B, R) int32/int64 slots of y's rows, unique per row, in [0, num_patches).
        fill: (D,) value of every other slot (e.g. the [MASK] embedding).
        num_patches: P, the length of the output sequence.
        pos: optional (P, D) added to every output row.
        backend, validate: as for :func:`masked_gather`.

    Returns:
        (B, P, D). Differentiable in y, fill and pos.
    """
    return SCATTER(y, index, fill, num_patches, pos, backend=backend, validate=validate)


def _gather_on(backend: str):
    def fn(x, index, pos=None, *, validate: bool = True):
        return masked_gather(x, index, pos, backend=backend, validate=validate)

    fn.__name__ = f"masked_gather_{backend}"
    fn.__doc__ = f"``masked_gather(..., backend={backend!r})`` (same contract)."
    return fn


def _scatter_on(backend: str):
    def fn(y, index, fill, num_patches, pos=None, *, validate: bool = True):
        return masked_scatter_fill(
            y, index, fill, num_patches, pos, backend=backend, validate=validate
        )

    fn.__name__ = f"masked_scatter_fill_{backend}"
    fn.__doc__ = f"``masked_scatter_fill(..., backend={backend!r})`` (same contract)."
    return fn


masked_gather_reference = _gather_on("reference")
masked_scatter_fill_reference = _scatter_on("reference")
