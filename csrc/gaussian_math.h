// Math of VDVAE's diagonal-Gaussian stochastic layers, shared by the CPU and CUDA kernels.
//
// The rate term of the ELBO is KL(q‖p) between the posterior q = N(mu_q, sigma_q^2) and the prior
// p = N(mu_p, sigma_p^2), per coordinate, as VDVAE's gaussian_analytical_kl writes it, with the sigmas and
// the posterior formed from the network's outputs by one of the parametrizations below.
// The posterior sample is reparameterized, z = mu + t·sigma·eps, with eps from the shared
// Philox stream (philox.h) at the element's logical row-major index, so z does not depend on the
// memory layout and backward passes regenerate eps instead of storing it.
//
// exp, and log and cos for Box-Muller, are fast_math.h's accurate polynomials on the host and the GPU:
// libm calls are opaque to gcc's vectorizer without -ffast-math, and on the GPU they would become the
// less accurate intrinsics of --use_fast_math. Both backends thus compute the same eps to a few ulp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

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
// gaussian_eps gives each of them, with the call, the logarithms and the square roots shared. Four
// references, as the group's elements are consecutive in memory (contiguous) or C apart (pixel quads).
VF_HOST_DEVICE void group_eps(float& eps0, float& eps1, float& eps2, float& eps3, uint64_t seed, uint32_t group) {
  const Philox4 r = philox(seed, group, 0u, 0u, 0u);
  eps0 = box_muller(r.v0, r.v1, false);
  eps1 = box_muller(r.v0, r.v1, true);
  eps2 = box_muller(r.v2, r.v3, false);
  eps3 = box_muller(r.v2, r.v3, true);
}

// Where a dense tensor keeps its elements: contiguous (memory offset = logical index) or 4-D
// channels_last with `channels` channels and `plane` = H·W pixels per channel. Each image (index along
// dim 0) is one contiguous block of `image_size` elements in both layouts. `pixel_quads`: a non-empty
// channels_last tensor with W % 4 == 0, whose pixels (h, 4k..4k+3) of an image, 4·C consecutive elements of
// memory, hold C whole groups of four (one per channel, lane j at pixel 4k + j), which kernels draw with one
// Philox call each.
struct DenseLayout {
  bool channels_last;
  bool pixel_quads;
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

  // The group of channel 0 of the pixel quad whose first element is at memory offset `offset` (pixel_quads):
  // logical index i = image·image_size + h·W + 4k, a multiple of 4; channel c's group is plane / 4 further per c.
  VF_HOST_DEVICE uint32_t quad_first_group(uint32_t offset) const {
    const uint32_t pixel = offset / channels;  // image·plane + h·W + 4k
    const uint32_t image = pixel / plane;
    return (image * image_size + (pixel - image * plane)) >> 2;
  }
};

// The layout of a dense tensor (an at::Tensor; a template so that this header needs no ATen): contiguous,
// or channels_last when it is not contiguous (the only other layout the ops pass in).
template <typename TensorT>
inline DenseLayout layout_of(const TensorT& t) {
  const auto image_size = static_cast<uint32_t>(t.size(0) == 0 ? 0 : t.numel() / t.size(0));
  if (t.is_contiguous()) return {false, false, image_size, 1u, 1u};
  return {true, t.numel() > 0 && t.size(3) % 4 == 0, image_size, static_cast<uint32_t>(t.size(1)),
          static_cast<uint32_t>(t.size(2) * t.size(3))};
}

// ----------------------------------------------------------------------------------------------
// Parametrizations (reference.SCALES, POSTERIORS, KL_ESTIMATORS; the codes are their indices)
//
// Every op reads four inputs (a, b, mu_p, raw_p) and first forms the canonical Gaussians (mu_q, sigma_q,
// log sigma_q, mu_p, sigma_p, log sigma_p). sigma = exp(log sigma) in every parametrization, so each output is
// a function of (mu_q, log sigma_q, mu_p, log sigma_p) alone: its gradient w.r.t. these four (KlGrads, the
// log sigma entries total, through sigma as well) is written once per output, and one vector-Jacobian product
// per posterior form (input_grads) carries it back to (a, b, mu_p, raw_p). With VDVAE's parametrization (exp,
// direct) that product multiplies by 1 and adds nothing: the arithmetic, and the bits, of the plain formulas.
// ----------------------------------------------------------------------------------------------

