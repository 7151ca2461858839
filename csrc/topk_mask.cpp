// C++ (OpenMP over rows) CPU kernel of the fused text–patch similarity top-k masking op, and its
// bindings. One pass over patch[b]: per patch a fp32 dot product with the text and a fp32 squared
// norm (16 partial sums each, combined pairwise), then the exact M-th largest (score, index) key
// by nth_element and a compaction pass that writes mask, mask_idx and keep_idx in index order.
#include "topk_mask.h"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "common.h"

namespace py = pybind11;

// x86-64: one clone for AVX2/FMA/F16C machines, one baseline; the loader picks at import time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SEMMIM_TM_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SEMMIM_TM_CLONES
#endif

namespace semmim {
namespace tm {

namespace {

inline float bits_to_f(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline std::uint32_t f_to_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Branch-free loads to float (vectorisable; common.h's to_float branches on subnormals).
inline float load_f(float v) { return v; }
inline float load_f(bf16_t v) { return bits_to_f(static_cast<std::uint32_t>(v.bits) << 16); }
inline float load_f(half_t v) {
  const std::uint32_t h = v.bits;
  const std::uint32_t shifted_exp = 0x7C00u << 13;
  std::uint32_t o = (h & 0x7FFFu) << 13;
  const std::uint32_t exp = o & shifted_exp;
  o += (127u - 15u) << 23;
  const std::uint32_t o_inf = o + ((128u - 16u) << 23);  // inf / NaN
  const std::uint32_t o_sub = f_to_bits(bits_to_f(o + (1u << 23)) - bits_to_f(113u << 23));
  std::uint32_t r = exp == shifted_exp ? o_inf : (exp == 0 ? o_sub : o);
  r |= (h & 0x8000u) << 16;
  return bits_to_f(r);
}

constexpr int kLanes = 16;

// dot(a, t) and |a|^2 in fp32 with kLanes partial sums (lane j takes elements j, j+16, ...),
// combined pairwise: a fixed order, so equal rows give bit-equal results.
template <typename T>
inline void dot_and_sumsq(const T* __restrict a, const float* __restrict t, i64 d, float& dot,
                          float& ss) {
  float acc[kLanes] = {}, sq[kLanes] = {};
  i64 k = 0;
  for (; k + kLanes <= d; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float x = load_f(a[k + j]);
      acc[j] += x * t[k + j];
      sq[j] += x * x;
    }
  }
  for (int j = 0; k + j < d; ++j) {
    const float x = load_f(a[k + j]);
    acc[j] += x * t[k + j];
    sq[j] += x * x;
  }
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int j = 0; j < w; ++j) {
      acc[j] += acc[j + w];
      sq[j] += sq[j + w];
    }
  }
  dot = acc[0];
  ss = sq[0];
}

// raw[p] = dot(patch row p, t), norm2[p] = |patch row p|^2 for p < P.
template <typename T>
inline void row_dots(const T* __restrict row, i64 sp, const float* __restrict t, i64 P, i64 d,
                     float* __restrict raw, float* __restrict norm2) {
  for (i64 p = 0; p < P; ++p) dot_and_sumsq(row + p * sp, t, d, raw[p], norm2[p]);
}

SEMMIM_TM_CLONES void row_dots_f32(const float* row, i64 sp, const float* t, i64 P, i64 d,
                                   float* raw, float* norm2) {
  row_dots(row, sp, t, P, d, raw, norm2);
}
SEMMIM_TM_CLONES void row_dots_f16(const half_t* row, i64 sp, const float* t, i64 P, i64 d,
                                   float* raw, float* norm2) {
  row_dots(row, sp, t, P, d, raw, norm2);
}
SEMMIM_TM_CLONES void row_dots_bf16(const bf16_t* row, i64 sp, const float* t, i64 P, i64 d,
                                    float* raw, float* norm2) {
  row_dots(row, sp, t, P, d, raw, norm2);
}

// Order-preserving map float -> uint32 (larger float -> larger key); -0.0 maps like +0.0.
inline std::uint32_t score_key(float s) {
  std::uint32_t u = f_to_bits(s);
  if ((u & 0x7FFFFFFFu) == 0) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

void topk_mask_rows(ptr_t patch, i64 sb, i64 sp, int dtype, const float* text, i64 text_sb,
                    const float* noise, i64 nsb, i64 nsp, float tau, float eps,
                    std::int64_t* keep_idx, std::int64_t* mask_idx, std::uint8_t* mask, i64 B,
                    i64 P, i64 d, i64 M) {
  const i64 R = P - M;
#pragma omp parallel
  {
    std::vector<float> raw(P), norm2(P);
    std::vector<std::uint64_t> keys(P), scratch(P);
#pragma omp for schedule(static)
    for (i64 b = 0; b < B; ++b) {
      const float* t = text + b * text_sb;
      float tacc[kLanes] = {};
      {  // |text|^2 with the same lane/pairwise order as the patch norms
        i64 k = 0;
        for (; k + kLanes <= d; k += kLanes)
          for (int j = 0; j < kLanes; ++j) tacc[j] += t[k + j] * t[k + j];
        for (int j = 0; k + j < d; ++j) tacc[j] += t[k + j] * t[k + j];
        for (int w = kLanes / 2; w >= 1; w /= 2)
          for (int j = 0; j < w; ++j) tacc[j] += tacc[j + w];
      }
      const float t_norm = std::max(std::sqrt(tacc[0]), eps);
      switch (dtype) {
        case kFloat32:
          row_dots_f32(ptr<const float>(patch) + b * sb, sp, t, P, d, raw.data(), norm2.data());
          break;
        case kFloat16:
          row_dots_f16(ptr<const half_t>(patch) + b * sb, sp, t, P, d, raw.data(), norm2.data());
          break;
        default:
          row_dots_bf16(ptr<const bf16_t>(patch) + b * sb, sp, t, P, d, raw.data(),
                        norm2.data());
          break;
      }
      for (i64 p = 0; p < P; ++p) {
        float s = raw[p] / (std::max(std::sqrt(norm2[p]), eps) * t_norm);
        if (noise != nullptr) s = s / tau + noise[b * nsb + p * nsp];
        // unique keys: score in the high half, complemented index in the low half (lower wins)
        keys[p] = (static_cast<std::uint64_t>(score_key(s)) << 32) |
                  static_cast<std::uint64_t>(0xFFFFFFFFu - static_cast<std::uint32_t>(p));
      }
      scratch = keys;
      std::nth_element(scratch.begin(), scratch.begin() + (M - 1), scratch.end(),
                       std::greater<std::uint64_t>());
      const std::uint64_t kth = scratch[M - 1];  // the M-th largest key: masked iff key >= kth
      std::int64_t* mi = mask_idx + b * M;
      std::int64_t* ki = keep_idx + b * R;
      std::uint8_t* mrow = mask + b * P;
      i64 nm = 0, nk = 0;
      for (i64 p = 0; p < P; ++p) {
        const bool m = keys[p] >= kth;
        mrow[p] = m ? 1 : 0;
        if (m) {
          if (nm < M) mi[nm] = p;
          ++nm;
        } else {
          if (nk < R) ki[nk] = p;
          ++nk;
        }
      }
    }
  }
}

}  // namespace

void topk_mask_cpu(ptr_t patch, i64 sb, i64 sp, int dtype, ptr_t text, i64 text_sb, ptr_t noise,
                   i64 nsb, i64 nsp, float tau, float eps, ptr_t keep_idx, ptr_t mask_idx,
                   ptr_t mask, i64 B, i64 P, i64 d, i64 M) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    fail(std::string("topk_mask_cpu: unsupported dtype ") + dtype_name(dtype));
  if (B < 0 || P < 2 || P > kTopkMaskMaxP || d < 1 || M < 1 || M > P - 1)
    fail("topk_mask_cpu: need B >= 0, 2 <= P <= " + std::to_string(kTopkMaskMaxP) +
         ", d >= 1, 1 <= M <= P-1; got B=" + std::to_string(B) + " P=" + std::to_string(P) +
         " d=" + std::to_string(d) + " M=" + std::to_string(M));
  if (!(tau > 0.0f)) fail("topk_mask_cpu: tau must be > 0");
  topk_mask_rows(patch, sb, sp, dtype, ptr<const float>(text), text_sb, ptr<const float>(noise),
                 nsb, nsp, tau, eps, ptr<std::int64_t>(keep_idx), ptr<std::int64_t>(mask_idx),
                 ptr<std::uint8_t>(mask), B, P, d, M);
}

namespace {

void topk_mask_cuda_entry(ptr_t patch, i64 sb, i64 sp, int dtype, ptr_t text, i64 text_sb,
                          ptr_t noise, i64 nsb, i64 nsp, float tau, float eps, ptr_t keep_idx,
                          ptr_t mask_idx, ptr_t mask, i64 B, i64 P, i64 d, i64 M, int vec,
                          ptr_t stream) {
#ifndef SEMMIM_WITH_CUDA
  (void)patch, (void)sb, (void)sp, (void)dtype, (void)text, (void)text_sb, (void)noise;
  (void)nsb, (void)nsp, (void)tau, (void)eps, (void)keep_idx, (void)mask_idx, (void)mask;
  (void)B, (void)P, (void)d, (void)M, (void)vec, (void)stream;
  throw std::runtime_error("semmim._C built without CUDA");
#else
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    fail(std::string("topk_mask_cuda: unsupported dtype ") + dtype_name(dtype));
  if (B < 0 || P < 2 || P > kTopkMaskMaxP || d < 1 || d > kTopkMaskMaxDCuda || M < 1 ||
      M > P - 1)
    fail("topk_mask_cuda: need B >= 0, 2 <= P <= " + std::to_string(kTopkMaskMaxP) +
         ", 1 <= d <= " + std::to_string(kTopkMaskMaxDCuda) + ", 1 <= M <= P-1; got B=" +
         std::to_string(B) + " P=" + std::to_string(P) + " d=" + std::to_string(d) +
         " M=" + std::to_string(M));
  if (!(tau > 0.0f)) fail("topk_mask_cuda: tau must be > 0");
  topk_mask_cuda_launch(patch, sb, sp, dtype, text, text_sb, noise, nsb, nsp, tau, eps, keep_idx,
                        mask_idx, mask, B, P, d, M, vec, stream);
#endif
}

}  // namespace

}  // namespace tm

void bind_topk_mask(py::module_& m) {
  using namespace tm;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("tm_topk_mask_cpu", &topk_mask_cpu, nogil,
        "topk_mask CPU kernel (pointers, strides in elements; see csrc/topk_mask.h)");
  m.def("tm_topk_mask_cuda", &topk_mask_cuda_entry, nogil,
        "topk_mask CUDA kernel (pointers, strides in elements, stream; see csrc/topk_mask.h)");
  m.attr("tm_max_p") = py::int_(kTopkMaskMaxP);
  m.attr("tm_max_d_cuda") = py::int_(kTopkMaskMaxDCuda);
}

}  // namespace semmim
