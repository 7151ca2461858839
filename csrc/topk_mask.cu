// CUDA kernel of the fused text–patch similarity top-k masking op (math in topk_mask.h).
// One 1024-thread block per row b:
//   1. text[b] -> shared memory (fp32) and its norm (warp 0, fixed order);
//   2. warp w scores patches 2w, 2w+1, 2w+64, 2w+65, ...: lanes stride over d in VEC-element
//      (16-byte) loads, fp32 dot and squared norm, butterfly warp reductions, lanes 0/1 store an
//      order-preserving uint32 key of each score in shared memory (patch[b] is read once);
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

// 512 threads (<= 64 registers each) -> two rows per SM at a time: B=256 rows fit in one wave on
// an H100 (132 SMs); each thread owns kKeysPerThread consecutive keys in the selection.
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kKeysPerThread = static_cast<int>(kTopkMaskMaxP) / kThreads;

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

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}

// 2^-e with e = clamp(floor(log2(maxabs)), 0, 126): exact, scales down only (as topk_mask.cpp).
__device__ __forceinline__ float pow2_scale(float maxabs) {
  const int E = static_cast<int>((__float_as_uint(maxabs) >> 23) & 0xFFu);
  const int e = min(max(E - 127, 0), 126);
  return __uint_as_float(static_cast<unsigned>(127 - e) << 23);
}

// The plain fp32 cosine overflowed (|x| >~ 1e19 squares to inf); NaN/inf inputs land here too.
__device__ __forceinline__ bool overflowed(float dot, float ss, float t_norm, float eps) {
  return !isfinite(dot) || !isfinite(ss) || !isfinite(t_norm) ||
         !isfinite(fmaxf(sqrtf(ss), eps) * t_norm);
}

// Rare path, one warp: the cosine of row and t with both pre-scaled by powers of two (exact;
// the EPS floors scale along), so finite inputs of any magnitude score correctly. Every lane
// returns the same value (lane 0's reductions are broadcast).
template <typename T>
__device__ __noinline__ float rescued_cosine(const T* row, const float* t, int d, float eps,
                                             int lane) {
  float ap = 0.0f, at = 0.0f;
  for (int k = lane; k < d; k += 32) {
    ap = fmaxf(ap, fabsf(to_f(row[k])));
    at = fmaxf(at, fabsf(t[k]));
  }
  const float sa = pow2_scale(warp_max(ap)), st = pow2_scale(warp_max(at));
  float dot = 0.0f, ss = 0.0f, tss = 0.0f;
  for (int k = lane; k < d; k += 32) {
    const float x = to_f(row[k]) * sa, y = t[k] * st;
    dot += x * y;
    ss += x * x;
    tss += y * y;
  }
  dot = warp_sum(dot);
  ss = warp_sum(ss);
  tss = warp_sum(tss);
  const float c = dot / (fmaxf(sqrtf(ss), eps * sa) * fmaxf(sqrtf(tss), eps * st));
  return __shfl_sync(0xFFFFFFFFu, c, 0);
}