// sigma = f(raw): VDVAE's exp, or Efficient-VDVAE's gradient smoothing
// softplus_beta(raw) = log(1 + e^(beta raw)) / beta.
enum class Scale : int { kExp = 0, kSoftplus = 1 };
// (a, b) is (mu_q, raw sigma_q), NVAE's residual (delta mu, raw delta sigma), or the Ladder VAE's bottom-up
// Gaussian that precision weighting merges with the prior.
enum class Posterior : int { kDirect = 0, kResidual = 1, kPrecisionWeighted = 2 };
// sample_and_kl's per-image sum: the analytic KL, or log q(z) - log p(z) at the drawn z.
enum class KlEstimator : int { kAnalytic = 0, kSampled = 1 };

// One parametrization as a type, so that kernels are instantiated per parametrization and the default's loop
// holds none of the others' code.
template <Scale S, Posterior P = Posterior::kDirect, KlEstimator E = KlEstimator::kAnalytic>
struct Form {
  static constexpr Scale scale = S;
  static constexpr Posterior posterior = P;
  static constexpr KlEstimator estimator = E;
};

// Below this beta·raw = t, log softplus(t) is taken as t (reference.SOFTPLUS_LOG_LINEAR_BELOW), within e^t / 2 of
// it, so that log sigma stays finite after softplus underflows to 0.
constexpr double kSoftplusLogLinearBelow = -20.0;

// The softplus scale's constants in the math dtype: beta, and log beta (taken once, on the host).
template <typename T>
struct ScaleConstants {
  T beta, log_beta;

  static ScaleConstants of(double beta) { return {static_cast<T>(beta), static_cast<T>(std::log(beta))}; }
};

// log1p in the opmath dtype, for v in [0, 1]: fast_math.h's polynomial for float, libm for double.
VF_HOST_DEVICE float log1p_op(float v) { return log_or_log1p_poly(false, v); }
VF_HOST_DEVICE double log1p_op(double v) { return std::log1p(v); }

// log of a softplus value where it is used (beta·raw >= -20: positive and normal), +inf and NaN passing through.
// The polynomial, not log_poly, and the selects below on bits: gcc moves an expensive value that only one arm of
// a float select uses into a branch, and a loop with a branch does not vectorize.
VF_HOST_DEVICE float select(bool take_first, float first, float second) {
  const uint32_t mask = 0u - static_cast<uint32_t>(take_first);
  return bits_float((float_bits(first) & mask) | (float_bits(second) & ~mask));
}
VF_HOST_DEVICE double select(bool take_first, double first, double second) { return take_first ? first : second; }
VF_HOST_DEVICE float log_softplus(float softplus) {
  return select(softplus < std::numeric_limits<float>::infinity(), log_positive_poly(softplus), softplus);
}
VF_HOST_DEVICE double log_softplus(double softplus) { return std::log(softplus); }

// sigma = f(raw), log sigma, and d log sigma / d raw.
template <typename T>
struct Scaled {
  T sigma, log_sigma, dlog;
};

// softplus(t) = max(t, 0) + log1p(e^-|t|) (torch's t for t > 20 to the rounding); d softplus/dt = sigmoid(t)
// from the same e^-|t|. d log sigma/d raw = beta sigmoid(t) / softplus(t), and beta on the linear branch.
template <Scale S, typename T>
VF_HOST_DEVICE Scaled<T> scaled(T raw, const ScaleConstants<T>& k) {
  if constexpr (S == Scale::kExp) {
    return {exp_op(raw), raw, T(1)};
  } else {
    const T t = k.beta * raw;
    const T e = exp_op(t < T(0) ? t : -t);
    const T softplus = (t > T(0) ? t : T(0)) + log1p_op(e);
    const T inv = T(1) / (T(1) + e);
    const T sigmoid = t < T(0) ? e * inv : inv;
    const bool linear = t < T(kSoftplusLogLinearBelow);
    return {softplus / k.beta, select(linear, t, log_softplus(softplus)) - k.log_beta,
            linear ? k.beta : k.beta * sigmoid / softplus};
  }
}

