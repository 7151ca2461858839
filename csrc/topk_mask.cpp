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

// x86-64: the row kernels are compiled twice, for baseline x86-64 and for x86-64-v3 (AVX2, FMA,
// F16C), and picked at run time. GCC/Clang vector extensions keep one source for both.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SEMMIM_TM_X86 1
#include <immintrin.h>
#define SEMMIM_TM_V3 __attribute__((target("arch=x86-64-v3")))
// 32-byte vector types inside always-inlined baseline helpers (same ABI either way)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__GNUC__) || defined(__clang__)
#define SEMMIM_TM_INLINE inline __attribute__((always_inline))
#else
#define SEMMIM_TM_INLINE inline
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

// GCC/Clang vector extensions: 8 fp32 lanes (one AVX register in the x86-64-v3 build, two SSE
// registers in the baseline one). Loads go through memcpy: rows need no alignment.
typedef float v8f __attribute__((vector_size(32)));
typedef std::uint32_t v8u __attribute__((vector_size(32)));
typedef std::int32_t v8i __attribute__((vector_size(32)));
typedef std::uint16_t v8h __attribute__((vector_size(16)));

SEMMIM_TM_INLINE v8f load8(const float* a) {
  v8f v;
  std::memcpy(&v, a, sizeof(v));
  return v;
}
SEMMIM_TM_INLINE v8f load8(const bf16_t* a) {
  v8h h;
  std::memcpy(&h, a, sizeof(h));
  const v8u u = __builtin_convertvector(h, v8u) << 16;
  v8f f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Row loaders: Row::load8(a) = 8 consecutive elements as fp32, Row::load1(a) = one.
template <typename T>
struct PlainLoad {
  static SEMMIM_TM_INLINE v8f load8(const T* a) { return tm::load8(a); }
  static SEMMIM_TM_INLINE float load1(const T* a) { return load_f(*a); }
};

// float16 without F16C: expand each row to fp32 with the scalar bit trick (load_f) first.
struct HalfLoad {
  static SEMMIM_TM_INLINE v8f load8(const half_t* a) {
    float f[8];
    for (int j = 0; j < 8; ++j) f[j] = load_f(a[j]);
    v8f v;
    std::memcpy(&v, f, sizeof(v));
    return v;
  }
  static SEMMIM_TM_INLINE float load1(const half_t* a) { return load_f(*a); }
};


// dot(a, t) and |a|^2 in fp32 with kLanes partial sums (lane j takes elements j, j+16, ...),
// combined pairwise: a fixed order, so equal rows give bit-equal results.
template <typename Load, typename T>
SEMMIM_TM_INLINE void dot_and_sumsq(const T* __restrict a, const float* __restrict t, i64 d,
                                    float& dot, float& ss) {
  v8f acc0 = {}, acc1 = {}, sq0 = {}, sq1 = {};
  i64 k = 0;
  for (; k + kLanes <= d; k += kLanes) {
    const v8f x0 = Load::load8(a + k), x1 = Load::load8(a + k + 8);
    acc0 += x0 * load8(t + k);
    acc1 += x1 * load8(t + k + 8);
    sq0 += x0 * x0;
    sq1 += x1 * x1;
  }
  float acc[kLanes], sq[kLanes];
  std::memcpy(acc, &acc0, sizeof(acc0));
  std::memcpy(acc + 8, &acc1, sizeof(acc1));
  std::memcpy(sq, &sq0, sizeof(sq0));
  std::memcpy(sq + 8, &sq1, sizeof(sq1));
  for (int j = 0; k + j < d; ++j) {
    const float x = Load::load1(a + k + j);
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
template <typename Load, typename T>
SEMMIM_TM_INLINE void row_dots(const T* __restrict row, i64 sp, const float* __restrict t, i64 P,
                               i64 d, float* __restrict raw, float* __restrict norm2) {
  for (i64 p = 0; p < P; ++p) dot_and_sumsq<Load>(row + p * sp, t, d, raw[p], norm2[p]);
}

using RowDotsFn = void (*)(const void*, i64, const float*, i64, i64, float*, float*);

template <typename Load, typename T>
void row_dots_base(const void* row, i64 sp, const float* t, i64 P, i64 d, float* raw,
                   float* norm2) {
  row_dots<Load>(static_cast<const T*>(row), sp, t, P, d, raw, norm2);
}

#ifdef SEMMIM_TM_X86
template <typename Load, typename T>
SEMMIM_TM_V3 void row_dots_v3(const void* row, i64 sp, const float* t, i64 P, i64 d, float* raw,
                              float* norm2) {
  row_dots<Load>(static_cast<const T*>(row), sp, t, P, d, raw, norm2);
}

// float16 with F16C: expand each patch row to fp32 in an L1-resident buffer, then the fp32 kernel.
SEMMIM_TM_V3 void row_dots_f16_v3(const void* row, i64 sp, const float* t, i64 P, i64 d,
                                  float* raw, float* norm2) {
  thread_local std::vector<float> buf;
  buf.resize(static_cast<size_t>(d));
  float* f = buf.data();
  for (i64 p = 0; p < P; ++p) {
    const half_t* a = static_cast<const half_t*>(row) + p * sp;
    i64 k = 0;
    for (; k + 8 <= d; k += 8)
      _mm256_storeu_ps(
          f + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + k))));
    for (; k < d; ++k) f[k] = load_f(a[k]);
    dot_and_sumsq<PlainLoad<float>>(f, t, d, raw[p], norm2[p]);
  }
}

