// Discretized mixture of logistics (DMoL) math shared by the CPU and CUDA kernels.
//
// One (mixture k, colour c) term of VDVAE's distortion is log P(x_c | k): the probability of x_c's
// quantization bin under a logistic with the RGB-coupled mean and the floored log-scale (Scales: VDVAE's
// exp or Efficient-VDVAE's softplus parametrization of the scale), with the
// branches of reference.dmol_nll (left/right edges, the cdf_delta > 1e-5 threshold, the log_pdf_mid
// fallback). colour_term also returns its derivatives; mixture_term adds the coupling of the means.
// At the end, the per-pixel bodies of the CUDA kernels (dmol_nll_forward_pixel,
// dmol_nll_backward_pixel, dmol_sample_pixel), which tests also run on the host.
//
// The math is branch-free (selects, no early returns), so that gcc vectorizes the CPU kernels' loops
// over a tile of pixels, through fast_math.h's functions (polynomials on the host, MUFU on the GPU).
// A NaN input always reaches the result: the log-scale floor keeps it as torch.maximum does, and the few
// selects that map NaN to a number (an input clamp, max(v, 0)) sit beside a term that carries the NaN on.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "fast_math.h"
#include "philox.h"

// Full unrolling of the loops over a compile-time number of mixtures in the CUDA kernels
#if defined(__CUDA_ARCH__)
#define VF_UNROLL _Pragma("unroll")
#else
#define VF_UNROLL
#endif

namespace vdvae_fast {
namespace dmol {

constexpr double kEdge = 0.999;           // |x| beyond this is the first or last bin
constexpr double kMinCdfDelta = 1e-5;     // below it the bin mass is replaced by the density
constexpr double kSoftplusLinear = 20.0;  // torch's softplus returns x above this threshold

template <typename T>
VF_HOST_DEVICE T abs_of(T v) {
#if defined(__CUDA_ARCH__)
  return fabs(v);  // a free operand modifier on the GPU
#else
  return v < T(0) ? -v : v;
#endif
}

// max(v, 0) and min(v, 0); a NaN v gives 0, which callers only use next to a NaN term
template <typename T>
VF_HOST_DEVICE T positive_part(T v) {
  return v > T(0) ? v : T(0);
}

template <typename T>
VF_HOST_DEVICE T negative_part(T v) {
  return v < T(0) ? v : T(0);
}

// ----------------------------------------------------------------------------------------------
// The DMoL
// ----------------------------------------------------------------------------------------------

// Channel layout of the (B, 10M, H, W) logits: [0, M) mixture logits, then per colour c a block of
// 3M channels at M + 3Mc: M means, M raw log-scales, M raw coupling coefficients.
VF_HOST_DEVICE int64_t mean_channel(int64_t mixtures, int colour, int64_t k) { return mixtures * (1 + 3 * colour) + k; }

VF_HOST_DEVICE int64_t log_scale_channel(int64_t mixtures, int colour, int64_t k) {
  return mixtures * (2 + 3 * colour) + k;
}

VF_HOST_DEVICE int64_t coeff_channel(int64_t mixtures, int colour, int64_t k) {
  return mixtures * (3 + 3 * colour) + k;
}

// Quantization of the targets: bins of half width 1 / (2^bits - 1) on [-1, 1]
template <typename T>
struct Bins {
  T half_width;
  T log_bins;  // log((2^bits - 1) / 2): turns the density at the bin centre into a bin mass
};

template <typename T>
inline Bins<T> make_bins(int64_t num_bits) {
  const double levels = static_cast<double>((int64_t{1} << num_bits) - 1);
  return {static_cast<T>(1.0 / levels), static_cast<T>(std::log(levels / 2.0))};
}

// ----------------------------------------------------------------------------------------------
// The log-scales (reference.dmol_log_scales)
// ----------------------------------------------------------------------------------------------

template <typename T>
struct LogScale {
  T value;  // the floored log-scale
  T grad;   // d value / d raw channel: torch.maximum's 1 above the floor, 1/2 on it, 0 below
};

// log1p(y) / y for y in [0, 1] (1 at y = 0), to float accuracy in plain arithmetic, so that it is the same
// on the host and the GPU: with s = y / (2 + y) <= 1/3, log1p(y) = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...),
// whose terms after s^12/13 add less than 2e-8.
VF_HOST_DEVICE float log1p_ratio(float y) {
  const float r = fast_reciprocal(2.0f + y);
  const float s = y * r;
  const float z = s * s;
  float p = 1.0f / 13.0f;
  p = mul_add(p, z, 1.0f / 11.0f);
  p = mul_add(p, z, 1.0f / 9.0f);
  p = mul_add(p, z, 1.0f / 7.0f);
  p = mul_add(p, z, 1.0f / 5.0f);
  p = mul_add(p, z, 1.0f / 3.0f);
  p = mul_add(p, z, 1.0f);
  return 2.0f * r * p;
}

VF_HOST_DEVICE double log1p_ratio(double y) { return y == 0.0 ? 1.0 : std::log1p(y) / y; }

// How the raw log-scale channels become log-scales, floored at log_scale_min (-inf: no floor):
// kSoftplus false: VDVAE's, log_scale = max(raw, log_scale_min);
// kSoftplus true: Efficient-VDVAE's gradient smoothing, scale = softplus(beta raw) / beta, log_scale =
// max(log softplus(beta raw) - log beta, log_scale_min).
template <bool kSoftplus, typename T>
struct Scales {
  T beta, log_beta, log_scale_min;

