// Math of VDVAE's diagonal-Gaussian stochastic layers, shared by the CPU and CUDA kernels.
//
// The rate term of the ELBO is KL(q‖p) between the posterior q = N(mu_q, exp(logsigma_q)^2) and the
// prior p = N(mu_p, exp(logsigma_p)^2), per coordinate, as VDVAE's gaussian_analytical_kl writes it.
// The posterior sample is reparameterized, z = mu + t·exp(logsigma)·eps, with eps from the shared
// Philox stream (philox.h) at the element's logical row-major index, so z does not depend on the
// memory layout and backward passes regenerate eps instead of storing it.
//
// exp, and log and cos for Box-Muller, are written here as branch-free float polynomials:
// the libm calls are opaque to gcc's vectorizer without -ffast-math, and on the GPU they would become the
// less accurate intrinsics of --use_fast_math. Both backends thus compute the same eps as philox_normal
// to a few ulp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "philox.h"

namespace vdvae_fast {
namespace gaussian {

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

// Adding 1.5·2^23 rounds a float of magnitude below 2^22 to an integer held in the low mantissa bits,
// which gives the integer without a float-to-int conversion (undefined for NaN).
constexpr float kRoundShift = 12582912.0f;
// ln 2 split so that k·kLn2Hi is exact for |k| < 2^9.
constexpr float kLn2Hi = 0x1.62e400p-1f;
constexpr float kLn2Lo = 0x1.7f7d1cp-20f;

// e^x: x = k ln2 + r with |r| <= ln2/2, e^r by its degree-7 Taylor polynomial, times 2^k applied in two
// halves so that subnormal results and overflow to inf come out right. NaN propagates.
VF_HOST_DEVICE float exp_f(float x) {
  x = x > 89.0f ? 89.0f : x;      // e^89 is already inf in float
  x = x < -104.0f ? -104.0f : x;  // e^-104 already rounds to 0
  const float shifted = x * 1.44269504088896341f + kRoundShift;
  const float k = shifted - kRoundShift;
  const int32_t k_int = static_cast<int32_t>(float_bits(shifted) - float_bits(kRoundShift));
  const float r = (x - k * kLn2Hi) - k * kLn2Lo;
  const float p =
      1.0f +
      r * (1.0f +
           r * (0.5f + r * (1.0f / 6.0f +
                            r * (1.0f / 24.0f + r * (1.0f / 120.0f + r * (1.0f / 720.0f + r * (1.0f / 5040.0f)))))));
  const int32_t k_half = k_int / 2;
  const float scale_a = bits_float(static_cast<uint32_t>(k_half + 127) << 23);
  const float scale_b = bits_float(static_cast<uint32_t>(k_int - k_half + 127) << 23);
  return p * scale_a * scale_b;
}

// Box-Muller below works in float: in double it would fill half the SIMD lanes and cost 2.5x as much. Over
// all their inputs, log_unit is within 1 ulp of ln u and cos_angle within 1.5 ulp of cos x, which keeps eps
// within 4 ulp of the float64 Box-Muller of the same uniforms (tests/test_gaussian_ops.py), about as close as
// the reference's own float log and cos. The polynomials are truncated below 3e-9 relative error (0.05 ulp).

// f / d and sqrt rounded to nearest also under nvcc's --use_fast_math, which would approximate both.
VF_HOST_DEVICE float div_rn(float f, float d) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(f, d);
#else
  return f / d;
#endif
}

VF_HOST_DEVICE float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

// ln u for a positive normal float u (the uniform, in [1e-7, 1)): u = 2^e·m with m in [sqrt(1/2), sqrt(2)),
// ln m = ln(1 + f) = 2 atanh(s) with s = f / (2 + f), written f - s·(f - R(s²)) so that the exact f
// carries the result and the series only corrects it.
VF_HOST_DEVICE float log_unit(float u) {
  const uint32_t offset = float_bits(u) - 0x3f3504f3u;  // bits of sqrt(1/2)
  const int32_t e = static_cast<int32_t>(offset) >> 23;
  const float f = bits_float((offset & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
  const float s = div_rn(f, 2.0f + f);
  const float z = s * s;
  const float series = z * (2.0f / 3.0f + z * (2.0f / 5.0f + z * (2.0f / 7.0f + z * (2.0f / 9.0f))));
  const float k = static_cast<float>(e);
  return k * kLn2Hi + ((f - s * (f - series)) + k * kLn2Lo);
}

// cos x for a float angle 0 <= x <= 2 pi: x = q pi/2 + r with |r| <= pi/4 in three steps (q·kPio2Hi,
// q·kPio2Mid and x - q·kPio2Hi are exact), then the sine or cosine Taylor polynomial of r with the sign of
// quadrant q.
VF_HOST_DEVICE float cos_angle(float x) {
  constexpr float kPio2Hi = 0x1.92p+0f;
  constexpr float kPio2Mid = 0x1.fb544p-12f;
  constexpr float kPio2Lo = 0x1.0b4612p-34f;
  const float shifted = x * 0.636619772367581343f + kRoundShift;
  const uint32_t q_int = float_bits(shifted) - float_bits(kRoundShift);
  const float q = shifted - kRoundShift;
  const float r = ((x - q * kPio2Hi) - q * kPio2Mid) - q * kPio2Lo;
  const float r2 = r * r;
  const float sin_r =
      r + r * r2 * (-1.0f / 6.0f + r2 * (1.0f / 120.0f + r2 * (-1.0f / 5040.0f + r2 * (1.0f / 362880.0f))));
  const float cos_r =
      1.0f - r2 * (0.5f - r2 * (1.0f / 24.0f +
                                r2 * (-1.0f / 720.0f + r2 * (1.0f / 40320.0f + r2 * (-1.0f / 3628800.0f)))));
  // cos(r + q pi/2) cycles through cos r, -sin r, -cos r, sin r: chosen by a mask and signed by the sign bit,
  // as without AVX-512 gcc if-converts no select here (float or integer) and the loop would not vectorize.
  const uint32_t odd = 0u - (q_int & 1u);
  const uint32_t value = (float_bits(sin_r) & odd) | (float_bits(cos_r) & ~odd);
  return bits_float(value ^ (((q_int + 1u) & 2u) << 30));
}

// The opmath exponential: the polynomial for float, libm for double (gradcheck precision).
VF_HOST_DEVICE float exp_op(float x) { return exp_f(x); }
VF_HOST_DEVICE double exp_op(double x) { return ::exp(x); }

// philox_normal (tl.randn) with the vectorizable log and cos above: the same integer stream and the same
// float uniforms and angle, so eps agrees with vdvae_fast.philox.normal to a few ulp.
VF_HOST_DEVICE float gaussian_eps(uint64_t seed, uint32_t index) {
  const Philox4 r = philox(seed, index, 0u, 0u, 0u);
  // max(u1, 1e-7) on the bit patterns, which order like the values for non-negative floats: gcc
  // if-converts this integer max but not the float select.
  const uint32_t u1_bits = float_bits(uint_to_uniform(r.v0));
  const uint32_t floor_bits = float_bits(1.0e-7f);
  const float u1 = bits_float(u1_bits > floor_bits ? u1_bits : floor_bits);
  const float u2 = uint_to_uniform(r.v1);
  return sqrt_rn(-2.0f * log_unit(u1)) * cos_angle(6.283185307179586f * u2);
}

// Where a dense tensor keeps its elements: contiguous (memory offset = logical index) or 4-D
// channels_last with `channels` channels and `plane` = H·W pixels per channel. Each image (index along
// dim 0) is one contiguous block of `image_size` elements in both layouts.
struct DenseLayout {
  bool channels_last;
  uint32_t image_size;
  uint32_t channels;
  uint32_t plane;

  // Logical index of offset `within` of image `image`.
  VF_HOST_DEVICE uint32_t logical_index_in_image(uint32_t image, uint32_t within) const {
    if (!channels_last) return image * image_size + within;
    const uint32_t pixel = within / channels;
    const uint32_t channel = within - pixel * channels;
    return image * image_size + channel * plane + pixel;
  }

  VF_HOST_DEVICE uint32_t logical_index(uint32_t offset) const {
    if (!channels_last) return offset;
    const uint32_t image = offset / image_size;
    return logical_index_in_image(image, offset - image * image_size);
  }
};

// The layout of a dense tensor (an at::Tensor; a template so that this header needs no ATen): contiguous,
// or channels_last when it is not contiguous (the only other layout the ops pass in).
template <typename TensorT>
inline DenseLayout layout_of(const TensorT& t) {
  const auto image_size = static_cast<uint32_t>(t.size(0) == 0 ? 0 : t.numel() / t.size(0));
  if (t.is_contiguous()) return {false, image_size, 1u, 1u};
  return {true, image_size, static_cast<uint32_t>(t.size(1)), static_cast<uint32_t>(t.size(2) * t.size(3))};
}

// KL(q‖p) of one coordinate: -1/2 + logsigma_p - logsigma_q + (sigma_q² + (mu_q - mu_p)²) / (2 sigma_p²),
// in the order of the reference formula.
template <typename T>
VF_HOST_DEVICE T kl(T mu_q, T logsigma_q, T mu_p, T logsigma_p) {
  const T sigma_q = exp_op(logsigma_q);
  const T sigma_p = exp_op(logsigma_p);
  const T diff = mu_q - mu_p;
  return T(-0.5) + logsigma_p - logsigma_q + T(0.5) * (sigma_q * sigma_q + diff * diff) / (sigma_p * sigma_p);
}

template <typename T>
struct KlGrads {
  T mu_q, logsigma_q, mu_p, logsigma_p;
};

// grad·∂KL/∂(mu_q, logsigma_q, mu_p, logsigma_p):
// (mu_q - mu_p)/sigma_p², sigma_q²/sigma_p² - 1, -(mu_q - mu_p)/sigma_p², 1 - (sigma_q² + (mu_q - mu_p)²)/sigma_p².
template <typename T>
VF_HOST_DEVICE KlGrads<T> kl_grads(T grad, T mu_q, T logsigma_q, T mu_p, T logsigma_p) {
  const T sigma_q = exp_op(logsigma_q);
  const T sigma_p = exp_op(logsigma_p);
  const T var_q = sigma_q * sigma_q;
  const T diff = mu_q - mu_p;
  const T grad_over_var_p = grad / (sigma_p * sigma_p);
  const T grad_mu = grad_over_var_p * diff;
  return {grad_mu, grad_over_var_p * var_q - grad, -grad_mu, grad - grad_over_var_p * (var_q + diff * diff)};
}

// The reparameterized sample z = mu + (t·sigma)·eps, in the reference's order of operations.
template <typename T>
VF_HOST_DEVICE T sample(T mu, T logsigma, T temperature, float eps) {
  return mu + temperature * exp_op(logsigma) * static_cast<T>(eps);
}

// grad_z·∂z/∂logsigma = grad_z·eps·t·sigma (∂z/∂mu = 1).
template <typename T>
VF_HOST_DEVICE T sample_grad_logsigma(T grad_z, T logsigma, T temperature, float eps) {
  return grad_z * static_cast<T>(eps) * temperature * exp_op(logsigma);
}

// Aligned packet of N elements: one vector load or store on the GPU.
template <typename T, int N>
struct alignas(sizeof(T) * N) Packet {
  T v[N];
};

inline bool is_aligned(const void* pointer, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
}

#if !defined(__CUDACC__)
// CPU tiles. The loops below and the kernels' tile loops inline every call in their bodies (flatten):
// gcc's inliner may leave exp_f or philox out of line in a large translation unit, and a call inside a
// loop stops it from vectorizing.
#define VF_VECTOR_LOOP __attribute__((flatten))

// Logical indices of the `count` memory offsets from `offset`: one division, then runs along the channel
// dimension, which is innermost in memory.
inline void fill_logical_indices(uint32_t* __restrict__ index, uint32_t offset, int count, const DenseLayout& layout) {
  if (!layout.channels_last) {
    for (int k = 0; k < count; ++k) index[k] = offset + static_cast<uint32_t>(k);
    return;
  }
  const uint32_t channels = layout.channels, plane = layout.plane, image_size = layout.image_size;
  uint32_t image = offset / image_size;
  const uint32_t within = offset - image * image_size;
  uint32_t pixel = within / channels;
  uint32_t channel = within - pixel * channels;
  int k = 0;
  while (k < count) {
    const int run = static_cast<int>(channels - channel) < count - k ? static_cast<int>(channels - channel) : count - k;
    const uint32_t base = image * image_size + channel * plane + pixel;
    for (int c = 0; c < run; ++c) index[k + c] = base + static_cast<uint32_t>(c) * plane;
    k += run;
    channel = 0;
    if (++pixel == plane) {
      pixel = 0;
      ++image;
    }
  }
}

// eps for the `count` elements at memory offsets [offset, offset + count) (CPU tiles): indices first,
// then one Box-Muller loop that gcc vectorizes.
VF_VECTOR_LOOP inline void fill_eps(float* __restrict__ eps, uint32_t* __restrict__ index, uint32_t offset, int count,
                                    uint64_t seed, const DenseLayout& layout) {
  fill_logical_indices(index, offset, count, layout);
  for (int k = 0; k < count; ++k) eps[k] = gaussian_eps(seed, index[k]);
}

// CPU tiles of a kernel's tensors as opmath arrays: the tensor's own memory when it already holds opmath
// values, else a stack copy converted in a loop of its own (F16C converts half one element at a time, and
// a conversion inside the math loop would keep that loop from vectorizing).
template <typename scalar_t, typename opmath_t, int kSlots, int kTile>
struct Staging {
  static constexpr bool kDirect = std::is_same<scalar_t, opmath_t>::value;
  alignas(64) opmath_t buffer[kDirect ? 1 : kSlots][kTile];

  const opmath_t* load(const scalar_t* source, int slot, int count) {
    if constexpr (kDirect) {
      return source;
    } else {
      for (int k = 0; k < count; ++k) buffer[slot][k] = static_cast<opmath_t>(source[k]);
      return buffer[slot];
    }
  }

  // Where the math writes an output tile; store() then moves it to `target` if that is not the same memory.
  opmath_t* output(scalar_t* target, int slot) {
    if constexpr (kDirect) {
      return target;
    } else {
      return buffer[slot];
    }
  }

  void store(scalar_t* target, int slot, int count) const {
    if constexpr (!kDirect) {
      for (int k = 0; k < count; ++k) target[k] = static_cast<scalar_t>(buffer[slot][k]);
    }
  }
};

#endif  // !defined(__CUDACC__)

}  // namespace gaussian
}  // namespace vdvae_fast
