// Masked-patch gather / scatter-with-fill: shared declarations of the CPU and CUDA entry points.
//
// All entry points take data pointers as integers, sizes, strides in elements, a dtype code
// (common.h) and, for CUDA, a raw stream handle. Row layout: the last dimension D is contiguous.
//   gather_rows    out[b,r,:] = x[b, idx[b,r], :] (+ pos[idx[b,r], :])            out (B,R,D)
//   build_inverse  inv[b,p] = r where idx[b,r] == p, else -1                       inv (B,P) int32
//   scatter_rows   out[b,p,:] = (inv[b,p] >= 0 ? y[b,inv[b,p],:] : fill) (+ pos[p,:]) out (B,P,D)
//                  (fill == 0 means zeros)
//   column_pass    backward reductions over the batch, fp32 partial sums per batch chunk:
//                  compact=1: g is (B,R,D); v[b,p] = inv>=0 ? g[b,inv] : 0; grad_x[b,p] = v (if
//                             given); part_pos[c,p] += v over b in chunk c
//                  compact=0: g is (B,P,D); v = g[b,p]; part_pos[c,p] += v; part_fill[c,p] += v
//                             where inv[b,p] < 0
#pragma once

#include <cstdint>

namespace semmim {
namespace mg {

using i64 = std::int64_t;
using ptr_t = std::uintptr_t;

void gather_rows_cpu(ptr_t x, i64 sxb, i64 sxp, ptr_t idx, int idx_dtype, ptr_t pos, ptr_t out,
                     i64 B, i64 P, i64 R, i64 D, int dtype);
void build_inverse_cpu(ptr_t idx, int idx_dtype, ptr_t inv, i64 B, i64 P, i64 R);
void scatter_rows_cpu(ptr_t y, i64 syb, i64 syr, ptr_t inv, ptr_t fill, ptr_t pos, ptr_t out,
                      i64 B, i64 P, i64 R, i64 D, int dtype);
void column_pass_cpu(ptr_t g, int compact, ptr_t inv, ptr_t grad_x, ptr_t part_pos,
                     ptr_t part_fill, i64 nchunk, i64 B, i64 P, i64 R, i64 D, int dtype);

#ifdef SEMMIM_WITH_CUDA
void gather_rows_cuda(ptr_t x, i64 sxb, i64 sxp, ptr_t idx, int idx_dtype, ptr_t pos, ptr_t out,
                      i64 B, i64 P, i64 R, i64 D, int dtype, int vec, ptr_t stream);
void build_inverse_cuda(ptr_t idx, int idx_dtype, ptr_t inv, i64 B, i64 P, i64 R, ptr_t stream);
void scatter_rows_cuda(ptr_t y, i64 syb, i64 syr, ptr_t inv, ptr_t fill, ptr_t pos, ptr_t out,
                       i64 B, i64 P, i64 R, i64 D, int dtype, int vec, ptr_t stream);
void column_pass_cuda(ptr_t g, int compact, ptr_t inv, ptr_t grad_x, ptr_t part_pos,
                      ptr_t part_fill, i64 nchunk, i64 B, i64 P, i64 R, i64 D, int dtype, int vec,
                      ptr_t stream);
#endif

}  // namespace mg
}  // namespace semmim