  // log softplus(t) with y = e^-|t| as shift + log(arg): t >= 0 gives shift 0 and arg = softplus(t) =
  // t + y log1p_ratio(y); t < 0 gives softplus(t) = y log1p_ratio(y), so shift t and arg = log1p_ratio(y) in
  // [ln 2, 1], which never underflows (log softplus(t) tends to t). Its derivative sigmoid(t) / softplus(t)
  // is 1 / ((1 + y) arg) in both cases. The compiler drops the derivative where only the value is used.
  VF_HOST_DEVICE LogScale<T> log_scale(T raw) const {
    T unfloored = raw;
    T slope = T(1);
    if (kSoftplus) {
      const T t = beta * raw;
      const T y = fast_exp(-abs_of(t));
      const T ratio = log1p_ratio(y);
      const T softplus_positive = t + y * ratio;
      const bool negative = t < T(0);
      const T arg = negative ? ratio : softplus_positive;
      const T shift = negative ? t : T(0);
      unfloored = (shift + fast_log(arg)) - log_beta;
      slope = beta * fast_reciprocal((T(1) + y) * arg);
    }
    const T value = unfloored < log_scale_min ? log_scale_min : unfloored;
    const T at_floor = unfloored == log_scale_min ? T(0.5) : T(0);
    const T floor_grad = unfloored > log_scale_min ? T(1) : at_floor;
    return {value, slope * floor_grad};
  }
};

// Calls f(Scales<kSoftplus, T>{...}) for the scale options of the kernel entry points: `scale` indexes
// reference.SCALES ("exp", "softplus"), beta > 0 is softplus' sharpness, log_scale_min <= 0 or -inf the floor.
template <typename T, typename F>
void with_scales(int64_t scale, double beta, double log_scale_min, const F& f) {
  TORCH_CHECK(scale == 0 || scale == 1, "dmol: scale must be 0 (exp) or 1 (softplus), got ", scale);
  TORCH_CHECK(std::isfinite(beta) && beta > 0.0, "dmol: beta must be finite and > 0, got ", beta);
  TORCH_CHECK(!std::isnan(log_scale_min) && log_scale_min <= 0.0,
              "dmol: log_scale_min must be <= 0 or -inf, got ", log_scale_min);
  const T log_beta = static_cast<T>(std::log(beta));
  if (scale == 1) {
    f(Scales<true, T>{static_cast<T>(beta), log_beta, static_cast<T>(log_scale_min)});
  } else {
    f(Scales<false, T>{static_cast<T>(beta), log_beta, static_cast<T>(log_scale_min)});
  }
}

template <typename T>
struct ColourTerm {
  T log_prob;
  T d_mean;       // d log_prob / d (coupled) mean
  T d_log_scale;  // d log_prob / d raw log-scale channel, through the scale's parametrization and floor
};

// log P(x | mean, log_scale) of x's bin, as reference.dmol_nll's torch.where chain chooses it:
//   x < -0.999: log sigmoid(plus_in) = plus_in - softplus(plus_in)
//   x >  0.999: -softplus(min_in)
//   else cdf_delta = sigmoid(plus_in) - sigmoid(min_in); log(cdf_delta) if cdf_delta > 1e-5,
//        else mid_in - log_scale - 2 softplus(mid_in) - log_bins (a NaN cdf_delta also lands here)
// softplus(v) = v > 20 ? v : max(v, 0) + log1p(exp(-|v|)); every branch needs one logarithm, of the
// selected argument. The derivatives are those of autograd through the chosen branch.
template <bool kGrad, typename T>
VF_HOST_DEVICE ColourTerm<T> colour_term(T x, T mean, const LogScale<T>& scale, const Bins<T>& bins) {
  const T log_scale = scale.value;
  const T inv_stdv = fast_exp(-log_scale);
  const T centered = x - mean;
  const T plus_in = inv_stdv * (centered + bins.half_width);
  const T min_in = inv_stdv * (centered - bins.half_width);
  const T mid_in = inv_stdv * centered;
  // sigmoid(v) from e = exp(-|v|) and q = 1 / (1 + e): q for v >= 0, e q below, never 1 - tiny
  const T e_plus = fast_exp(-abs_of(plus_in));
  const T e_min = fast_exp(-abs_of(min_in));
  const T e_mid = fast_exp(-abs_of(mid_in));
  const T q_plus = fast_reciprocal(T(1) + e_plus);
  const T q_min = fast_reciprocal(T(1) + e_min);
  const T cdf_plus = plus_in >= T(0) ? q_plus : e_plus * q_plus;
  const T cdf_min = min_in >= T(0) ? q_min : e_min * q_min;
  const T cdf_delta = cdf_plus - cdf_min;

  const bool left = x < T(-kEdge);
  const bool right = x > T(kEdge);
  // bitwise & keeps these masks branch-free for the vectorizer
  const bool use_delta = !left & !right & (cdf_delta > T(kMinCdfDelta));
  const bool use_density = !left & !right & !use_delta;
  // The one logarithm, of the selected branch's argument. Every select below picks between named
  // values: arithmetic inside ?: arms becomes control flow that gcc duplicates before vectorizing.
  const T log_arg = left ? e_plus : (right ? e_min : (use_delta ? cdf_delta : e_mid));
  const T log_value = fast_log_or_log1p(use_delta, log_arg);
  // log(max(cdf_delta, 1e-12)) of the reference is log_value itself: cdf_delta > 1e-5 there
  const T log_sigmoid_plus = negative_part(plus_in) - log_value;  // plus_in - softplus(plus_in)
  const T softplus_min = positive_part(min_in) + log_value;
  const T softplus_mid = positive_part(mid_in) + log_value;
  const T left_value = plus_in > T(kSoftplusLinear) ? T(0) : log_sigmoid_plus;
  const T right_value = -(min_in > T(kSoftplusLinear) ? min_in : softplus_min);
  const T density_softplus = mid_in > T(kSoftplusLinear) ? mid_in : softplus_mid;
  const T density_value = mid_in - log_scale - T(2) * density_softplus - bins.log_bins;
  const T log_prob = left ? left_value : (right ? right_value : (use_delta ? log_value : density_value));
  ColourTerm<T> term{log_prob, T(0), T(0)};
  if (kGrad) {
    // d log_prob / d (plus_in, min_in, mid_in) of the taken branch; softplus' is 1 above the
    // threshold, sigmoid below
    const T e_q_plus = e_plus * q_plus;
    const T sigmoid_neg_plus = plus_in >= T(0) ? e_q_plus : q_plus;
    const T d_plus_left = plus_in > T(kSoftplusLinear) ? T(0) : sigmoid_neg_plus;
    const T neg_sigmoid_min = min_in > T(kSoftplusLinear) ? T(-1) : -cdf_min;
    // sigmoid' = s (1 - s) from the rounded s, as autograd forms it: where both sigmoids are near 1,
    // the rounding of 1 - s then cancels against that of cdf_delta instead of adding to it
    const T inv_delta = fast_reciprocal(cdf_delta);
    const T d_plus_delta = cdf_plus * (T(1) - cdf_plus) * inv_delta;
    const T d_min_delta = -(cdf_min * (T(1) - cdf_min) * inv_delta);
    const T q_mid = fast_reciprocal(T(1) + e_mid);
    const T e_q_mid = e_mid * q_mid;
    const T sigmoid_mid = mid_in >= T(0) ? q_mid : e_q_mid;
    const T softplus_grad_mid = mid_in > T(kSoftplusLinear) ? T(1) : sigmoid_mid;
    const T d_mid_density = T(1) - T(2) * softplus_grad_mid;
    const T d_plus = left ? d_plus_left : (use_delta ? d_plus_delta : T(0));
    const T d_min = right ? neg_sigmoid_min : (use_delta ? d_min_delta : T(0));
    const T d_mid = use_density ? d_mid_density : T(0);
    const T d_log_scale_direct = use_density ? T(-1) : T(0);
    // plus/min/mid_in are inv_stdv * (x - mean + const) and inv_stdv = exp(-log_scale)
    term.d_mean = -inv_stdv * (d_plus + d_min + d_mid);
    const T d_log_scale = d_log_scale_direct - (plus_in * d_plus + min_in * d_min + mid_in * d_mid);
    term.d_log_scale = d_log_scale * scale.grad;
  }
  return term;
}

// The 9 parameters of one mixture component at one pixel
template <typename T>
struct MixtureParams {
  T mean[3];
  T raw_log_scale[3];
  T raw_coeff[3];
};

template <typename T>
struct MixtureTerm {
  T log_prob;  // sum over colours of log P(x_c | k)
  T d_mean[3];
  T d_log_scale[3];
  T d_coeff[3];  // w.r.t. the raw coefficients, through tanh
};

// Colour c's mean is coupled to the colours before it: m1 = mu1 + c0 x0, m2 = mu2 + c1 x0 + c2 x1.
template <bool kGrad, bool kSoftplus, typename T>
VF_HOST_DEVICE MixtureTerm<T> mixture_term(T x0, T x1, T x2, const MixtureParams<T>& p, const Bins<T>& bins,
                                           const Scales<kSoftplus, T>& scales) {
  const T c0 = fast_tanh(p.raw_coeff[0]);
  const T c1 = fast_tanh(p.raw_coeff[1]);
  const T c2 = fast_tanh(p.raw_coeff[2]);
  const ColourTerm<T> r = colour_term<kGrad>(x0, p.mean[0], scales.log_scale(p.raw_log_scale[0]), bins);
  const ColourTerm<T> g = colour_term<kGrad>(x1, p.mean[1] + c0 * x0, scales.log_scale(p.raw_log_scale[1]), bins);
  const ColourTerm<T> b =
      colour_term<kGrad>(x2, p.mean[2] + c1 * x0 + c2 * x1, scales.log_scale(p.raw_log_scale[2]), bins);
  MixtureTerm<T> term;
  term.log_prob = r.log_prob + g.log_prob + b.log_prob;
  if (kGrad) {
    term.d_mean[0] = r.d_mean;
    term.d_mean[1] = g.d_mean;
    term.d_mean[2] = b.d_mean;
    term.d_log_scale[0] = r.d_log_scale;
    term.d_log_scale[1] = g.d_log_scale;
    term.d_log_scale[2] = b.d_log_scale;
    term.d_coeff[0] = g.d_mean * x0 * (T(1) - c0 * c0);
    term.d_coeff[1] = b.d_mean * x0 * (T(1) - c1 * c1);
    term.d_coeff[2] = b.d_mean * x1 * (T(1) - c2 * c2);
  }
  return term;
}

// Running logsumexp over the mixtures for one pixel: value() = max + log(sum). An all -inf (or
// +inf) input gives -inf (+inf) as torch.logsumexp does, and a NaN input sticks.
template <typename T>
struct LogSumExp {
  T max = -std::numeric_limits<T>::infinity();
  T sum = T(0);

