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

constexpr double kEdge = 0.999;        // |x| beyond this is the first or last bin
constexpr double kMinCdfDelta = 1e-5;  // below it the bin mass is replaced by the density

template <typename T>
VF_HOST_DEVICE T abs_of(T v) {
#if defined(__CUDA_ARCH__)
  return fabs(v);  // a free operand modifier on the GPU
#else
  return v < T(0) ? -v : v;
#endif
}

// max(v, 0); a NaN v gives 0, which callers only use next to a term that carries the NaN
template <typename T>
VF_HOST_DEVICE T positive_part(T v) {
  return v > T(0) ? v : T(0);
}

// max(v, c) and min(v, c) of a number c that keep a NaN v: one FMNMX.NAN on the GPU (sm_80 and later)
VF_HOST_DEVICE float max_keep_nan(float v, float c) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float out;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(out) : "f"(v), "f"(c));
  return out;
#else
  return v < c ? c : v;
#endif
}

VF_HOST_DEVICE float min_keep_nan(float v, float c) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float out;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(out) : "f"(v), "f"(c));
  return out;
#else
  return v > c ? c : v;
#endif
}

VF_HOST_DEVICE double max_keep_nan(double v, double c) { return v < c ? c : v; }

VF_HOST_DEVICE double min_keep_nan(double v, double c) { return v > c ? c : v; }

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
  T minus_half_width;  // a number of its own, so that nvcc forms -h as one product, not as a product and a negation
  T log_bins;          // log((2^bits - 1) / 2): turns the density at the bin centre into a bin mass
};

