// C++ (OpenMP) CPU kernels of the masked gather / scatter-with-fill op, and its bindings.
// Pure data movement except the fused "+ pos" (one float add, rounded once: exactly what torch
// does for float16/bfloat16 addition) and the backward column sums (fp32 accumulation).
#include "masked_gather.h"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "common.h"

namespace py = pybind11;

namespace semmim {
namespace mg {

namespace {

template <typename I>
inline i64 load_index(const void* idx, i64 i) {
  return static_cast<i64>(static_cast<const I*>(idx)[i]);
}

inline i64 index_at(const void* idx, int idx_dtype, i64 i) {
  return idx_dtype == kInt32 ? load_index<std::int32_t>(idx, i) : load_index<std::int64_t>(idx, i);
}

#if defined(__x86_64__) && defined(__GNUC__)
// float16 rows through the F16C conversion instructions (vcvtph2ps / vcvtps2ph, round to nearest
// even, as torch's vectorised path), chosen at run time so the module still loads without them.
__attribute__((target("avx,f16c"))) void add_rows_half_f16c(half_t* dst, const half_t* a,
                                                            const half_t* b, i64 D) {
  i64 d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + d)));
    const __m256 y = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + d)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d),
                     _mm256_cvtps_ph(_mm256_add_ps(x, y), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; d < D; ++d) dst[d] = from_float<half_t>(to_float(a[d]) + to_float(b[d]));
}
const bool kHasF16C = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
#endif

// dst[0:D] = src[0:D] (+ add[0:D]), one rounding per element.
template <typename T>
inline void copy_row(T* dst, const T* src, const T* add, i64 D) {
  if (add == nullptr) {
    std::memcpy(dst, src, sizeof(T) * D);
    return;
  }
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, half_t>) {
    if (kHasF16C) {
      add_rows_half_f16c(dst, src, add, D);
      return;
    }
  }
#endif
  for (i64 d = 0; d < D; ++d) dst[d] = from_float<T>(to_float(src[d]) + to_float(add[d]));
}

[[noreturn]] void fail_out_of_range(const char* fn, i64 bad, i64 B, i64 R, i64 P) {
  fail(std::string(fn) + ": index entries must lie in [0, " + std::to_string(P) + "), got " +
       std::to_string(bad) + " out-of-range entr" + (bad == 1 ? "y" : "ies") + " in index (" +
       std::to_string(B) + ", " + std::to_string(R) + ")");
}

// Every index entry is bounds-checked (one compare per row: free next to the row copy), so the
// entry points are safe to call directly: an out-of-range entry raises ValueError after the
// loop (nothing is read out of bounds; its output row is zero-filled first).
template <typename T>
void gather_rows_impl(const T* x, i64 sxb, i64 sxp, const void* idx, int idx_dtype, const T* pos,
                      T* out, i64 B, i64 P, i64 R, i64 D) {
  i64 bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad)
  for (i64 row = 0; row < B * R; ++row) {
    const i64 b = row / R;
    const i64 p = index_at(idx, idx_dtype, row);
    if (p < 0 || p >= P) {
      std::fill(out + row * D, out + (row + 1) * D, from_float<T>(0.0f));
      ++bad;
      continue;
    }
    copy_row(out + row * D, x + b * sxb + p * sxp, pos ? pos + p * D : nullptr, D);
  }
  if (bad) fail_out_of_range("masked_gather (cpu)", bad, B, R, P);
}

template <typename T>
void scatter_rows_impl(const T* y, i64 syb, i64 syr, const std::int32_t* inv, const T* fill,
                       const T* pos, T* out, i64 B, i64 P, i64 D) {
  std::vector<T> zeros;
  if (fill == nullptr) {
    zeros.assign(D, from_float<T>(0.0f));
    fill = zeros.data();
  }
#pragma omp parallel for schedule(static)
  for (i64 row = 0; row < B * P; ++row) {
    const i64 b = row / P, p = row % P;
    const std::int32_t r = inv[row];
    const T* src = r >= 0 ? y + b * syb + static_cast<i64>(r) * syr : fill;
    copy_row(out + row * D, src, pos ? pos + p * D : nullptr, D);
  }
}