bool cpu_has_v3() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}
#endif

RowDotsFn row_dots_for(int dtype) {
#ifdef SEMMIM_TM_X86
  if (cpu_has_v3()) {
    switch (dtype) {
      case kFloat32: return &row_dots_v3<PlainLoad<float>, float>;
      case kFloat16: return &row_dots_f16_v3;
      default: return &row_dots_v3<PlainLoad<bf16_t>, bf16_t>;
    }
  }
#endif
  switch (dtype) {
    case kFloat32: return &row_dots_base<PlainLoad<float>, float>;
    case kFloat16: return &row_dots_base<HalfLoad, half_t>;
    default: return &row_dots_base<PlainLoad<bf16_t>, bf16_t>;
  }
}

// 2^-e with e = clamp(floor(log2(maxabs)), 0, 126): an exact power of two that only scales
// down, so the scaled vector's largest element lies in [1, 4) (2^-126 is the smallest normal).
inline float pow2_scale(float maxabs) {
  const int E = static_cast<int>((f_to_bits(maxabs) >> 23) & 0xFFu);
  const int e = std::min(std::max(E - 127, 0), 126);
  return bits_to_f(static_cast<std::uint32_t>(127 - e) << 23);
}

// True when the plain fp32 evaluation of the cosine overflowed (|x| >~ 1e19 squares to inf):
// then the score is recomputed by rescued_cosine (NaN/inf inputs also land here and stay NaN).
inline bool overflowed(float dot, float ss, float t_norm, float eps) {
  return !std::isfinite(dot) || !std::isfinite(ss) || !std::isfinite(t_norm) ||
         !std::isfinite(std::max(std::sqrt(ss), eps) * t_norm);
}

// The same cosine with both vectors pre-scaled by powers of two (exact; cosine is scale
// invariant and the EPS floors scale along), so finite inputs of any magnitude score correctly.
// Rare path: scalar code, three passes over the row.
template <typename T>
float rescued_cosine(const T* a, const float* t, i64 d, float eps) {
  float ap = 0.0f, at = 0.0f;
  for (i64 k = 0; k < d; ++k) {
    ap = std::max(ap, std::fabs(load_f(a[k])));
    at = std::max(at, std::fabs(t[k]));
  }
  const float sa = pow2_scale(ap), st = pow2_scale(at);
  float dot = 0.0f, ss = 0.0f, tss = 0.0f;
  for (i64 k = 0; k < d; ++k) {
    const float x = load_f(a[k]) * sa, y = t[k] * st;
    dot += x * y;
    ss += x * x;
    tss += y * y;
  }
  return dot / (std::max(std::sqrt(ss), eps * sa) * std::max(std::sqrt(tss), eps * st));
}

float rescued_cosine_any(ptr_t row, int dtype, const float* t, i64 d, float eps) {
  switch (dtype) {
    case kFloat32: return rescued_cosine(ptr<const float>(row), t, d, eps);
    case kFloat16: return rescued_cosine(ptr<const half_t>(row), t, d, eps);
    default: return rescued_cosine(ptr<const bf16_t>(row), t, d, eps);
  }
}

