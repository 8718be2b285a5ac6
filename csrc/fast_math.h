// Float math shared by every kernel, on the host and on the GPU, and the one host/device macro.
//
// Two kinds of functions:
// - *_poly: accurate everywhere (within about 1 ulp; tanh 2.3), plain arithmetic and bit tricks with no
//   branches and no libm calls, the same code on the host and on the GPU. gcc vectorizes loops that call
//   them (libm calls are opaque to its vectorizer), and on the GPU nvcc's --use_fast_math cannot turn
//   them into the approximate intrinsics. NaN and +-inf are handled by selects.
// - fast_*: the same results as *_poly on the host; on the GPU the hardware MUFU instructions, for the
//   instruction-bound DMoL loss whose logs only need absolute accuracy. Their device errors are those
//   of the CUDA C++ Programming Guide's intrinsics table: __expf 2 + floor(1.173 |x|) ulp, __logf
//   2^-21.4 absolute on [0.5, 2] and 3 ulp elsewhere, __fdividef 2 ulp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define VF_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define VF_HOST_DEVICE inline __attribute__((always_inline))
#else
#define VF_HOST_DEVICE inline
#endif

namespace vdvae_fast {

VF_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

VF_HOST_DEVICE float bits_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

// a * b + c, fused where the target has FMA (the GPU; the host under -march=native); the Cody-Waite
// reductions below stay exact without it.
VF_HOST_DEVICE float mul_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#elif defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// f / d for a positive normal d: on the GPU a reciprocal refined by one Newton step, within 1 ulp, where
// __fdiv_rn would call a slow-path subroutine (and spill registers around the call) and --use_fast_math's
// division would be 2 ulp.
VF_HOST_DEVICE float div_normal(float f, float d) {
#if defined(__CUDA_ARCH__)
  const float r = __fdividef(1.0f, d);
  const float q = f * r;
  return fmaf(fmaf(-d, q, f), r, q);
#else
  return f / d;
#endif
}

// sqrt rounded to nearest, also under nvcc's --use_fast_math, which would approximate it.
VF_HOST_DEVICE float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

// Adding 1.5·2^23 rounds a float of magnitude below 2^22 to an integer held in the low mantissa bits,
// which gives the integer without a float-to-int conversion (undefined for NaN).
constexpr float kRoundShift = 12582912.0f;
// ln 2 split so that k·kLn2Hi is exact for |k| < 2^9.
constexpr float kLn2Hi = 0x1.62e400p-1f;
constexpr float kLn2Lo = 0x1.7f7d1cp-20f;
constexpr float kLog2e = 1.44269504088896341f;

// e^x: x = k ln2 + r with |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (truncation below 1e-8),
// times 2^k applied in two halves so that subnormal results and overflow to inf come out right.
// NaN passes both clamps and propagates.
VF_HOST_DEVICE float exp_poly(float x) {
  x = x > 89.0f ? 89.0f : x;      // e^89 is already inf in float
  x = x < -104.0f ? -104.0f : x;  // e^-104 already rounds to 0
  const float shifted = x * kLog2e + kRoundShift;
  const float k = shifted - kRoundShift;
  const int32_t k_int = static_cast<int32_t>(float_bits(shifted) - float_bits(kRoundShift));
  const float r = mul_add(k, -kLn2Lo, mul_add(k, -kLn2Hi, x));
  float p = 1.0f / 5040.0f;
  p = mul_add(p, r, 1.0f / 720.0f);
  p = mul_add(p, r, 1.0f / 120.0f);
  p = mul_add(p, r, 1.0f / 24.0f);
  p = mul_add(p, r, 1.0f / 6.0f);
  p = mul_add(p, r, 0.5f);
  p = mul_add(p, r, 1.0f);
  p = mul_add(p, r, 1.0f);
  const int32_t k_half = k_int / 2;
  const float scale_a = bits_float(static_cast<uint32_t>(k_half + 127) << 23);
  const float scale_b = bits_float(static_cast<uint32_t>(k_int - k_half + 127) << 23);
  return p * scale_a * scale_b;
}

// x = 2^e (1 + f) with 1 + f in [sqrt(1/2), sqrt(2)), for a positive normal x: the exponent and mantissa of
// x / sqrt(1/2) come from one integer subtraction on the bits.
struct LogArgument {
  float e, f;
};

VF_HOST_DEVICE LogArgument split_log_argument(float x) {
  constexpr uint32_t kSqrtHalfBits = 0x3f3504f3u;
  const uint32_t offset = float_bits(x) - kSqrtHalfBits;
  return {static_cast<float>(static_cast<int32_t>(offset) >> 23),
          bits_float((offset & 0x007fffffu) + kSqrtHalfBits) - 1.0f};
}

// The same for any positive x: subnormals are lifted by 2^23 first
VF_HOST_DEVICE LogArgument split_any_log_argument(float x) {
  const bool subnormal = x < 1.17549435e-38f;
  const LogArgument a = split_log_argument(subnormal ? x * 8388608.0f : x);
  return {a.e - (subnormal ? 23.0f : 0.0f), a.f};
}

// log(2^e (1 + f)) for f in [sqrt(1/2) - 1, sqrt(2) - 1): log(1 + f) = 2 atanh(s), s = f / (2 + f),
// written as f - (f^2/2 - s (f^2/2 + R)) so that the exact f carries the leading bits; the series
// R = sum 2 s^2j / (2j + 1) to j = 5 leaves < 1e-9.
VF_HOST_DEVICE float log_reduced(float e, float f) {
  const float s = div_normal(f, 2.0f + f);
  const float z = s * s;
  float series = 2.0f / 11.0f;
  series = mul_add(series, z, 2.0f / 9.0f);
  series = mul_add(series, z, 2.0f / 7.0f);
  series = mul_add(series, z, 2.0f / 5.0f);
  series = mul_add(series, z, 2.0f / 3.0f);
  const float half_f2 = 0.5f * f * f;
  const float log1p_f = f - (half_f2 - s * mul_add(series, z, half_f2));
  return mul_add(e, kLn2Hi, mul_add(e, kLn2Lo, log1p_f));
}

// log(x) from its value for a finite positive x: -inf at 0, NaN below 0 and for NaN, inf at inf
VF_HOST_DEVICE float log_special_cases(float x, float finite_positive) {
  const float special =
      x == 0.0f ? -std::numeric_limits<float>::infinity() : (x < 0.0f ? std::numeric_limits<float>::quiet_NaN() : x);
  return ((x > 0.0f) & (x < std::numeric_limits<float>::infinity())) ? finite_positive : special;
}

// ln u of a positive normal u (Box-Muller's uniform, Gumbel noise): no subnormals or special cases to select
VF_HOST_DEVICE float log_positive_poly(float u) {
  const LogArgument a = split_log_argument(u);
  return log_reduced(a.e, a.f);
}

VF_HOST_DEVICE float log_poly(float x) {
  const LogArgument a = split_any_log_argument(x);
  return log_special_cases(x, log_reduced(a.e, a.f));
}

// plain ? log(v) : log1p(v) with one logarithm. log1p takes v in [0, 1] (or NaN), which is all the
// callers pass: 1 + v = 2^e (1 + f) with f = v or (v - 1) / 2 formed without rounding 1 + v.
VF_HOST_DEVICE float log_or_log1p_poly(bool plain, float v) {
  const LogArgument a = split_any_log_argument(v);
  const bool wide = v > 0.41421356f;
  const float log_value = log_reduced(plain ? a.e : (wide ? 1.0f : 0.0f), plain ? a.f : (wide ? 0.5f * (v - 1.0f) : v));
  return plain ? log_special_cases(v, log_value) : log_value;
}

VF_HOST_DEVICE float tanh_poly(float x) {
  const float a = x < 0.0f ? -x : x;
  // |x| >= 0.35: (1 - e) / (1 + e) with e = exp(-2|x|) <= 0.5 loses no leading bits
  const float e = exp_poly(-2.0f * a);
  const float wide = (1.0f - e) / (1.0f + e);
  // |x| < 0.35: Taylor series of tanh(x) / x in z = x^2 to z^6 (truncation below 1e-9)
  const float z = a * a;
  float p = 21844.0f / 6081075.0f;
  p = mul_add(p, z, -1382.0f / 155925.0f);
  p = mul_add(p, z, 62.0f / 2835.0f);
  p = mul_add(p, z, -17.0f / 315.0f);
  p = mul_add(p, z, 2.0f / 15.0f);
  p = mul_add(p, z, -1.0f / 3.0f);
  const float narrow = mul_add(a * z, p, a);
  const float t = a < 0.35f ? narrow : wide;
  return x < 0.0f ? -t : t;
}

// cos x (sine = false) or sin x (sine = true) for a float angle 0 <= x <= 2 pi, Box-Muller's two branches:
// x = q pi/2 + r with |r| <= pi/4 in three steps (q·kPio2Hi, q·kPio2Mid and x - q·kPio2Hi are exact), then
// the sine or cosine Taylor polynomial of r with the sign of quadrant q, where sin x = cos(r + (q - 1) pi/2).
// Within 1.5 ulp of cos x and sin x over that range.
VF_HOST_DEVICE float cos_or_sin_angle_poly(float x, bool sine) {
  constexpr float kPio2Hi = 0x1.92p+0f;
  constexpr float kPio2Mid = 0x1.fb544p-12f;
  constexpr float kPio2Lo = 0x1.0b4612p-34f;
  const float shifted = x * 0.636619772367581343f + kRoundShift;
  const uint32_t q_int = float_bits(shifted) - float_bits(kRoundShift) - static_cast<uint32_t>(sine);
  const float q = shifted - kRoundShift;
  const float r = ((x - q * kPio2Hi) - q * kPio2Mid) - q * kPio2Lo;
  const float r2 = r * r;
  const float sin_r =
      r + r * r2 * (-1.0f / 6.0f + r2 * (1.0f / 120.0f + r2 * (-1.0f / 5040.0f + r2 * (1.0f / 362880.0f))));
  const float cos_r =
      1.0f -
      r2 * (0.5f - r2 * (1.0f / 24.0f + r2 * (-1.0f / 720.0f + r2 * (1.0f / 40320.0f + r2 * (-1.0f / 3628800.0f)))));
  // cos(r + q pi/2) cycles through cos r, -sin r, -cos r, sin r: chosen by a mask and signed by the sign bit,
  // as without AVX-512 gcc if-converts no select here (float or integer) and the loop would not vectorize.
  const uint32_t odd = 0u - (q_int & 1u);
  const uint32_t value = (float_bits(sin_r) & odd) | (float_bits(cos_r) & ~odd);
  return bits_float(value ^ (((q_int + 1u) & 2u) << 30));
}

// ----------------------------------------------------------------------------------------------
// fast_*: *_poly on the host, MUFU on the GPU (errors in the header comment). Double goes to libm
// (the CPU kernels' float64, for gradcheck; no GPU kernel is built for it).
// ----------------------------------------------------------------------------------------------

#if defined(__CUDA_ARCH__)
// 2^x by one MUFU.EX2 (ex2.approx.ftz, 2 ulp), whatever the compiler flags
__device__ __forceinline__ float exp2_mufu(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#endif

VF_HOST_DEVICE float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return exp2_mufu(x * kLog2e);  // what __expf computes, with its error bound
#else
  return exp_poly(x);
#endif
}

VF_HOST_DEVICE double fast_exp(double x) { return std::exp(x); }

VF_HOST_DEVICE float fast_log(float x) {
#if defined(__CUDA_ARCH__)
  return __logf(x);
#else
  return log_poly(x);
#endif
}

VF_HOST_DEVICE double fast_log(double x) { return std::log(x); }

// 1 / d
VF_HOST_DEVICE float fast_reciprocal(float d) {
#if defined(__CUDA_ARCH__)
  return __fdividef(1.0f, d);
#else
  return 1.0f / d;
#endif
}

VF_HOST_DEVICE double fast_reciprocal(double d) { return 1.0 / d; }

// tanh. On the GPU 1 - 2 / (1 + e^2x) with MUFU.EX2 and __fdividef: an absolute error below 1e-6 from
// their bounds (a tiny x loses its relative accuracy, which the coupled means x0 tanh(c) never need), in
// 5 instructions where tanh_poly takes about 25. tanhf is not used: under --use_fast_math nvcc compiles
// it to the single MUFU.TANH instruction (seen in the SASS), whose error the guide does not bound.
VF_HOST_DEVICE float fast_tanh(float x) {
#if defined(__CUDA_ARCH__)
  return 1.0f - __fdividef(2.0f, 1.0f + exp2_mufu(x * (2.0f * kLog2e)));
#else
  return tanh_poly(x);
#endif
}

VF_HOST_DEVICE double fast_tanh(double x) { return std::tanh(x); }

}  // namespace vdvae_fast