// The canonical Gaussians of one element and what the input VJP needs of the posterior form.
template <typename T>
struct Gaussians {
  T mu_q, sigma_q, log_sigma_q, mu_p, sigma_p, log_sigma_p;
  T dlog_b, dlog_p;              // d log sigma / d raw of b and of raw_p
  T weight_b, weight_p, spread;  // precision weighting: mu_q = w_b a + w_p mu_p; spread = 2 w_b w_p (a - mu_p)
};

template <typename F, typename T>
VF_HOST_DEVICE Gaussians<T> gaussians(T a, T b, T mu_p, T raw_p, const ScaleConstants<T>& k) {
  const Scaled<T> s = scaled<F::scale>(b, k), p = scaled<F::scale>(raw_p, k);
  Gaussians<T> g{};
  g.mu_p = mu_p;
  g.sigma_p = p.sigma;
  g.log_sigma_p = p.log_sigma;
  g.dlog_b = s.dlog;
  g.dlog_p = p.dlog;
  if constexpr (F::posterior == Posterior::kDirect) {
    g.mu_q = a;
    g.sigma_q = s.sigma;
    g.log_sigma_q = s.log_sigma;
  } else if constexpr (F::posterior == Posterior::kResidual) {
    g.mu_q = mu_p + a;
    g.sigma_q = p.sigma * s.sigma;
    g.log_sigma_q = p.log_sigma + s.log_sigma;
  } else {
    // 1/sigma_q^2 = 1/s^2 + 1/sigma_p^2 (Ladder VAE eq. 21) in log space, where no variance can underflow or
    // overflow: with d = log s - log sigma_p and r = e^(-2|d|) the smaller variance over the larger,
    // log sigma_q = min(log s, log sigma_p) - log1p(r)/2, and the weights are 1/(1 + r) and r/(1 + r).
    const T d = s.log_sigma - p.log_sigma;
    const bool bottom_up_sharper = d < T(0);
    const T r = exp_op(T(-2) * (bottom_up_sharper ? -d : d));
    const T inv = T(1) / (T(1) + r);
    g.weight_b = bottom_up_sharper ? inv : r * inv;
    g.weight_p = bottom_up_sharper ? r * inv : inv;
    g.mu_q = g.weight_b * a + g.weight_p * mu_p;
    g.log_sigma_q = (bottom_up_sharper ? s.log_sigma : p.log_sigma) - T(0.5) * log1p_op(r);
    g.sigma_q = exp_op(g.log_sigma_q);
    g.spread = T(2) * g.weight_b * g.weight_p * (a - mu_p);
  }
  return g;
}

// A gradient w.r.t. (mu_q, log sigma_q, mu_p, log sigma_p), log sigma entries total (through sigma too).
template <typename T>
struct KlGrads {
  T mu_q, log_sigma_q, mu_p, log_sigma_p;
};

// A gradient w.r.t. the ops' four inputs.
template <typename T>
struct InputGrads {
  T a, b, mu_p, raw_p;
};

// The posterior form's vector-Jacobian product: a canonical gradient back to (a, b, mu_p, raw_p).
// residual: mu_q = mu_p + a, log sigma_q = log sigma_p + log s. precision weighting: d mu_q/d a = w_b,
// d mu_q/d mu_p = w_p, d mu_q/d log s = -spread = -d mu_q/d log sigma_p, d log sigma_q/d log s = w_b and
// d log sigma_q/d log sigma_p = w_p.
template <typename F, typename T>
VF_HOST_DEVICE InputGrads<T> input_grads(const KlGrads<T>& c, const Gaussians<T>& g) {
  if constexpr (F::posterior == Posterior::kDirect) {
    return {c.mu_q, c.log_sigma_q * g.dlog_b, c.mu_p, c.log_sigma_p * g.dlog_p};
  } else if constexpr (F::posterior == Posterior::kResidual) {
    return {c.mu_q, c.log_sigma_q * g.dlog_b, c.mu_p + c.mu_q, (c.log_sigma_p + c.log_sigma_q) * g.dlog_p};
  } else {
    return {c.mu_q * g.weight_b, (c.log_sigma_q * g.weight_b - c.mu_q * g.spread) * g.dlog_b,
            c.mu_p + c.mu_q * g.weight_p, (c.log_sigma_p + c.log_sigma_q * g.weight_p + c.mu_q * g.spread) * g.dlog_p};
  }
}

