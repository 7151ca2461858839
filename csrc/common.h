// Shared declarations for semmim._C: dtype codes, host-side half/bfloat16 conversion, errors.
// The module never sees torch: Python passes data pointers (as integers), sizes, strides in
// elements, a dtype code and, for CUDA, the raw stream handle.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace semmim {

// Same numbering as kernels/_common.py DTYPE_CODE.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt32 = 3, kInt64 = 4 };

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    case kInt32: return "int32";
    case kInt64: return "int64";
    default: return "unknown";
  }
}

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument(msg); }

template <typename T>
inline T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

// ---- host-side 16-bit float storage types (bit patterns; arithmetic happens in float) ----
struct half_t { std::uint16_t bits; };
struct bf16_t { std::uint16_t bits; };

inline float to_float(float v) { return v; }

inline float half_bits_to_float(std::uint16_t bits) {
  const std::uint32_t sign = (bits & 0x8000u) << 16;
  std::uint32_t exp = (bits >> 10) & 0x1Fu;
  std::uint32_t man = bits & 0x3FFu;
  std::uint32_t out;
  if (exp == 0) {
    if (man == 0) {
      out = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) {
        man <<= 1;
        --exp;
      }
      man &= 0x3FFu;
      out = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 0x1F) {
    out = sign | 0x7F800000u | (man << 13);
  } else {
    out = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}

// All 65536 half values as floats (256 KiB, built once): a load instead of branches per element.
inline const float* half_table() {
  static const float* table = [] {
    static float t[65536];
    for (std::uint32_t i = 0; i < 65536; ++i) t[i] = half_bits_to_float(static_cast<std::uint16_t>(i));
    return t;
  }();
  return table;
}

inline float to_float(half_t h) { return half_table()[h.bits]; }

inline float to_float(bf16_t b) {
  const std::uint32_t u = static_cast<std::uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }

// Round to nearest even, as torch does (c10::Half / c10::BFloat16).
template <> inline bf16_t from_float<bf16_t>(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x7FFFFFu)) return bf16_t{0x7FC0};  // NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return bf16_t{static_cast<std::uint16_t>(u >> 16)};
}

template <> inline half_t from_float<half_t>(float v) {
  std::uint32_t x;
  std::memcpy(&x, &v, 4);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7FFFFFFFu;
  if (x >= 0x7F800000u) return half_t{static_cast<std::uint16_t>(sign | (x > 0x7F800000u ? 0x7E00u : 0x7C00u))};
  if (x >= 0x477FF000u) return half_t{static_cast<std::uint16_t>(sign | 0x7C00u)};  // overflow -> inf
  if (x < 0x38800000u) {  // subnormal or zero in half
    if (x < 0x33000000u) return half_t{static_cast<std::uint16_t>(sign)};
    // value = m * 2^(e-150); in units of the half subnormal step 2^-24 that is m >> (126 - e)
    const std::uint32_t e = x >> 23;
    const std::uint32_t m = (x & 0x7FFFFFu) | 0x800000u;
    const std::uint32_t shift = 126 - e;
    std::uint32_t res = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1);
    const std::uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (res & 1u))) ++res;
    return half_t{static_cast<std::uint16_t>(sign | res)};
  }
  std::uint32_t r = x - 0x38000000u;  // rebias exponent 127 -> 15
  const std::uint32_t rem = r & 0x1FFFu;
  r >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return half_t{static_cast<std::uint16_t>(sign | r)};
}

}  // namespace semmim