  // One exponential whichever way the max moves: e = exp(-|v - max|)
  VF_HOST_DEVICE void push(T v) {
    const bool grows = v > max;
    const T e = fast_exp(grows ? max - v : v - max);
    sum = grows ? sum * e + T(1) : sum + (v == max ? T(1) : e);
    max = grows ? v : max;
  }
  VF_HOST_DEVICE T log_sum() const { return fast_log(sum); }
  VF_HOST_DEVICE T value() const { return max + log_sum(); }
};

// logsumexp over the mixtures as shift + log_sum, with shift = the max, or 0 where the max is infinite
// (as torch.logsumexp does), so that log_softmax = (v - shift) - log_sum keeps the precision of large
// logits. value(k) is mixture k's value; a NaN one makes log_sum NaN.
struct ShiftedLogSumExp {
  float shift, log_sum;
};

template <int kMixtures, typename Value>
VF_HOST_DEVICE ShiftedLogSumExp shifted_logsumexp(int m, const Value& value) {
  float max = value(0);
  VF_UNROLL
  for (int k = 1; k < (kMixtures > 0 ? kMixtures : m); ++k) max = value(k) > max ? value(k) : max;
  const float shift = abs_of(max) == std::numeric_limits<float>::infinity() ? 0.0f : max;
  float sum = 0.0f;
  VF_UNROLL
  for (int k = 0; k < (kMixtures > 0 ? kMixtures : m); ++k) sum += fast_exp(value(k) - shift);
  return {shift, fast_log(sum)};
}

// ----------------------------------------------------------------------------------------------
// dmol_sample. Float32 only, with the accurate *_poly functions on both host and GPU: a Gumbel score
// -log(-log u) needs the relative accuracy of log u near 1. The softplus log-scale takes fast_log and
// fast_exp like the loss: only its absolute accuracy matters.
// ----------------------------------------------------------------------------------------------

struct PixelSample {
  float x[3];
};

template <typename T>
VF_HOST_DEVICE T clamp_unit(T v) {
  return v < T(-1) ? T(-1) : (v > T(1) ? T(1) : v);
}

// Mixture k's Gumbel-perturbed logit at a pixel; its noise is Philox stream k
VF_HOST_DEVICE float gumbel_score(float logit, uint64_t seed, uint32_t pixel, uint32_t k) {
  const float u = philox_open_uniform(seed, pixel, k);
  return logit - log_positive_poly(-log_positive_poly(u));
}

// Whether mixture k's score replaces the best of mixtures < k in the Gumbel-max pick, starting from
// best = -inf and choice 0: torch.argmax keeps the first maximum and treats NaN as the largest value
VF_HOST_DEVICE bool replaces_best(float best, float score) {
  return (best == best) & ((score > best) | (score != score));
}

// mean + exp(log_scale) * logit(u), u from Philox stream `stream`
template <bool kSoftplus>
VF_HOST_DEVICE float logistic_draw(float mean, float raw_log_scale, const Scales<kSoftplus, float>& scales,
                                   uint64_t seed, uint32_t pixel, uint32_t stream) {
  const float log_scale = scales.log_scale(raw_log_scale).value;
  const float u = philox_open_uniform(seed, pixel, stream);
  return mean + exp_poly(log_scale) * (log_positive_poly(u) - log_positive_poly(1.0f - u));
}

// NaN for a NaN v, else 0
VF_HOST_DEVICE float nan_part(float v) { return v == v ? 0.0f : v; }

// The chosen mixture's parameters as the reference forms them, sums over the mixtures against the
// one-hot choice. The means and log-scales are such sums, so a NaN or an infinite one in any mixture
// makes the sample NaN there. The reference sums tanh of the coefficients, where only a NaN reaches
// the sum (tanh(inf) * 0 = 0): the chosen raw coefficient is kept, its tanh taken once, and a NaN
// coefficient of another mixture is added to the mean of the colour it couples into, which gives the
// same NaN samples.
struct ChosenMixture {
  float mean[3] = {0.0f, 0.0f, 0.0f};
  float raw_log_scale[3] = {0.0f, 0.0f, 0.0f};
  float raw_coeff[3] = {0.0f, 0.0f, 0.0f};