// KL(q‖p) of one coordinate: -1/2 + log sigma_p - log sigma_q + (sigma_q² + (mu_q - mu_p)²) / (2 sigma_p²).
// The direct posterior keeps the reference formula's order of operations (VDVAE's bits); the combined ones take
// the ratios sigma_q/sigma_p and (mu_q - mu_p)/sigma_p instead, as their sigma_q = sigma_p·f(b) makes sigma_q²
// overflow in float (log sigma_p = log f(b) = 30) where the ratio, the KL's gradient and the reference's stay finite.
template <typename F, typename T>
VF_HOST_DEVICE T analytic_kl(const Gaussians<T>& g) {
  const T diff = g.mu_q - g.mu_p;
  if constexpr (F::posterior == Posterior::kDirect) {
    return T(-0.5) + g.log_sigma_p - g.log_sigma_q +
           T(0.5) * (g.sigma_q * g.sigma_q + diff * diff) / (g.sigma_p * g.sigma_p);
  } else {
    const T ratio = g.sigma_q / g.sigma_p, shift = diff / g.sigma_p;
    return T(-0.5) + g.log_sigma_p - g.log_sigma_q + T(0.5) * (ratio * ratio + shift * shift);
  }
}

// grad·∂KL/∂(mu_q, log sigma_q, mu_p, log sigma_p):
// (mu_q - mu_p)/sigma_p², sigma_q²/sigma_p² - 1, -(mu_q - mu_p)/sigma_p², 1 - (sigma_q² + (mu_q - mu_p)²)/sigma_p².
template <typename F, typename T>
VF_HOST_DEVICE KlGrads<T> analytic_kl_grads(T grad, const Gaussians<T>& g) {
  const T diff = g.mu_q - g.mu_p;
  if constexpr (F::posterior == Posterior::kDirect) {
    const T var_q = g.sigma_q * g.sigma_q;
    const T grad_over_var_p = grad / (g.sigma_p * g.sigma_p);
    const T grad_mu = grad_over_var_p * diff;
    return {grad_mu, grad_over_var_p * var_q - grad, -grad_mu, grad - grad_over_var_p * (var_q + diff * diff)};
  } else {
    const T ratio = g.sigma_q / g.sigma_p, shift = diff / g.sigma_p;
    const T grad_mu = grad * shift / g.sigma_p;
    const T grad_ratio2 = grad * (ratio * ratio);
    return {grad_mu, grad_ratio2 - grad, -grad_mu, grad - grad_ratio2 - grad * (shift * shift)};
  }
}

// The posterior sample z = mu_q + sigma_q·eps.
template <typename T>
VF_HOST_DEVICE T posterior_sample(const Gaussians<T>& g, float eps) {
  return g.mu_q + g.sigma_q * static_cast<T>(eps);
}

// log q(z) - log p(z) at z = mu_q + sigma_q·eps: log sigma_p - log sigma_q + ((z - mu_p)/sigma_p)²/2 - eps²/2.
template <typename T>
VF_HOST_DEVICE T sampled_kl(const Gaussians<T>& g, T z, float eps) {
  const T u = (z - g.mu_p) / g.sigma_p;
  const T e = static_cast<T>(eps);
  return g.log_sigma_p - g.log_sigma_q + T(0.5) * u * u - T(0.5) * e * e;
}

template <typename T>
struct SampleAndKl {
  T z, kl;
};

