// Fused text–patch similarity top-k masking: shared declarations of the CPU and CUDA entry points.
//
// For row b (patch is (B,P,d) of `dtype` with strides sb/sp and a contiguous last dim; text is
// fp32 (B,d) with row stride text_sb; noise is fp32 (B,P) with strides nsb/nsp, or 0 = none):
//   s[p] = dot(patch[b,p], text[b]) / (max(|patch[b,p]|, eps) * max(|text[b]|, eps))   (fp32)
//   s[p] = s[p] / tau + noise[b,p]                                       (when noise is given)
//   the M largest s are masked, equal scores -> lower p first (-0.0 == +0.0)
// Outputs (contiguous): keep_idx (B,P-M) int64 ascending, mask_idx (B,M) int64 ascending,
// mask (B,P) bool (one byte each), nonfinite (B,) int32 = #{p : s[p] is NaN/inf} per row (how
// NaN/inf inputs are detected without a second pass over patch).
// Requires 1 <= M <= P-1 and P <= kTopkMaskMaxP.
#pragma once

#include <cstdint>

namespace semmim {
namespace tm {

using i64 = std::int64_t;
using ptr_t = std::uintptr_t;

constexpr i64 kTopkMaskMaxP = 1024;
constexpr i64 kTopkMaskMaxDCuda = 8192;  // text row kept in shared memory as fp32

void topk_mask_cpu(ptr_t patch, i64 sb, i64 sp, int dtype, ptr_t text, i64 text_sb, ptr_t noise,
                   i64 nsb, i64 nsp, float tau, float eps, ptr_t keep_idx, ptr_t mask_idx,
                   ptr_t mask, ptr_t nonfinite, i64 B, i64 P, i64 d, i64 M);

#ifdef SEMMIM_WITH_CUDA
void topk_mask_cuda_launch(ptr_t patch, i64 sb, i64 sp, int dtype, ptr_t text, i64 text_sb,
                           ptr_t noise, i64 nsb, i64 nsp, float tau, float eps, ptr_t keep_idx,
                           ptr_t mask_idx, ptr_t mask, ptr_t nonfinite, i64 B, i64 P, i64 d,
                           i64 M, int vec, ptr_t stream);
#endif

}  // namespace tm
}  // namespace semmim