template <typename T>
void column_pass_impl(const T* g, int compact, const std::int32_t* inv, T* grad_x,
                      float* part_pos, float* part_fill, i64 nchunk, i64 B, i64 P, i64 R,
                      i64 D) {
  const i64 per = (B + nchunk - 1) / nchunk;
#pragma omp parallel
  {
    std::vector<float> acc_pos(D), acc_fill(D);
#pragma omp for schedule(static) collapse(2)
    for (i64 c = 0; c < nchunk; ++c) {
      for (i64 p = 0; p < P; ++p) {
        std::fill(acc_pos.begin(), acc_pos.end(), 0.0f);
        std::fill(acc_fill.begin(), acc_fill.end(), 0.0f);
        const i64 b_end = std::min(B, (c + 1) * per);
        for (i64 b = c * per; b < b_end; ++b) {
          const std::int32_t r = inv[b * P + p];
          if (compact) {
            T* gx = grad_x ? grad_x + (b * P + p) * D : nullptr;
            if (r < 0) {
              if (gx) std::fill(gx, gx + D, from_float<T>(0.0f));
              continue;
            }
            const T* src = g + (b * R + r) * D;
            if (gx) std::memcpy(gx, src, sizeof(T) * D);
            for (i64 d = 0; d < D; ++d) acc_pos[d] += to_float(src[d]);
          } else {
            const T* src = g + (b * P + p) * D;
            for (i64 d = 0; d < D; ++d) acc_pos[d] += to_float(src[d]);
            if (r < 0)
              for (i64 d = 0; d < D; ++d) acc_fill[d] += to_float(src[d]);
          }
        }
        const i64 o = (c * P + p) * D;
        if (part_pos) std::memcpy(part_pos + o, acc_pos.data(), sizeof(float) * D);
        if (part_fill) std::memcpy(part_fill + o, acc_fill.data(), sizeof(float) * D);
      }
    }
  }
}

#define SEMMIM_DISPATCH_FLOAT(dtype, NAME, ...)                              \
  switch (dtype) {                                                          \
    case kFloat32: { using scalar_t = float; __VA_ARGS__; break; }          \
    case kFloat16: { using scalar_t = half_t; __VA_ARGS__; break; }         \
    case kBFloat16: { using scalar_t = bf16_t; __VA_ARGS__; break; }        \
    default: fail(std::string(NAME) + ": unsupported dtype " + dtype_name(dtype)); \
  }

void check_index_dtype(int idx_dtype, const char* name) {
  if (idx_dtype != kInt32 && idx_dtype != kInt64)
    fail(std::string(name) + ": index must be int32 or int64, got " + dtype_name(idx_dtype));
}

}  // namespace

void gather_rows_cpu(ptr_t x, i64 sxb, i64 sxp, ptr_t idx, int idx_dtype, ptr_t pos, ptr_t out,
                     i64 B, i64 P, i64 R, i64 D, int dtype) {
  check_index_dtype(idx_dtype, "gather_rows_cpu");
  SEMMIM_DISPATCH_FLOAT(dtype, "gather_rows_cpu",
                        gather_rows_impl(ptr<const scalar_t>(x), sxb, sxp, ptr<const void>(idx),
                                         idx_dtype, ptr<const scalar_t>(pos),
                                         ptr<scalar_t>(out), B, P, R, D));
}