template <typename F, typename T>
VF_HOST_DEVICE SampleAndKl<T> sample_and_kl(T a, T b, T mu_p, T raw_p, float eps, const ScaleConstants<T>& k) {
  const Gaussians<T> g = gaussians<F>(a, b, mu_p, raw_p, k);
  const T z = posterior_sample(g, eps);
  if constexpr (F::estimator == KlEstimator::kAnalytic) {
    return {z, analytic_kl<F>(g)};
  } else {
    return {z, sampled_kl(g, z, eps)};
  }
}

// grad_z·∂z + grad_kl·∂KL w.r.t. the canonical values, eps fixed: ∂z/∂mu_q = 1, ∂z/∂log sigma_q = sigma_q·eps.
// The sampled estimate with u = (z - mu_p)/sigma_p adds grad_kl·u/sigma_p to the gradient reaching z, and
// ∂/∂(log sigma_q, mu_p, log sigma_p) = (-1, -u/sigma_p, 1 - u²) besides.
template <typename F, typename T>
VF_HOST_DEVICE InputGrads<T> sample_and_kl_grads(T grad_z, T grad_kl, T a, T b, T mu_p, T raw_p, float eps,
                                                 const ScaleConstants<T>& k) {
  const Gaussians<T> g = gaussians<F>(a, b, mu_p, raw_p, k);
  const T e = static_cast<T>(eps);
  if constexpr (F::estimator == KlEstimator::kAnalytic) {
    const KlGrads<T> d = analytic_kl_grads<F>(grad_kl, g);
    return input_grads<F>(KlGrads<T>{grad_z + d.mu_q, grad_z * e * g.sigma_q + d.log_sigma_q, d.mu_p, d.log_sigma_p},
                          g);
  } else {
    const T u = (posterior_sample(g, eps) - g.mu_p) / g.sigma_p;
    const T kl_z = grad_kl * u / g.sigma_p;
    const T z_total = grad_z + kl_z;
    return input_grads<F>(KlGrads<T>{z_total, z_total * e * g.sigma_q - grad_kl, -kl_z, grad_kl * (T(1) - u * u)}, g);
  }
}

template <typename F, typename T>
VF_HOST_DEVICE T gaussian_kl(T a, T b, T mu_p, T raw_p, const ScaleConstants<T>& k) {
  return analytic_kl<F>(gaussians<F>(a, b, mu_p, raw_p, k));
}

template <typename F, typename T>
VF_HOST_DEVICE InputGrads<T> gaussian_kl_grads(T grad, T a, T b, T mu_p, T raw_p, const ScaleConstants<T>& k) {
  const Gaussians<T> g = gaussians<F>(a, b, mu_p, raw_p, k);
  return input_grads<F>(analytic_kl_grads<F>(grad, g), g);
}

// Prior sampling at temperature t: z = mu + t·f(raw)·eps, in the reference's order of operations.
template <typename F, typename T>
VF_HOST_DEVICE T sample_gaussian(T mu, T raw, T temperature, float eps, const ScaleConstants<T>& k) {
  return mu + temperature * scaled<F::scale>(raw, k).sigma * static_cast<T>(eps);
}

// grad_z·∂z/∂raw = grad_z·eps·t·sigma·(d log sigma/d raw) (∂z/∂mu = 1).
template <typename F, typename T>
VF_HOST_DEVICE T sample_gaussian_grad_raw(T grad_z, T raw, T temperature, float eps, const ScaleConstants<T>& k) {
  const Scaled<T> s = scaled<F::scale>(raw, k);
  return grad_z * static_cast<T>(eps) * temperature * s.sigma * s.dlog;
}

// Aligned packet of N elements: one vector load or store on the GPU.
template <typename T, int N>
struct alignas(sizeof(T) * N) Packet {
  T v[N];
};

