// Math of VDVAE's diagonal-Gaussian stochastic layers, shared by the CPU and CUDA kernels.
//
// The rate term of the ELBO is KL(q‖p) between the posterior q = N(mu_q, exp(logsigma_q)^2) and the
// prior p = N(mu_p, exp(logsigma_p)^2), per coordinate, as VDVAE's gaussian_analytical_kl writes it.
// The posterior sample is reparameterized, z = mu + t·exp(logsigma)·eps, with eps from the shared
// Philox stream (philox.h) at the element's logical row-major index, so z does not depend on the
// memory layout and backward passes regenerate eps instead of storing it.
//
// exp, and log and cos for Box-Muller, are fast_math.h's accurate polynomials on the host and the GPU:
// libm calls are opaque to gcc's vectorizer without -ffast-math, and on the GPU they would become the
// less accurate intrinsics of --use_fast_math. Both backends thus compute the same eps to a few ulp.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "fast_math.h"
#include "philox.h"

namespace vdvae_fast {
namespace gaussian {

// The opmath exponential: the polynomial for float, libm for double (gradcheck precision).
VF_HOST_DEVICE float exp_op(float x) { return exp_poly(x); }
VF_HOST_DEVICE double exp_op(double x) { return std::exp(x); }

// One Box-Muller branch of a Philox word pair, in float (in double it would fill half the SIMD lanes and cost
// 2.5x as much): sqrt(-2 ln u1) times cos (sine = false) or sin (sine = true) of 2 pi u2. log_positive_poly is
// within 1 ulp of ln u and cos_or_sin_angle_poly within 1.5 ulp, which keeps eps within 4 ulp of the float64
// Box-Muller of the same uniforms (tests/test_gaussian_ops.py), about as close as the reference's float math.
VF_HOST_DEVICE float box_muller(uint32_t radius_word, uint32_t angle_word, bool sine) {
  // max(u1, 1e-7) on the bit patterns, which order like the values for non-negative floats: gcc
  // if-converts this integer max but not the float select.
  const uint32_t u1_bits = float_bits(uint_to_uniform(radius_word));
  const uint32_t floor_bits = float_bits(1.0e-7f);
  const float u1 = bits_float(u1_bits > floor_bits ? u1_bits : floor_bits);
  const float u2 = uint_to_uniform(angle_word);
  return sqrt_rn(-2.0f * log_positive_poly(u1)) * cos_or_sin_angle_poly(6.283185307179586f * u2, sine);
}

// eps of logical element `index`: tl.randn4x(seed, index / 4)[index % 4], lane k of the four normals of
// counter (index / 4, 0, 0, 0): lanes 0, 1 take words (out0, out1), lanes 2, 3 words (out2, out3); even
// lanes the cosine, odd lanes the sine branch. Kernels that draw a whole group at once use box_muller4.
VF_HOST_DEVICE float gaussian_eps(uint64_t seed, uint32_t index) {
  const Philox4 r = philox(seed, index >> 2, 0u, 0u, 0u);
  const bool high_pair = (index & 2u) != 0u;
  return box_muller(high_pair ? r.v2 : r.v0, high_pair ? r.v3 : r.v1, (index & 1u) != 0u);
}

// The four eps of group `group` (logical elements 4·group to 4·group + 3) from one Philox call: what
// gaussian_eps gives each of them, with the call, the logarithms and the square roots shared.
VF_HOST_DEVICE void group_eps(float* eps, uint64_t seed, uint32_t group) {
  const Philox4 r = philox(seed, group, 0u, 0u, 0u);
  eps[0] = box_muller(r.v0, r.v1, false);
  eps[1] = box_muller(r.v0, r.v1, true);
  eps[2] = box_muller(r.v2, r.v3, false);
  eps[3] = box_muller(r.v2, r.v3, true);
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

// eps of the kVec elements of a GPU packet: `first` is the logical index of its first element when the
// tensor is contiguous, `logical(v)` that of element v in either layout. Packets of whole groups of four
// (kVec a multiple of 4, contiguous, so `first` is a multiple of 4) take one Philox call per group.
template <int kVec, typename Logical>
VF_HOST_DEVICE void packet_eps(float (&eps)[kVec], uint64_t seed, const DenseLayout& layout, uint32_t first,
                               Logical logical) {
  if constexpr (kVec % 4 == 0) {
    if (!layout.channels_last) {
#pragma unroll
      for (int g = 0; g < kVec / 4; ++g) group_eps(eps + 4 * g, seed, (first >> 2) + static_cast<uint32_t>(g));
      return;
    }
  }
#pragma unroll
  for (int v = 0; v < kVec; ++v) eps[v] = gaussian_eps(seed, logical(v));
}

inline bool is_aligned(const void* pointer, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
}

#if !defined(__CUDACC__)
// CPU tiles. The loops below and the kernels' tile loops inline every call in their bodies (flatten):
// gcc's inliner may leave exp_poly or philox out of line in a large translation unit, and a call inside a
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

// eps for the `count` elements at memory offsets [offset, offset + count) (CPU tiles). Where memory order is
// logical order (contiguous), whole groups of four take one Philox call each, and only a ragged head and
// tail are drawn one element (and one call) at a time; channels_last tiles go element by element through
// their logical indices. Both paths compute every element with the same functions, hence the same bits.
VF_VECTOR_LOOP inline void fill_eps(float* __restrict__ eps, uint32_t* __restrict__ index, uint32_t offset, int count,
                                    uint64_t seed, const DenseLayout& layout) {
  if (layout.channels_last) {
    fill_logical_indices(index, offset, count, layout);
    for (int k = 0; k < count; ++k) eps[k] = gaussian_eps(seed, index[k]);
    return;
  }
  const int head = static_cast<int>((4u - (offset & 3u)) & 3u) < count ? static_cast<int>((4u - (offset & 3u)) & 3u)
                                                                       : count;
  for (int k = 0; k < head; ++k) eps[k] = gaussian_eps(seed, offset + static_cast<uint32_t>(k));
  const uint32_t first_group = (offset + static_cast<uint32_t>(head)) >> 2;
  const int groups = (count - head) >> 2;
  float* __restrict__ body = eps + head;
  for (int g = 0; g < groups; ++g) group_eps(body + 4 * g, seed, first_group + static_cast<uint32_t>(g));
  for (int k = head + 4 * groups; k < count; ++k) eps[k] = gaussian_eps(seed, offset + static_cast<uint32_t>(k));
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
