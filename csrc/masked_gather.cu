// CUDA kernels of the masked gather / scatter-with-fill op (see masked_gather.h for the math).
// Rows are moved in VEC-element vectors (16 bytes when D, the strides and the pointers allow it;
// Python picks VEC). A block covers a few rows: threadIdx.x walks the vectors of one row,
// threadIdx.y picks the row, so no per-element division is needed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <string>

#include "common.h"
#include "cuda_common.cuh"
#include "masked_gather.h"

namespace semmim {
namespace mg {

namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> add_vec(Vec<T, VEC> a, const Vec<T, VEC>& b) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) a.v[k] = from_f<T>(to_f(a.v[k]) + to_f(b.v[k]));
  return a;
}

struct Launch {
  dim3 grid, block;
};

// blockDim.x covers (up to 256 threads of) one row's vectors; blockDim.y rows per block.
inline Launch row_launch(i64 rows, i64 nvec) {
  const int tx = static_cast<int>(std::min<i64>(256, ((nvec + 31) / 32) * 32));
  const int ty = std::max(1, 256 / tx);
  const i64 gx = (rows + ty - 1) / ty;
  if (gx > 2147483647LL) throw std::runtime_error("semmim._C masked_gather: too many rows");
  return {dim3(static_cast<unsigned>(gx)), dim3(tx, ty)};
}

template <typename T, typename I, int VEC, bool POS>
__global__ void gather_rows_kernel(const T* __restrict__ x, i64 sxb, i64 sxp,
                                   const I* __restrict__ idx, const T* __restrict__ pos,
                                   T* __restrict__ out, i64 B, i64 P, i64 R, i64 D) {
  using V = Vec<T, VEC>;
  const i64 row = static_cast<i64>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= B * R) return;
  const i64 b = row / R;
  const i64 p = static_cast<i64>(idx[row]);
  const i64 nvec = D / VEC;
  if (p < 0 || p >= P) {
    // Validated by the public op (validate=True). Without validation an out-of-range entry gives
    // a NaN row (never an unwritten one, never an out-of-bounds read): checking on the device
    // and reporting it would need a host sync.
    T* dst = out + row * D;
    for (i64 c = threadIdx.x; c < D; c += blockDim.x) dst[c] = from_f<T>(__int_as_float(0x7fc00000));
    return;
  }
  const V* src = reinterpret_cast<const V*>(x + b * sxb + p * sxp);
  const V* prow = POS ? reinterpret_cast<const V*>(pos + p * D) : nullptr;
  V* dst = reinterpret_cast<V*>(out + row * D);
  for (i64 c = threadIdx.x; c < nvec; c += blockDim.x) {
    V v = src[c];
    if constexpr (POS) v = add_vec(v, prow[c]);
    dst[c] = v;
  }
}

template <typename I>
__global__ void build_inverse_kernel(const I* __restrict__ idx, int* __restrict__ inv, i64 B,
                                     i64 P, i64 R) {
  const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * R) return;
  const i64 b = i / R;
  const i64 p = static_cast<i64>(idx[i]);
  // out-of-range entries are skipped (validated by the public op; see gather_rows_kernel)
  if (p >= 0 && p < P) inv[b * P + p] = static_cast<int>(i - b * R);
}

template <typename T, int VEC, bool FILL, bool POS>
__global__ void scatter_rows_kernel(const T* __restrict__ y, i64 syb, i64 syr,
                                    const int* __restrict__ inv, const T* __restrict__ fill,
                                    const T* __restrict__ pos, T* __restrict__ out, i64 B, i64 P,
                                    i64 D) {
  using V = Vec<T, VEC>;
  const i64 row = static_cast<i64>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= B * P) return;
  const i64 b = row / P, p = row - b * P;
  const int r = inv[row];
  const i64 nvec = D / VEC;
  const V* src = r >= 0 ? reinterpret_cast<const V*>(y + b * syb + static_cast<i64>(r) * syr)
                        : reinterpret_cast<const V*>(fill);
  const V* prow = POS ? reinterpret_cast<const V*>(pos + p * D) : nullptr;
  V* dst = reinterpret_cast<V*>(out + row * D);
  for (i64 c = threadIdx.x; c < nvec; c += blockDim.x) {
    V v;
    if (r >= 0 || FILL) {
      v = src[c];
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v.v[k] = from_f<T>(0.0f);
    }
    if constexpr (POS) v = add_vec(v, prow[c]);
    dst[c] = v;
  }
}