// eps of the kVec elements of a GPU packet at memory offsets [offset, offset + kVec). Contiguous packets of
// whole groups of four (kVec a multiple of 4, so `offset`, the logical index, is one of 4) take one Philox call
// per group; channels_last ones an element at a time, through its logical index.
template <int kVec>
VF_HOST_DEVICE void packet_eps(float (&eps)[kVec], uint64_t seed, const DenseLayout& layout, uint32_t offset) {
  if constexpr (kVec % 4 == 0) {
    if (!layout.channels_last) {
#pragma unroll
      for (int g = 0; g < kVec / 4; ++g) {
        group_eps(eps[4 * g], eps[4 * g + 1], eps[4 * g + 2], eps[4 * g + 3], seed,
                  (offset >> 2) + static_cast<uint32_t>(g));
      }
      return;
    }
  }
#pragma unroll
  for (int v = 0; v < kVec; ++v) eps[v] = gaussian_eps(seed, layout.logical_index(offset + static_cast<uint32_t>(v)));
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
// tail are drawn one element (and one call) at a time; channels_last tiles without pixel quads go element by
// element through their logical indices. Both paths compute every element with the same functions, hence the
// same bits.
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
  for (int g = 0; g < groups; ++g) {
    group_eps(body[4 * g], body[4 * g + 1], body[4 * g + 2], body[4 * g + 3], seed,
              first_group + static_cast<uint32_t>(g));
  }
  for (int k = head + 4 * groups; k < count; ++k) eps[k] = gaussian_eps(seed, offset + static_cast<uint32_t>(k));
}

// eps of one pixel quad, its four pixels' channels at pixel0..pixel3: channel c's group (first_group +
// c·group_stride) from one Philox call, lane j to pixel j. Four output pointers, so that gcc sees four
// independent unit-stride streams and vectorizes across channels.
VF_VECTOR_LOOP inline void fill_quad_eps(float* __restrict__ pixel0, float* __restrict__ pixel1,
                                         float* __restrict__ pixel2, float* __restrict__ pixel3, uint32_t channels,
                                         uint64_t seed, uint32_t first_group, uint32_t group_stride) {
  for (uint32_t c = 0; c < channels; ++c) {
    group_eps(pixel0[c], pixel1[c], pixel2[c], pixel3[c], seed, first_group + c * group_stride);
  }
}

// The memory offsets at which a CPU work range of this layout must begin and end: whole pixel quads (4·C
// elements) where tiles draw by quads, else any element.
inline int64_t work_alignment(const DenseLayout& layout) {
  return layout.pixel_quads ? 4 * static_cast<int64_t>(layout.channels) : 1;
}

// Calls tile(start, count, eps) on consecutive tiles of at most kTile elements covering the memory offsets
// [begin, end) (multiples of work_alignment), with eps the draws of the tile's elements. Pixel-quad layouts
// draw windows of whole quads, one Philox call per group: about kTile elements, or one quad where a quad is
// larger (C > kTile / 4: on the heap, as C is unbounded), cut into tiles; other layouts draw tile by tile.
template <int kTile, typename Tile>
void for_each_eps_tile(int64_t begin, int64_t end, uint64_t seed, const DenseLayout& layout, Tile&& tile) {
  alignas(64) float eps[kTile];
  if (!layout.pixel_quads) {
    alignas(64) uint32_t index[kTile];
    for (int64_t start = begin; start < end; start += kTile) {
      const int count = static_cast<int>(std::min<int64_t>(kTile, end - start));
      fill_eps(eps, index, static_cast<uint32_t>(start), count, seed, layout);
      tile(start, count, static_cast<const float*>(eps));
    }
    return;
  }
  const uint32_t channels = layout.channels, group_stride = layout.plane >> 2;
  const int64_t quad = work_alignment(layout);
  const int64_t window = quad <= kTile ? kTile / quad * quad : quad;
  std::vector<float> large(window > kTile ? window : 0);
  float* drawn = window > kTile ? large.data() : eps;
  for (int64_t first = begin; first < end; first += window) {
    const int64_t last = std::min(first + window, end);
    for (int64_t q = first; q < last; q += quad) {
      float* at = drawn + (q - first);
      fill_quad_eps(at, at + channels, at + 2 * channels, at + 3 * channels, channels, seed,
                    layout.quad_first_group(static_cast<uint32_t>(q)), group_stride);
    }
    for (int64_t start = first; start < last; start += kTile) {
      tile(start, static_cast<int>(std::min<int64_t>(kTile, last - start)),
           static_cast<const float*>(drawn + (start - first)));
    }
  }
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
