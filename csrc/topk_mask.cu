// CUDA kernel of the fused text–patch similarity top-k masking op (math in topk_mask.h).
// One 1024-thread block per row b:
//   1. text[b] -> shared memory (fp32) and its norm (warp 0, fixed order);
//   2. warp w scores patches w, w+32, ...: lanes stride over d in VEC-element (16-byte) loads,
//      fp32 dot and squared norm, butterfly warp reduction, lane 0 stores an order-preserving
//      uint32 key of the score in shared memory (patch[b] is read exactly once);
//   3. thread p owns key p: a 32-round bitwise search (__syncthreads_count) finds T, the M-th
//      largest key; keys > T are masked, keys == T are masked in index order until M are taken;
//   4. two block-wide exclusive scans (ballot + popc) give each patch its slot in mask_idx or
//      keep_idx, so both come out sorted ascending. Nothing of size (B,P) but the outputs is
//      written to global memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include "common.h"
#include "cuda_common.cuh"
#include "topk_mask.h"

namespace semmim {
namespace tm {

namespace {

constexpr int kThreads = 1024;  // == kTopkMaskMaxP: one thread per key in the selection
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

// Order-preserving float -> uint32 (larger float -> larger key); -0.0 maps like +0.0.
__device__ __forceinline__ unsigned score_key(float s) {
  unsigned u = __float_as_uint(s);
  if ((u & 0x7FFFFFFFu) == 0u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Block-wide exclusive prefix count of `flag` in thread order. All threads must call it.
__device__ __forceinline__ int block_exclusive_count(bool flag, int* warp_buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned ballot = __ballot_sync(0xFFFFFFFFu, flag);
  const int in_warp = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) warp_buf[warp] = __popc(ballot);
  __syncthreads();
  if (warp == 0) {
    const int v = warp_buf[lane];
    int incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(0xFFFFFFFFu, incl, o);
      if (lane >= o) incl += n;
    }
    warp_buf[lane] = incl - v;
  }
  __syncthreads();
  const int res = warp_buf[warp] + in_warp;
  __syncthreads();  // warp_buf is reused by the next call
  return res;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    topk_mask_kernel(const T* __restrict__ patch, i64 sb, i64 sp, const float* __restrict__ text,
                     i64 text_sb, const float* __restrict__ noise, i64 nsb, i64 nsp, float tau,
                     float eps, std::int64_t* __restrict__ keep_idx,
                     std::int64_t* __restrict__ mask_idx, std::uint8_t* __restrict__ mask,
                     std::int32_t* __restrict__ nonfinite, int P,
                     int d, int M) {
  // (d,) fp32 text row, stored "vector-transposed": element c*VEC + j lives at t_sh[j*nvec + c],
  // so the 32 lanes of a warp (consecutive c, same j) read 32 consecutive words: no bank conflicts
  extern __shared__ float t_sh[];
  __shared__ unsigned keys[kThreads];
  __shared__ int warp_buf[kWarps];
  __shared__ float t_norm_sh;
  __shared__ int bad_sh;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const i64 b = blockIdx.x;

  // 1. text row and its norm
  const float* t = text + b * text_sb;
  const int nvec = d / VEC;  // VEC > 1 only when VEC divides d (checked on the host)
  if (tid == 0) bad_sh = 0;
  for (int k = tid; k < d; k += kThreads) t_sh[(k % VEC) * nvec + k / VEC] = t[k];
  __syncthreads();
  if (warp == 0) {
    float ss = 0.0f;
    for (int k = lane; k < d; k += 32) ss += t_sh[k] * t_sh[k];
    ss = warp_sum(ss);
    if (lane == 0) t_norm_sh = fmaxf(sqrtf(ss), eps);
  }
  __syncthreads();
  const float t_norm = t_norm_sh;

  // 2. one warp per patch
  const T* row0 = patch + b * sb;
  for (int p = warp; p < P; p += kWarps) {
    const T* row = row0 + static_cast<i64>(p) * sp;
    float dot = 0.0f, ss = 0.0f;
    if constexpr (VEC > 1) {
      using V = Vec<T, VEC>;
      const V* rv = reinterpret_cast<const V*>(row);
#pragma unroll 4
      for (int c = lane; c < nvec; c += 32) {
        const V v = rv[c];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float x = to_f(v.v[j]);
          dot += x * t_sh[j * nvec + c];
          ss += x * x;
        }
      }
    } else {
#pragma unroll 4
      for (int k = lane; k < d; k += 32) {
        const float x = to_f(row[k]);
        dot += x * t_sh[k];
        ss += x * x;
      }
    }
    dot = warp_sum(dot);
    ss = warp_sum(ss);
    if (lane == 0) {
      float s = dot / (fmaxf(sqrtf(ss), eps) * t_norm);
      if (noise != nullptr) s = s / tau + noise[b * nsb + static_cast<i64>(p) * nsp];
      keys[p] = score_key(s);
      if (!isfinite(s)) atomicAdd(&bad_sh, 1);
    }
  }
  __syncthreads();

  // 3. T = the M-th largest key (largest T with #{key >= T} >= M); padding key 0 is never counted
  const bool valid = tid < P;
  const unsigned key = valid ? keys[tid] : 0u;
  unsigned thr = 0u;
  for (int bit = 31; bit >= 0; --bit) {
    const unsigned cand = thr | (1u << bit);
    if (__syncthreads_count(valid && key >= cand) >= M) thr = cand;
  }
  const bool gt = valid && key > thr;
  const bool eq = valid && key == thr;
  const int need = M - __syncthreads_count(gt);  // ties at T: lowest indices first
  const int eq_rank = block_exclusive_count(eq, warp_buf);
  const bool masked = gt || (eq && eq_rank < need);

  // 4. slots in index order
  const int m_rank = block_exclusive_count(masked, warp_buf);
  if (tid == 0) nonfinite[b] = bad_sh;  // complete: the scans above passed __syncthreads
  if (valid) {
    const i64 R = P - M;
    mask[b * P + tid] = masked ? 1 : 0;
    if (masked) {
      mask_idx[b * M + m_rank] = tid;
    } else {
      keep_idx[b * R + (tid - m_rank)] = tid;
    }
  }
}

template <typename T, int VEC>
void launch(ptr_t patch, i64 sb, i64 sp, ptr_t text, i64 text_sb, ptr_t noise, i64 nsb, i64 nsp,
            float tau, float eps, ptr_t keep_idx, ptr_t mask_idx, ptr_t mask, ptr_t nonfinite,
            i64 B, i64 P, i64 d, i64 M, ptr_t stream) {
  const size_t smem = sizeof(float) * static_cast<size_t>(d);
  topk_mask_kernel<T, VEC><<<static_cast<unsigned>(B), kThreads, smem, as_stream(stream)>>>(
      ptr<const T>(patch), sb, sp, ptr<const float>(text), text_sb, ptr<const float>(noise), nsb,
      nsp, tau, eps, ptr<std::int64_t>(keep_idx), ptr<std::int64_t>(mask_idx),
      ptr<std::uint8_t>(mask), ptr<std::int32_t>(nonfinite), static_cast<int>(P),
      static_cast<int>(d), static_cast<int>(M));
  cuda_check(cudaGetLastError(), "topk_mask_kernel launch");
}

template <typename T>
void launch_vec(int vec, ptr_t patch, i64 sb, i64 sp, ptr_t text, i64 text_sb, ptr_t noise,
                i64 nsb, i64 nsp, float tau, float eps, ptr_t keep_idx, ptr_t mask_idx,
                ptr_t mask, ptr_t nonfinite, i64 B, i64 P, i64 d, i64 M, ptr_t stream) {
  constexpr int kVec = static_cast<int>(16 / sizeof(T));
  if (vec == kVec) {
    if (d % kVec != 0 || patch % 16 != 0 || (sb * static_cast<i64>(sizeof(T))) % 16 != 0 ||
        (sp * static_cast<i64>(sizeof(T))) % 16 != 0)
      fail("topk_mask_cuda: vec=" + std::to_string(vec) + " needs 16-byte aligned rows");
    launch<T, kVec>(patch, sb, sp, text, text_sb, noise, nsb, nsp, tau, eps, keep_idx, mask_idx,
                    mask, nonfinite, B, P, d, M, stream);
  } else if (vec == 1) {
    launch<T, 1>(patch, sb, sp, text, text_sb, noise, nsb, nsp, tau, eps, keep_idx, mask_idx,
                 mask, nonfinite, B, P, d, M, stream);
  } else {
    fail("topk_mask_cuda: vec must be 1 or " + std::to_string(kVec) + ", got " +
         std::to_string(vec));
  }
}

}  // namespace

void topk_mask_cuda_launch(ptr_t patch, i64 sb, i64 sp, int dtype, ptr_t text, i64 text_sb,
                           ptr_t noise, i64 nsb, i64 nsp, float tau, float eps, ptr_t keep_idx,
                           ptr_t mask_idx, ptr_t mask, ptr_t nonfinite, i64 B, i64 P, i64 d,
                           i64 M, int vec, ptr_t stream) {
  cuda_require_device("topk_mask_cuda");
  if (B == 0) return;
  if (B > 2147483647LL) fail("topk_mask_cuda: B too large for one grid dimension");
  switch (dtype) {
    case kFloat32:
      launch_vec<float>(vec, patch, sb, sp, text, text_sb, noise, nsb, nsp, tau, eps, keep_idx,
                        mask_idx, mask, nonfinite, B, P, d, M, stream);
      break;
    case kFloat16:
      launch_vec<__half>(vec, patch, sb, sp, text, text_sb, noise, nsb, nsp, tau, eps, keep_idx,
                         mask_idx, mask, nonfinite, B, P, d, M, stream);
      break;
    case kBFloat16:
      launch_vec<__nv_bfloat16>(vec, patch, sb, sp, text, text_sb, noise, nsb, nsp, tau, eps,
                                keep_idx, mask_idx, mask, nonfinite, B, P, d, M, stream);
      break;
    default:
      fail(std::string("topk_mask_cuda: unsupported dtype ") + dtype_name(dtype));
  }
}

}  // namespace tm
}  // namespace semmim