void build_inverse_cpu(ptr_t idx, int idx_dtype, ptr_t inv, i64 B, i64 P, i64 R) {
  check_index_dtype(idx_dtype, "build_inverse_cpu");
  std::int32_t* out = ptr<std::int32_t>(inv);
  const void* ix = ptr<const void>(idx);
  i64 bad = 0, dup = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad, dup)
  for (i64 b = 0; b < B; ++b) {
    std::fill(out + b * P, out + (b + 1) * P, -1);
    for (i64 r = 0; r < R; ++r) {
      const i64 p = index_at(ix, idx_dtype, b * R + r);
      if (p < 0 || p >= P) {
        ++bad;
      } else if (out[b * P + p] >= 0) {
        ++dup;  // this slot is already taken by an earlier entry of the row
      } else {
        out[b * P + p] = static_cast<std::int32_t>(r);
      }
    }
  }
  // range first: an out-of-range entry is never reported as a duplicate
  if (bad) fail_out_of_range("masked_scatter_fill / masked_gather backward (cpu)", bad, B, R, P);
  if (dup)
    fail("index rows must hold unique entries: " + std::to_string(dup) +
         " duplicate(s) in index (" + std::to_string(B) + ", " + std::to_string(R) + ")");
}

void scatter_rows_cpu(ptr_t y, i64 syb, i64 syr, ptr_t inv, ptr_t fill, ptr_t pos, ptr_t out,
                      i64 B, i64 P, i64 R, i64 D, int dtype) {
  (void)R;
  SEMMIM_DISPATCH_FLOAT(dtype, "scatter_rows_cpu",
                        scatter_rows_impl(ptr<const scalar_t>(y), syb, syr,
                                          ptr<const std::int32_t>(inv),
                                          ptr<const scalar_t>(fill), ptr<const scalar_t>(pos),
                                          ptr<scalar_t>(out), B, P, D));
}

void column_pass_cpu(ptr_t g, int compact, ptr_t inv, ptr_t grad_x, ptr_t part_pos,
                     ptr_t part_fill, i64 nchunk, i64 B, i64 P, i64 R, i64 D, int dtype) {
  if (nchunk < 1) fail("column_pass_cpu: nchunk must be >= 1");
  SEMMIM_DISPATCH_FLOAT(dtype, "column_pass_cpu",
                        column_pass_impl(ptr<const scalar_t>(g), compact,
                                         ptr<const std::int32_t>(inv), ptr<scalar_t>(grad_x),
                                         ptr<float>(part_pos), ptr<float>(part_fill), nchunk, B,
                                         P, R, D));
}

#ifndef SEMMIM_WITH_CUDA
namespace {
[[noreturn]] void no_cuda() { throw std::runtime_error("semmim._C built without CUDA"); }
}  // namespace
void gather_rows_cuda(ptr_t, i64, i64, ptr_t, int, ptr_t, ptr_t, i64, i64, i64, i64, int, int,
                      ptr_t) { no_cuda(); }
void build_inverse_cuda(ptr_t, int, ptr_t, i64, i64, i64, ptr_t) { no_cuda(); }
void scatter_rows_cuda(ptr_t, i64, i64, ptr_t, ptr_t, ptr_t, ptr_t, i64, i64, i64, i64, int, int,
                       ptr_t) { no_cuda(); }
void column_pass_cuda(ptr_t, int, ptr_t, ptr_t, ptr_t, ptr_t, i64, i64, i64, i64, i64, int, int,
                      ptr_t) { no_cuda(); }
#endif

}  // namespace mg

void bind_masked_gather(py::module_& m) {
  using namespace mg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("mg_gather_rows_cpu", &gather_rows_cpu, nogil);
  m.def("mg_build_inverse_cpu", &build_inverse_cpu, nogil);
  m.def("mg_scatter_rows_cpu", &scatter_rows_cpu, nogil);
  m.def("mg_column_pass_cpu", &column_pass_cpu, nogil);
  m.def("mg_gather_rows_cuda", &gather_rows_cuda, nogil);
  m.def("mg_build_inverse_cuda", &build_inverse_cuda, nogil);
  m.def("mg_scatter_rows_cuda", &scatter_rows_cuda, nogil);
  m.def("mg_column_pass_cuda", &column_pass_cuda, nogil);
}

}  // namespace semmim