// grid (P, nchunk); each thread owns VEC columns of one p and sums over the chunk's batch rows.
template <typename T, int VEC, bool COMPACT>
__global__ void column_pass_kernel(const T* __restrict__ g, const int* __restrict__ inv,
                                   T* __restrict__ grad_x, float* __restrict__ part_pos,
                                   float* __restrict__ part_fill, i64 nchunk, i64 B, i64 P, i64 R,
                                   i64 D) {
  using V = Vec<T, VEC>;
  const i64 p = blockIdx.x, c = blockIdx.y;
  const i64 per = (B + nchunk - 1) / nchunk;
  const i64 b0 = c * per, b1 = min(B, b0 + per);
  const i64 nvec = D / VEC;
  for (i64 cv = threadIdx.x; cv < nvec; cv += blockDim.x) {
    float ap[VEC], af[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) ap[k] = af[k] = 0.0f;
    for (i64 b = b0; b < b1; ++b) {
      const int r = inv[b * P + p];
      V v;
      if constexpr (COMPACT) {
        if (r >= 0) {
          v = reinterpret_cast<const V*>(g + (b * R + r) * D)[cv];
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) v.v[k] = from_f<T>(0.0f);
        }
        if (grad_x) reinterpret_cast<V*>(grad_x + (b * P + p) * D)[cv] = v;
      } else {
        v = reinterpret_cast<const V*>(g + (b * P + p) * D)[cv];
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float f = to_f(v.v[k]);
        ap[k] += f;
        if (!COMPACT && r < 0) af[k] += f;
      }
    }
    const i64 o = (c * P + p) * D + cv * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (part_pos) part_pos[o + k] = ap[k];
      if (part_fill) part_fill[o + k] = af[k];
    }
  }
}

template <typename F>
void dispatch_type(int dtype, const char* name, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat16: f(__half{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument(std::string(name) + ": unsupported dtype " + dtype_name(dtype));
  }
}

// Calls f(std::integral_constant<int, VEC>) for the vector width `vec` (elements).
template <typename T, typename F>
void dispatch_vec(int vec, const char* name, F&& f) {
  constexpr int kMax = 16 / sizeof(T);
  switch (vec) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8:
      if constexpr (kMax >= 8) {
        f(std::integral_constant<int, 8>{});
        break;
      }
      [[fallthrough]];
    default:
      throw std::invalid_argument(std::string(name) + ": bad vector width " + std::to_string(vec));
  }
}

}  // namespace

void gather_rows_cuda(ptr_t x, i64 sxb, i64 sxp, ptr_t idx, int idx_dtype, ptr_t pos, ptr_t out,
                      i64 B, i64 P, i64 R, i64 D, int dtype, int vec, ptr_t stream) {
  cuda_require_device("masked_gather");
  if (B * R == 0 || D == 0) return;
  dispatch_type(dtype, "gather_rows_cuda", [&](auto tag) {
    using T = decltype(tag);
    dispatch_vec<T>(vec, "gather_rows_cuda", [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      const Launch l = row_launch(B * R, D / VEC);
      auto go = [&](auto itag, auto has_pos) {
        using I = decltype(itag);
        gather_rows_kernel<T, I, VEC, decltype(has_pos)::value>
            <<<l.grid, l.block, 0, as_stream(stream)>>>(
                ptr<const T>(x), sxb, sxp, ptr<const I>(idx), ptr<const T>(pos), ptr<T>(out), B, P,
                R, D);
      };
      const bool i32 = idx_dtype == kInt32;
      if (pos) {
        i32 ? go(int{}, std::true_type{}) : go(static_cast<long long>(0), std::true_type{});
      } else {
        i32 ? go(int{}, std::false_type{}) : go(static_cast<long long>(0), std::false_type{});
      }
    });
  });
  cuda_check(cudaGetLastError(), "gather_rows_kernel launch");
}