// Order-preserving float -> uint32 (larger float -> larger key); -0.0 maps like +0.0.
__device__ __forceinline__ unsigned score_key(float s) {
  unsigned u = __float_as_uint(s);
  if ((u & 0x7FFFFFFFu) == 0u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Block-wide exclusive prefix sum of per-thread values in thread order. All threads must call it.
__device__ __forceinline__ int block_exclusive_sum(int v, int* warp_buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(0xFFFFFFFFu, incl, o);
    if (lane >= o) incl += n;
  }
  if (lane == 31) warp_buf[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int w = lane < kWarps ? warp_buf[lane] : 0;
    int wincl = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(0xFFFFFFFFu, wincl, o);
      if (lane >= o) wincl += n;
    }
    if (lane < kWarps) warp_buf[lane] = wincl - w;
  }
  __syncthreads();
  const int res = warp_buf[warp] + incl - v;
  __syncthreads();  // warp_buf is reused by the next call
  return res;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 2)
    topk_mask_kernel(const T* __restrict__ patch, i64 sb, i64 sp, const float* __restrict__ text,
                     i64 text_sb, const float* __restrict__ noise, i64 nsb, i64 nsp, float tau,
                     float eps, std::int64_t* __restrict__ keep_idx,
                     std::int64_t* __restrict__ mask_idx, std::uint8_t* __restrict__ mask,
                     std::int32_t* __restrict__ nonfinite, int P,
                     int d, int M) {
  // (d,) fp32 text row, stored "vector-transposed": element c*VEC + j lives at t_sh[j*nvec + c],
  // so the 32 lanes of a warp (consecutive c, same j) read 32 consecutive words: no bank conflicts
  extern __shared__ float t_sh[];
  __shared__ unsigned keys[kTopkMaskMaxP];
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

  // 2. one warp per pair of patches (two rows' loads in flight per lane hide latency when
  //    d / VEC is only a few vectors per lane); both rows use the same summation order
  const T* row0 = patch + b * sb;
  for (int p0 = 2 * warp; p0 < P; p0 += 2 * kWarps) {
    const int p1 = p0 + 1 < P ? p0 + 1 : p0;  // odd P: the last warp reads its row twice
    const T* ra = row0 + static_cast<i64>(p0) * sp;
    const T* rb = row0 + static_cast<i64>(p1) * sp;
    float dot_a = 0.0f, ss_a = 0.0f, dot_b = 0.0f, ss_b = 0.0f;
    if constexpr (VEC > 1) {
      using V = Vec<T, VEC>;
      const V* va = reinterpret_cast<const V*>(ra);
      const V* vb = reinterpret_cast<const V*>(rb);
#pragma unroll 2
      for (int c = lane; c < nvec; c += 32) {
        const V xa = va[c];
        const V xb = vb[c];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float tj = t_sh[j * nvec + c];
          const float a = to_f(xa.v[j]), bv = to_f(xb.v[j]);
          dot_a += a * tj;
          ss_a += a * a;
          dot_b += bv * tj;
          ss_b += bv * bv;
        }
      }
    } else {
#pragma unroll 4
      for (int k = lane; k < d; k += 32) {
        const float tk = t_sh[k];
        const float a = to_f(ra[k]), bv = to_f(rb[k]);
        dot_a += a * tk;
        ss_a += a * a;
        dot_b += bv * tk;
        ss_b += bv * bv;
      }
    }
    dot_a = warp_sum(dot_a);
    ss_a = warp_sum(ss_a);
    dot_b = warp_sum(dot_b);
    ss_b = warp_sum(ss_b);
    float cos_a = dot_a / (fmaxf(sqrtf(ss_a), eps) * t_norm);
    float cos_b = dot_b / (fmaxf(sqrtf(ss_b), eps) * t_norm);
    // lane 0 decides for the warp (butterfly sums can differ in the last bit between lanes)
    if (__shfl_sync(0xFFFFFFFFu, overflowed(dot_a, ss_a, t_norm, eps), 0))
      cos_a = rescued_cosine(ra, t, d, eps, lane);
    if (__shfl_sync(0xFFFFFFFFu, overflowed(dot_b, ss_b, t_norm, eps), 0))
      cos_b = rescued_cosine(rb, t, d, eps, lane);
    if (lane < 2 && (lane == 0 || p1 != p0)) {
      const int p = lane == 0 ? p0 : p1;
      float s = lane == 0 ? cos_a : cos_b;
      if (noise != nullptr) s = s / tau + noise[b * nsb + static_cast<i64>(p) * nsp];
      keys[p] = score_key(s);
      if (!isfinite(s)) atomicAdd(&bad_sh, 1);
    }
  }
  __syncthreads();

  // 3. T = the M-th largest key (largest T with #{key >= T} >= M); padding key 0 is never counted
  constexpr int KPT = kKeysPerThread;
  const int p_first = tid * KPT;  // this thread's keys: p_first .. p_first + KPT - 1
  unsigned key[KPT];
  bool valid[KPT];
#pragma unroll
  for (int i = 0; i < KPT; ++i) {
    valid[i] = p_first + i < P;
    key[i] = valid[i] ? keys[p_first + i] : 0u;
  }
  unsigned thr = 0u;
  for (int bit = 31; bit >= 0; --bit) {
    const unsigned cand = thr | (1u << bit);
    int count = 0;
#pragma unroll
    for (int i = 0; i < KPT; ++i) count += __syncthreads_count(valid[i] && key[i] >= cand);
    if (count >= M) thr = cand;
  }
  int n_gt = 0, my_eq = 0;
#pragma unroll
  for (int i = 0; i < KPT; ++i) {
    n_gt += __syncthreads_count(valid[i] && key[i] > thr);
    my_eq += (valid[i] && key[i] == thr) ? 1 : 0;
  }
  const int need = M - n_gt;  // ties at T: lowest indices first
  int eq_rank = block_exclusive_sum(my_eq, warp_buf);
  bool masked[KPT];
  int my_masked = 0;
#pragma unroll
  for (int i = 0; i < KPT; ++i) {
    const bool eq = valid[i] && key[i] == thr;
    masked[i] = (valid[i] && key[i] > thr) || (eq && eq_rank < need);
    eq_rank += eq ? 1 : 0;
    my_masked += masked[i] ? 1 : 0;
  }

  // 4. slots in index order: mask_idx slot = #masked before p, keep_idx slot = p - that
  int m_rank = block_exclusive_sum(my_masked, warp_buf);
  if (tid == 0) nonfinite[b] = bad_sh;  // complete: the scans above passed __syncthreads
  const i64 R = P - M;
#pragma unroll
  for (int i = 0; i < KPT; ++i) {
    const int p = p_first + i;
    if (!valid[i]) continue;
    mask[b * P + p] = masked[i] ? 1 : 0;
    if (masked[i]) {
      mask_idx[b * M + m_rank] = p;
      ++m_rank;
    } else {
      keep_idx[b * R + (p - m_rank)] = p;
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