template <typename T>
inline Bins<T> make_bins(int64_t num_bits) {
  const double levels = static_cast<double>((int64_t{1} << num_bits) - 1);
  return {static_cast<T>(1.0 / levels), static_cast<T>(-1.0 / levels), static_cast<T>(std::log(levels / 2.0))};
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
    const T value = max_keep_nan(unfloored, log_scale_min);
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

// What x_c decides for every mixture. At the edges the reference takes the bin's mass from one side:
// x < -0.999: log sigmoid(plus_in) = plus_in - softplus(plus_in); x > 0.999: -softplus(min_in). Inside, it
// takes log(cdf_delta) where cdf_delta = sigmoid(plus_in) - sigmoid(min_in) > 1e-5, else the density at the
// bin centre, mid_in - 2 softplus(mid_in) - log_scale - log_bins. Each of the three softplus forms is
// slope v - curve softplus(v) - density (log_scale + log_bins) for the logistic argument v = (at - mean) /
// scale. All are numbers, not flags, so that the mixtures' terms combine them by arithmetic (on the GPU a
// flag per colour and mixture would be a predicate, and there are only 7).
template <typename T>
struct Target {
  T x;                 // the target, which the next colours' means couple to
  T at;                // x + half width (v = plus_in) on the first bin, x - half width (min_in) on the last, else x
  T slope, curve;      // first bin 1, 1; last bin 0, 1; inside 1, 2
  T density;           // 1 inside, else 0
  T density_log_bins;  // density * log_bins
  T min_cdf_delta;     // 1e-5 inside, inf at the edges, where cdf_delta is never used
};

template <typename T>
VF_HOST_DEVICE Target<T> target_of(T x, const Bins<T>& bins) {
  const bool left = x < T(-kEdge);
  const bool right = x > T(kEdge);
  const bool inside = !left & !right;
  const T zero = T(0), one = T(1), two = T(2);
  const T never = std::numeric_limits<T>::infinity(), threshold = T(kMinCdfDelta);
  const T offset = left ? bins.half_width : (right ? bins.minus_half_width : zero);
  const T slope = right ? zero : one;
  const T curve = inside ? two : one;
  const T density = inside ? one : zero;
  const T density_log_bins = inside ? bins.log_bins : zero;
  const T min_cdf_delta = inside ? threshold : never;
  return {x, x + offset, slope, curve, density, density_log_bins, min_cdf_delta};
}

// The three targets of a pixel
template <typename T>
struct PixelTargets {
  Target<T> colour[3];

  VF_HOST_DEVICE PixelTargets(T x0, T x1, T x2, const Bins<T>& bins)
      : colour{target_of(x0, bins), target_of(x1, bins), target_of(x2, bins)} {}
};

// The exponentials of colour_term take their arguments in exponent units: exp_units(y * exp_unit<T>()) = e^y.
// On the GPU the unit is log2 e and exp_units one MUFU.EX2, so that the unit folds into a product the
// caller forms anyway; on the host the unit is 1 and exp_units is fast_exp.
template <typename T>
VF_HOST_DEVICE constexpr T exp_unit() {
#if defined(__CUDA_ARCH__)
  return static_cast<T>(kLog2e);
#else
  return T(1);
#endif
}

VF_HOST_DEVICE float exp_units(float y) {
#if defined(__CUDA_ARCH__)
  return exp2_mufu(y);
#else
  return fast_exp(y);
#endif
}

VF_HOST_DEVICE double exp_units(double y) { return fast_exp(y); }

// The largest -log_scale whose exponential stays finite (e^80 < 2^128 in float), so that a log-scale far below
// any floor (only -inf lets it through) gives an enormous inverse scale, as the reference's, and not inf * 0.
template <typename T>
VF_HOST_DEVICE constexpr T max_inverse_log_scale() {
  return sizeof(T) == sizeof(float) ? T(80) : T(700);
}

template <typename T>
struct ColourTerm {
  T base, num, den;  // log P(x_c | k) = base + log(num / den): mixture_term takes one log for three colours
  T d_mean;          // d log P / d (coupled) mean
  T d_log_scale;     // d log P / d raw log-scale channel, through the scale's parametrization and floor
};

// log P(x | mean, log_scale) of x's bin, with the branches of reference.dmol_nll, and its derivatives. With
// a = |mid_in| and h = inv_stdv * half_width, so plus_in, min_in = mid_in +- h, the bin mass is
//   cdf_delta = (1 - e^-2h) / ((1 + e^(a-h)) (1 + e^-(a+h)))
// (expand sigmoid(a + h) - sigmoid(a - h); mid_in < 0 gives the same by symmetry), which neither subtracts
// two rounded sigmoids nor overflows (e^(a-h) is capped at e^40, where cdf_delta < 1e-5 anyway), and
//   d log cdf_delta / d mid_in = sign(mid_in) (e^-(a+h) - e^(a-h)) / ((1 + e^(a-h)) (1 + e^-(a+h))),
//   d log cdf_delta / d h = ((e^-(a+h) + e^(a-h)) (1 + e^-2h) + 4 e^-2h) / ((1 - e^-2h) (1 + e^(a-h)) (1 + e^-(a+h))).
// The softplus forms need e^-|v| only: softplus(v) = max(v, 0) + log(1 + e^-|v|), sigmoid(v) = (v >= 0 ? 1 :
// e^-|v|) / (1 + e^-|v|). torch's softplus returns v itself above 20, which differs from this by less than
// float rounding. Each term ends in a ratio whose log the mixture takes (num / den), and its derivatives need
// one reciprocal, of the branch's denominator. Every select picks between named values: arithmetic inside ?:
// arms becomes control flow that gcc duplicates before vectorizing.
template <bool kGrad, typename T>
VF_HOST_DEVICE ColourTerm<T> colour_term(const Target<T>& target, T mean, const LogScale<T>& scale,
                                         const Bins<T>& bins) {
  constexpr T unit = exp_unit<T>();
  const T zero = T(0), one = T(1);
  const T inv_stdv = fast_exp(-max_keep_nan(scale.value, -max_inverse_log_scale<T>()));
  const T v = inv_stdv * (target.at - mean);
  const T a_units = abs_of(v) * unit;
  const T minus_h_units = inv_stdv * (bins.minus_half_width * unit);
  const T e_v = exp_units(-a_units);                                               // e^-|v|
  const T e_h = exp_units(minus_h_units);                                          // e^-h
  const T e_gap = exp_units(min_keep_nan(a_units + minus_h_units, T(40) * unit));  // e^(a-h)
  const T e_far = e_v * e_h;                                                       // e^-(a+h)
  const T e_2h = e_h * e_h;
  const T mass_num = one - e_2h;
  const T mass_den = (one + e_gap) * (one + e_far);
  // cdf_delta > 1e-5 inside; a NaN anywhere makes this false and the NaN reaches the density
  const bool use_delta = mass_num > target.min_cdf_delta * mass_den;
  const T one_plus_e_v = one + e_v;
  const T softplus_den = one_plus_e_v * (one + target.density * e_v);  // (1 + e^-|v|)^curve
  const T shift = target.density * scale.value + target.density_log_bins;
  const T softplus_base = target.slope * v - (target.curve * positive_part(v) + shift);
  const T base = use_delta ? zero : softplus_base;
  const T num = use_delta ? mass_num : one;
  const T den = use_delta ? mass_den : softplus_den;
  ColourTerm<T> term{base, num, den, zero, zero};
  if (kGrad) {
    const T delta_den = mass_num * mass_den;
    const T r = fast_reciprocal(use_delta ? delta_den : one_plus_e_v);
    const bool positive = v >= zero;
    const T towards = e_far - e_gap;
    const T away = e_gap - e_far;
    // -d log P / d v, negated so that no result needs a negation of its own
    const T minus_d_delta = (positive ? away : towards) * (mass_num * r);
    const T d_h = ((e_far + e_gap) * (one + e_2h) + T(4) * e_2h) * r;
    const T sigmoid_top = positive ? one : e_v;
    const T minus_d_softplus = target.curve * (sigmoid_top * r) - target.slope;
    const T minus_d_v = use_delta ? minus_d_delta : minus_d_softplus;
    // v and h are inv_stdv times constants, and inv_stdv = exp(-log_scale); the density adds -log_scale
    const T delta_direct = (inv_stdv * bins.minus_half_width) * d_h;  // -h d_h
    const T density_direct = -target.density;
    const T direct = use_delta ? delta_direct : density_direct;
    term.d_mean = inv_stdv * minus_d_v;
    term.d_log_scale = (direct + v * minus_d_v) * scale.grad;
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
// The targets come by value: a reference to them keeps gcc from vectorizing the CPU kernels' loops.
template <bool kGrad, bool kSoftplus, typename T>
VF_HOST_DEVICE MixtureTerm<T> mixture_term(const PixelTargets<T> x, const MixtureParams<T>& p, const Bins<T>& bins,
                                           const Scales<kSoftplus, T>& scales) {
  const T x0 = x.colour[0].x, x1 = x.colour[1].x;
  const T c0 = fast_tanh(p.raw_coeff[0]);
  const T c1 = fast_tanh(p.raw_coeff[1]);
  const T c2 = fast_tanh(p.raw_coeff[2]);
  const ColourTerm<T> r = colour_term<kGrad>(x.colour[0], p.mean[0], scales.log_scale(p.raw_log_scale[0]), bins);
  const ColourTerm<T> g =
      colour_term<kGrad>(x.colour[1], p.mean[1] + c0 * x0, scales.log_scale(p.raw_log_scale[1]), bins);
  const ColourTerm<T> b =
      colour_term<kGrad>(x.colour[2], p.mean[2] + c1 * x0 + c2 * x1, scales.log_scale(p.raw_log_scale[2]), bins);
  // each num lies in (1e-5, 1] and each den in [1, 1e5): the products neither underflow nor overflow
  const T ratio = (r.num * g.num * b.num) * fast_reciprocal(r.den * g.den * b.den);
  MixtureTerm<T> term;
  term.log_prob = (r.base + g.base + b.base) + fast_log(ratio);
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
// logits. value(k) is mixture k's value; a NaN one makes log_sum NaN (through the sum, whatever the max).
struct ShiftedLogSumExp {
  float shift, log_sum;
};

template <int kMixtures, typename Value>
VF_HOST_DEVICE ShiftedLogSumExp shifted_logsumexp(int m, const Value& value) {
  float max = value(0);
  VF_UNROLL
  for (int k = 1; k < (kMixtures > 0 ? kMixtures : m); ++k) max = max_keep_nan(value(k), max);
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

// Mixture k's Gumbel-perturbed logit at a pixel, from its uniform u (Philox stream k)
VF_HOST_DEVICE float gumbel_score(float logit, float u) { return logit - log_positive_poly(-log_positive_poly(u)); }

// Whether mixture k's score replaces the best of mixtures < k in the Gumbel-max pick, starting from
// best = -inf and choice 0: torch.argmax keeps the first maximum and treats NaN as the largest value
VF_HOST_DEVICE bool replaces_best(float best, float score) {
  return (best == best) & ((score > best) | (score != score));
}

// mean + exp(log_scale) * logit(u)
template <bool kSoftplus>
VF_HOST_DEVICE float logistic_draw(float mean, float raw_log_scale, const Scales<kSoftplus, float>& scales, float u) {
  const float log_scale = scales.log_scale(raw_log_scale).value;
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

  // The logistic draws from colour c's uniform u[c] (Philox stream M + c), the RGB coupling and the clamp
  template <bool kSoftplus>
  VF_HOST_DEVICE PixelSample sample(const Scales<kSoftplus, float>& scales, const float (&u)[3]) const {
    const float draw[3] = {logistic_draw(mean[0], raw_log_scale[0], scales, u[0]),
                           logistic_draw(mean[1], raw_log_scale[1], scales, u[1]),
                           logistic_draw(mean[2], raw_log_scale[2], scales, u[2])};
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
  const PixelTargets<float> targets(x0, x1, x2, bins);
  const ShiftedLogSumExp mix = shifted_logsumexp<kMixtures>(m, channel);
  const auto joint = [&](int k) {
    const auto term = mixture_term<false>(targets, mixture_params<float>(channel, m, k), bins, scales);
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
  const PixelTargets<float> targets(x0, x1, x2, bins);
  const ShiftedLogSumExp mix = shifted_logsumexp<kMixtures>(m, channel);
  VF_UNROLL
  for (int k = 0; k < m; ++k) {
    const auto term = mixture_term<true>(targets, mixture_params<float>(channel, m, k), bins, scales);
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
  constexpr float unit = exp_unit<float>();
  const float log_sum_units = all.log_sum * unit;
  VF_UNROLL
  for (int k = 0; k < m; ++k) {
    const float r = exp_units((joint(k) - all.shift) * unit - log_sum_units);
    channel(k) = g * (channel(k) - r);
    const float weight = -g * r;
    for (int c = 0; c < 3; ++c) {
      channel(mean_channel(m, c, k)) *= weight;
      channel(log_scale_channel(m, c, k)) *= weight;
      channel(coeff_channel(m, c, k)) *= weight;
    }
  }
}

// One pixel of reference.dmol_sample: the Gumbel-max pick of a mixture, then its logistic draws. Streams
// 0..M-1 are the Gumbel uniforms, M..M+2 the colours'; each Philox call draws four consecutive streams, so
// the group loop takes ceil((M + 3) / 4) calls (all in registers when kMixtures unrolls it).
template <int kMixtures, typename Channels, typename S>
VF_HOST_DEVICE PixelSample dmol_sample_pixel(const Channels& channel, int64_t mixtures, const S& scales, uint64_t seed,
                                             uint32_t pixel) {
  const int m = mixture_count<kMixtures>(mixtures);
  int choice = 0;
  float best = -std::numeric_limits<float>::infinity();
  float colour_u[3] = {0.0f, 0.0f, 0.0f};
  VF_UNROLL
  for (int group = 0; 4 * group < m + 3; ++group) {
    const OpenUniforms4 u = philox_open_uniforms(seed, pixel, static_cast<uint32_t>(group));
    VF_UNROLL
    for (int lane = 0; lane < 4; ++lane) {
      const int j = 4 * group + lane;
      if (j < m) {
        const float score = gumbel_score(channel(j), u.u[lane]);
        const bool replace = replaces_best(best, score);
        best = replace ? score : best;
        choice = replace ? j : choice;
      }
      // selects with constant indices: a colour index j - m would put colour_u in local memory for runtime M
      for (int c = 0; c < 3; ++c) colour_u[c] = j == m + c ? u.u[lane] : colour_u[c];
    }
  }
  ChosenMixture chosen;
  VF_UNROLL
  for (int k = 0; k < m; ++k) chosen.add(k == choice, mixture_params<float>(channel, m, k));
  return chosen.sample(scales, colour_u);
}

}  // namespace dmol
}  // namespace vdvae_fast