void build_inverse_cuda(ptr_t idx, int idx_dtype, ptr_t inv, i64 B, i64 P, i64 R, ptr_t stream) {
  cuda_require_device("masked_gather");
  if (B * P == 0) return;
  cuda_check(cudaMemsetAsync(ptr<void>(inv), 0xFF, sizeof(int) * B * P, as_stream(stream)),
             "build_inverse memset");
  if (B * R == 0) return;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((B * R + threads - 1) / threads);
  if (idx_dtype == kInt32) {
    build_inverse_kernel<int><<<blocks, threads, 0, as_stream(stream)>>>(
        ptr<const int>(idx), ptr<int>(inv), B, P, R);
  } else {
    build_inverse_kernel<long long><<<blocks, threads, 0, as_stream(stream)>>>(
        ptr<const long long>(idx), ptr<int>(inv), B, P, R);
  }
  cuda_check(cudaGetLastError(), "build_inverse_kernel launch");
}

void scatter_rows_cuda(ptr_t y, i64 syb, i64 syr, ptr_t inv, ptr_t fill, ptr_t pos, ptr_t out,
                       i64 B, i64 P, i64 R, i64 D, int dtype, int vec, ptr_t stream) {
  (void)R;
  cuda_require_device("masked_gather");
  if (B * P == 0 || D == 0) return;
  dispatch_type(dtype, "scatter_rows_cuda", [&](auto tag) {
    using T = decltype(tag);
    dispatch_vec<T>(vec, "scatter_rows_cuda", [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      const Launch l = row_launch(B * P, D / VEC);
      auto go = [&](auto has_fill, auto has_pos) {
        scatter_rows_kernel<T, VEC, decltype(has_fill)::value, decltype(has_pos)::value>
            <<<l.grid, l.block, 0, as_stream(stream)>>>(
                ptr<const T>(y), syb, syr, ptr<const int>(inv), ptr<const T>(fill),
                ptr<const T>(pos), ptr<T>(out), B, P, D);
      };
      if (fill && pos) go(std::true_type{}, std::true_type{});
      else if (fill) go(std::true_type{}, std::false_type{});
      else if (pos) go(std::false_type{}, std::true_type{});
      else go(std::false_type{}, std::false_type{});
    });
  });
  cuda_check(cudaGetLastError(), "scatter_rows_kernel launch");
}

void column_pass_cuda(ptr_t g, int compact, ptr_t inv, ptr_t grad_x, ptr_t part_pos,
                      ptr_t part_fill, i64 nchunk, i64 B, i64 P, i64 R, i64 D, int dtype, int vec,
                      ptr_t stream) {
  cuda_require_device("masked_gather");
  if (nchunk < 1 || nchunk > 65535) throw std::invalid_argument("column_pass_cuda: bad nchunk");
  if (P == 0 || D == 0) return;
  if (P > 2147483647LL) throw std::invalid_argument("column_pass_cuda: P too large");
  dispatch_type(dtype, "column_pass_cuda", [&](auto tag) {
    using T = decltype(tag);
    dispatch_vec<T>(vec, "column_pass_cuda", [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      const i64 nvec = D / VEC;
      const int threads = static_cast<int>(std::min<i64>(256, ((nvec + 31) / 32) * 32));
      const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(nchunk));
      if (compact) {
        column_pass_kernel<T, VEC, true><<<grid, threads, 0, as_stream(stream)>>>(
            ptr<const T>(g), ptr<const int>(inv), ptr<T>(grad_x), ptr<float>(part_pos),
            ptr<float>(part_fill), nchunk, B, P, R, D);
      } else {
        column_pass_kernel<T, VEC, false><<<grid, threads, 0, as_stream(stream)>>>(
            ptr<const T>(g), ptr<const int>(inv), ptr<T>(grad_x), ptr<float>(part_pos),
            ptr<float>(part_fill), nchunk, B, P, R, D);
      }
    });
  });
  cuda_check(cudaGetLastError(), "column_pass_kernel launch");
}

}  // namespace mg
}  // namespace semmim