  VF_HOST_DEVICE void add(bool chosen, const MixtureParams<float>& p) {
    const float one_hot = chosen ? 1.0f : 0.0f;
    for (int c = 0; c < 3; ++c) {
      mean[c] += p.mean[c] * one_hot;
      raw_log_scale[c] += p.raw_log_scale[c] * one_hot;
      raw_coeff[c] = chosen ? p.raw_coeff[c] : raw_coeff[c];
    }
    mean[1] += nan_part(p.raw_coeff[0]);
    mean[2] += nan_part(p.raw_coeff[1]) + nan_part(p.raw_coeff[2]);
  }

  // The logistic draws (colour c's noise is Philox stream M + c), the RGB coupling and the clamp
  template <bool kSoftplus>
  VF_HOST_DEVICE PixelSample sample(int64_t mixtures, const Scales<kSoftplus, float>& scales, uint64_t seed,
                                    uint32_t pixel) const {
    const uint32_t stream = static_cast<uint32_t>(mixtures);
    const float draw[3] = {logistic_draw(mean[0], raw_log_scale[0], scales, seed, pixel, stream),
                           logistic_draw(mean[1], raw_log_scale[1], scales, seed, pixel, stream + 1),
                           logistic_draw(mean[2], raw_log_scale[2], scales, seed, pixel, stream + 2)};
    PixelSample out;
    out.x[0] = clamp_unit(draw[0]);
    out.x[1] = clamp_unit(draw[1] + tanh_poly(raw_coeff[0]) * out.x[0]);
    out.x[2] = clamp_unit(draw[2] + tanh_poly(raw_coeff[1]) * out.x[0] + tanh_poly(raw_coeff[2]) * out.x[1]);
    return out;
  }
};

// Mixture k's 9 parameters at a pixel; channel(ch) returns channel ch of the pixel as float
template <typename T, typename Channels>
VF_HOST_DEVICE MixtureParams<T> mixture_params(const Channels& channel, int64_t mixtures, int64_t k) {
  MixtureParams<T> p;
  for (int c = 0; c < 3; ++c) {
    p.mean[c] = channel(mean_channel(mixtures, c, k));
    p.raw_log_scale[c] = channel(log_scale_channel(mixtures, c, k));
    p.raw_coeff[c] = channel(coeff_channel(mixtures, c, k));
  }
  return p;
}

// ----------------------------------------------------------------------------------------------
// Per-pixel bodies of the CUDA kernels, in float32. `channel(ch)` is the pixel's channel ch (a float
// reference: the kernels stage a tile of pixels in shared memory); kMixtures > 0 fixes the number of
// mixtures at compile time (fully unrolled loops), 0 takes `mixtures` at run time.
// ----------------------------------------------------------------------------------------------

template <int kMixtures>
VF_HOST_DEVICE int mixture_count(int64_t mixtures) {
  return kMixtures > 0 ? kMixtures : static_cast<int>(mixtures);
}

// log p(x) of one pixel: logsumexp_k(log p(x | k) + log_softmax(pi)_k), log_softmax from a first
// logsumexp over the mixture logits.
template <int kMixtures, typename Channels, typename S>
VF_HOST_DEVICE float dmol_nll_forward_pixel(const Channels& channel, int64_t mixtures, float x0, float x1, float x2,
                                            const Bins<float>& bins, const S& scales) {
  const int m = mixture_count<kMixtures>(mixtures);
  const ShiftedLogSumExp mix = shifted_logsumexp<kMixtures>(m, channel);
  const auto joint = [&](int k) {
    const auto term = mixture_term<false>(x0, x1, x2, mixture_params<float>(channel, m, k), bins, scales);
    return term.log_prob + ((channel(k) - mix.shift) - mix.log_sum);
  };
  if constexpr (kMixtures > 0) {
    // the M joint log-probabilities fit in registers: a max pass and a sum pass
    float joints[kMixtures > 0 ? kMixtures : 1];
    VF_UNROLL
    for (int k = 0; k < kMixtures; ++k) joints[k] = joint(k);
    const ShiftedLogSumExp all = shifted_logsumexp<kMixtures>(m, [&](int k) { return joints[k]; });
    return all.shift + all.log_sum;
  } else {
    LogSumExp<float> all;
    for (int k = 0; k < m; ++k) all.push(joint(k));
    return all.value();
  }
}

// The gradient of g·(-log p(x)) w.r.t. the pixel's channels, written over them, in one pass over the
// mixtures: each mixture's 9 derivatives d log p(x | k) / d param replace its parameters as soon as they
// are computed, softmax(pi)_k replaces pi_k and the joint log-probability a_k = log p(x | k) +
// log_softmax(pi)_k goes to joint(k); once the logsumexp of the a_k is known, the responsibilities
// r_k = exp(a_k - logsumexp) scale them: d/dpi_k = g (softmax(pi)_k - r_k), d/dparam = -g r_k d/dparam.
// Nothing of the forward is computed twice.
template <int kMixtures, typename Channels, typename Joint, typename S>
VF_HOST_DEVICE void dmol_nll_backward_pixel(const Channels& channel, const Joint& joint, int64_t mixtures, float x0,
                                            float x1, float x2, const Bins<float>& bins, const S& scales, float g) {
  const int m = mixture_count<kMixtures>(mixtures);
  const ShiftedLogSumExp mix = shifted_logsumexp<kMixtures>(m, channel);
  VF_UNROLL
  for (int k = 0; k < m; ++k) {
    const auto term = mixture_term<true>(x0, x1, x2, mixture_params<float>(channel, m, k), bins, scales);
    const float log_softmax = (channel(k) - mix.shift) - mix.log_sum;
    joint(k) = term.log_prob + log_softmax;
    channel(k) = fast_exp(log_softmax);
    for (int c = 0; c < 3; ++c) {
      channel(mean_channel(m, c, k)) = term.d_mean[c];
      channel(log_scale_channel(m, c, k)) = term.d_log_scale[c];
      channel(coeff_channel(m, c, k)) = term.d_coeff[c];
    }
  }
  const ShiftedLogSumExp all = shifted_logsumexp<kMixtures>(m, joint);
  VF_UNROLL
  for (int k = 0; k < m; ++k) {
    const float r = fast_exp((joint(k) - all.shift) - all.log_sum);
    channel(k) = g * (channel(k) - r);
    const float weight = -g * r;
    for (int c = 0; c < 3; ++c) {
      channel(mean_channel(m, c, k)) *= weight;
      channel(log_scale_channel(m, c, k)) *= weight;
      channel(coeff_channel(m, c, k)) *= weight;
    }
  }
}

// One pixel of reference.dmol_sample: the Gumbel-max pick of a mixture, then its logistic draws
template <int kMixtures, typename Channels, typename S>
VF_HOST_DEVICE PixelSample dmol_sample_pixel(const Channels& channel, int64_t mixtures, const S& scales, uint64_t seed,
                                             uint32_t pixel) {
  const int m = mixture_count<kMixtures>(mixtures);
  int choice = 0;
  float best = -std::numeric_limits<float>::infinity();
  VF_UNROLL
  for (int k = 0; k < m; ++k) {
    const float score = gumbel_score(channel(k), seed, pixel, static_cast<uint32_t>(k));
    const bool replace = replaces_best(best, score);
    best = replace ? score : best;
    choice = replace ? k : choice;
  }
  ChosenMixture chosen;
  VF_UNROLL
  for (int k = 0; k < m; ++k) chosen.add(k == choice, mixture_params<float>(channel, m, k));
  return chosen.sample(m, scales, seed, pixel);
}

}  // namespace dmol
}  // namespace vdvae_fast