// Order-preserving map float -> uint32 (larger float -> larger key); -0.0 maps like +0.0.
inline std::uint32_t score_key(float s) {
  std::uint32_t u = f_to_bits(s);
  if ((u & 0x7FFFFFFFu) == 0) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

void topk_mask_rows(ptr_t patch, i64 sb, i64 sp, int dtype, const float* text, i64 text_sb,
                    const float* noise, i64 nsb, i64 nsp, float tau, float eps,
                    std::int64_t* keep_idx, std::int64_t* mask_idx, std::uint8_t* mask,
                    std::int32_t* nonfinite, i64 B, i64 P, i64 d, i64 M) {
  const i64 R = P - M;
  const RowDotsFn row_dots = row_dots_for(dtype);
  const i64 esize = dtype == kFloat32 ? 4 : 2;
  // Threads only for large calls (>= 16M elements, several ms of work): a team's closing barrier
  // waits for every thread, and on a busy machine (or next to torch's own OpenMP pool, which
  // spins after its parallel regions) one descheduled thread costs a whole scheduler quantum
  // (measured: 20 ms instead of 1 ms for B=64, P=196, d=256 on 2 loaded cores). Dynamic
  // scheduling lets a running thread take the rows of a descheduled one.
  const bool parallel = B > 1 && B * P * d >= (i64{1} << 24);
#pragma omp parallel if (parallel)
  {
    std::vector<float> raw(P), norm2(P);
    std::vector<std::uint64_t> keys(P), scratch(P);
#pragma omp for schedule(dynamic, 1)
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
      row_dots(reinterpret_cast<const char*>(patch) + b * sb * esize, sp, t, P, d, raw.data(),
               norm2.data());
      std::int32_t bad = 0;
      const char* prow = reinterpret_cast<const char*>(patch) + b * sb * esize;
      for (i64 p = 0; p < P; ++p) {
        float s = raw[p] / (std::max(std::sqrt(norm2[p]), eps) * t_norm);
        if (overflowed(raw[p], norm2[p], t_norm, eps))
          s = rescued_cosine_any(reinterpret_cast<ptr_t>(prow + p * sp * esize), dtype, t, d, eps);
        if (noise != nullptr) s = s / tau + noise[b * nsb + p * nsp];
        bad += std::isfinite(s) ? 0 : 1;
        // unique keys: score in the high half, complemented index in the low half (lower wins)
        keys[p] = (static_cast<std::uint64_t>(score_key(s)) << 32) |
                  static_cast<std::uint64_t>(0xFFFFFFFFu - static_cast<std::uint32_t>(p));
      }
      nonfinite[b] = bad;
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
                   ptr_t mask, ptr_t nonfinite, i64 B, i64 P, i64 d, i64 M) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    fail(std::string("topk_mask_cpu: unsupported dtype ") + dtype_name(dtype));
  if (B < 0 || P < 2 || P > kTopkMaskMaxP || d < 1 || M < 1 || M > P - 1)
    fail("topk_mask_cpu: need B >= 0, 2 <= P <= " + std::to_string(kTopkMaskMaxP) +
         ", d >= 1, 1 <= M <= P-1; got B=" + std::to_string(B) + " P=" + std::to_string(P) +
         " d=" + std::to_string(d) + " M=" + std::to_string(M));
  if (!(tau > 0.0f)) fail("topk_mask_cpu: tau must be > 0");
  topk_mask_rows(patch, sb, sp, dtype, ptr<const float>(text), text_sb, ptr<const float>(noise),
                 nsb, nsp, tau, eps, ptr<std::int64_t>(keep_idx), ptr<std::int64_t>(mask_idx),
                 ptr<std::uint8_t>(mask), ptr<std::int32_t>(nonfinite), B, P, d, M);
}

namespace {

void topk_mask_cuda_entry(ptr_t patch, i64 sb, i64 sp, int dtype, ptr_t text, i64 text_sb,
                          ptr_t noise, i64 nsb, i64 nsp, float tau, float eps, ptr_t keep_idx,
                          ptr_t mask_idx, ptr_t mask, ptr_t nonfinite, i64 B, i64 P, i64 d,
                          i64 M, int vec, ptr_t stream) {
#ifndef SEMMIM_WITH_CUDA
  (void)patch, (void)sb, (void)sp, (void)dtype, (void)text, (void)text_sb, (void)noise;
  (void)nsb, (void)nsp, (void)tau, (void)eps, (void)keep_idx, (void)mask_idx, (void)mask;
  (void)nonfinite, (void)B, (void)P, (void)d, (void)M, (void)vec, (void)stream;
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
                        mask_idx, mask, nonfinite, B, P, d, M, vec, stream);
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
}

}  // namespace semmim
