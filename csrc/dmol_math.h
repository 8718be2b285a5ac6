// Discretized mixture of logistics (DMoL) math shared by the CPU and CUDA kernels.
//
// One (mixture k, colour c) term of VDVAE's distortion is log P(x_c | k): the probability of x_c's
// quantization bin under a logistic with the RGB-coupled mean and the clamped log-scale, with the
// branches of reference.dmol_nll (left/right edges, the cdf_delta > 1e-5 threshold, the log_pdf_mid
// fallback). colour_term also returns its derivatives; mixture_term adds the coupling of the means.
//
// Float exp/log/tanh on the host are branch-free polynomials with integer bit tricks, so that gcc
// vectorizes the CPU kernels' loops over a tile of pixels; double goes to libm; on CUDA float uses
// the MUFU intrinsics (made accurate to a few ulp) and libdevice. A NaN input always reaches the
// result: the clamp at -7 keeps it as torch.maximum does, and the few selects that map NaN to a
// number (an input clamp, max(v, 0)) sit beside a term that carries the NaN on.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "philox.h"

#if defined(__CUDACC__)
#define VF_DMOL_FN __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define VF_DMOL_FN inline __attribute__((always_inline))
#else
#define VF_DMOL_FN inline
#endif

namespace vdvae_fast {
namespace dmol {

constexpr double kLogScaleMin = -7.0;
constexpr double kEdge = 0.999;           // |x| beyond this is the first or last bin
constexpr double kMinCdfDelta = 1e-5;     // below it the bin mass is replaced by the density
constexpr double kSoftplusLinear = 20.0;  // torch's softplus returns x above this threshold

// ----------------------------------------------------------------------------------------------
// Host float primitives: no branches, no libm calls, NaN and +-inf handled by selects. Largest
// errors over a sweep of the floats: exp 0.8 ulp, log 0.8, log1p on [0, 1] 1.4, tanh 2.3.
// ----------------------------------------------------------------------------------------------
#if !defined(__CUDA_ARCH__)
namespace host {

VF_DMOL_FN float from_bits(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

VF_DMOL_FN int32_t to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// A fused multiply-add where the target has one (-march=native), a plain one otherwise; the
// Cody-Waite splits below stay exact without it.
VF_DMOL_FN float mul_add(float a, float b, float c) {
#if defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

constexpr float kLn2Hi = 0.693145751953125f;  // 15 significant bits: n * kLn2Hi is exact for |n| < 512
constexpr float kLn2Lo = 1.42860682030941723212e-6f;

VF_DMOL_FN float exp_poly(float x) {
  // Inputs are clamped to [-104, 89]: exp(-104) rounds to 0 and exp(89) overflows to inf in the
  // final product, so only NaN needs a select (it goes in as -104: float -> int of NaN is undefined)
  const float lo = x > -104.0f ? x : -104.0f;
  const float xc = lo < 89.0f ? lo : 89.0f;
  // x = n ln2 + r with |r| <= ln2 / 2
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  const float r = mul_add(n, -kLn2Lo, mul_add(n, -kLn2Hi, xc));
  // Taylor series of e^r to r^7: truncation below 1e-8 relative on |r| <= 0.347
  float p = 1.0f / 5040.0f;
  p = mul_add(p, r, 1.0f / 720.0f);
  p = mul_add(p, r, 1.0f / 120.0f);
  p = mul_add(p, r, 1.0f / 24.0f);
  p = mul_add(p, r, 1.0f / 6.0f);
  p = mul_add(p, r, 0.5f);
  p = mul_add(p, r, 1.0f);
  p = mul_add(p, r, 1.0f);
  // 2^n in two factors so that n in [-150, 129] never leaves the normal exponent range
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni >> 1;
  const float result = p * from_bits((n1 + 127) << 23) * from_bits((ni - n1 + 127) << 23);
  return x == x ? result : x;
}

// x = 2^e (1 + f) with 1 + f in (sqrt(1/2), sqrt(2)], for x > 0 (subnormals included)
VF_DMOL_FN void split_log_arg(float x, float& e, float& f) {
  constexpr float kMinNormal = 1.17549435e-38f;
  const bool subnormal = x < kMinNormal;
  const int32_t bits = to_bits(subnormal ? x * 8388608.0f : x);  // 2^23 lifts subnormals
  const float m = from_bits((bits & 0x007fffff) | 0x3f800000);   // [1, 2)
  const bool high = m > 1.41421356f;
  f = (high ? 0.5f * m : m) - 1.0f;  // exact
  e = static_cast<float>(((bits >> 23) & 0xff) - 127 - (subnormal ? 23 : 0) + (high ? 1 : 0));
}

// log(2^e (1 + f)) for f in [sqrt(1/2) - 1, sqrt(2) - 1]: log(1 + f) = 2 atanh(s), s = f / (2 + f),
// written as f - (f^2/2 - s (f^2/2 + R)) so that the exact f carries the leading bits; the series
// R = sum 2 s^2j / (2j + 1) to j = 5 leaves < 1e-9
VF_DMOL_FN float log_reduced(float e, float f) {
  const float s = f / (2.0f + f);
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

// log(x) from its finite-positive value: -inf at 0, NaN below 0 and for NaN, inf at inf
VF_DMOL_FN float log_special_cases(float x, float finite_positive) {
  const float special =
      x == 0.0f ? -std::numeric_limits<float>::infinity() : (x < 0.0f ? std::numeric_limits<float>::quiet_NaN() : x);
  return ((x > 0.0f) & (x < std::numeric_limits<float>::infinity())) ? finite_positive : special;
}

VF_DMOL_FN float log_poly(float x) {
  float e, f;
  split_log_arg(x, e, f);
  return log_special_cases(x, log_reduced(e, f));
}

VF_DMOL_FN float tanh_poly(float x) {
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

// plain ? log(v) : log1p(v) with one logarithm. log1p takes v in [0, 1] (or NaN), which is all the
// callers pass: 1 + v = 2^e (1 + f) with f = v or (v - 1) / 2 formed without rounding 1 + v.
VF_DMOL_FN float log_or_log1p_poly(bool plain, float v) {
  float e, f;
  split_log_arg(v, e, f);
  const bool wide = v > 0.41421356f;
  const float log_value = log_reduced(plain ? e : (wide ? 1.0f : 0.0f), plain ? f : (wide ? 0.5f * (v - 1.0f) : v));
  return plain ? log_special_cases(v, log_value) : log_value;
}

}  // namespace host
#endif  // !__CUDA_ARCH__

// ----------------------------------------------------------------------------------------------
// Primitives for the math dtype T (float or double)
// ----------------------------------------------------------------------------------------------
#if defined(__CUDA_ARCH__)
constexpr float kLog2eF = 1.44269504088896341f;
constexpr float kLog2eLoF = 1.925963033500011e-8f;  // log2(e) - kLog2eF
constexpr float kLn2F = 0.693147180559945309f;
#endif

VF_DMOL_FN float vf_exp(float x) {
#if defined(__CUDA_ARCH__)
  // ex2.approx of the rounded product t = x log2(e), corrected by the product's rounding error:
  // a few ulp for every x, where __expf loses |x| ulp
  const float t = x * kLog2eF;
  const float t_err = fmaf(x, kLog2eF, -t) + x * kLog2eLoF;
  const float p = exp2f(t);
  return fabsf(x) < 87.0f ? fmaf(p, t_err * kLn2F, p) : p;
#else
  return host::exp_poly(x);
#endif
}

VF_DMOL_FN double vf_exp(double x) { return ::exp(x); }

VF_DMOL_FN float vf_log(float x) {
#if defined(__CUDA_ARCH__)
  // __logf's error is absolute near 1, where log1pf of the exact x - 1 stays relative
  return (x >= 0.5f && x <= 2.0f) ? log1pf(x - 1.0f) : __logf(x);
#else
  return host::log_poly(x);
#endif
}

VF_DMOL_FN double vf_log(double x) { return ::log(x); }

// plain ? log(v) : log1p(v): the one logarithm of colour_term, whichever branch it serves
VF_DMOL_FN float log_or_log1p(bool plain, float v) {
#if defined(__CUDA_ARCH__)
  return plain ? vf_log(v) : log1pf(v);
#else
  return host::log_or_log1p_poly(plain, v);
#endif
}

VF_DMOL_FN double log_or_log1p(bool plain, double v) { return plain ? ::log(v) : ::log1p(v); }

VF_DMOL_FN float vf_tanh(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  return host::tanh_poly(x);
#endif
}

VF_DMOL_FN double vf_tanh(double x) { return ::tanh(x); }

template <typename T>
VF_DMOL_FN T abs_of(T v) {
  return v < T(0) ? -v : v;
}

// max(v, 0) and min(v, 0); a NaN v gives 0, which callers only use next to a NaN term
template <typename T>
VF_DMOL_FN T positive_part(T v) {
  return v > T(0) ? v : T(0);
}

template <typename T>
VF_DMOL_FN T negative_part(T v) {
  return v < T(0) ? v : T(0);
}

// ----------------------------------------------------------------------------------------------
// The DMoL
// ----------------------------------------------------------------------------------------------

// Channel layout of the (B, 10M, H, W) logits: [0, M) mixture logits, then per colour c a block of
// 3M channels at M + 3Mc: M means, M raw log-scales, M raw coupling coefficients.
VF_DMOL_FN int64_t mean_channel(int64_t mixtures, int colour, int64_t k) { return mixtures * (1 + 3 * colour) + k; }

VF_DMOL_FN int64_t log_scale_channel(int64_t mixtures, int colour, int64_t k) {
  return mixtures * (2 + 3 * colour) + k;
}

VF_DMOL_FN int64_t coeff_channel(int64_t mixtures, int colour, int64_t k) { return mixtures * (3 + 3 * colour) + k; }

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

template <typename T>
struct ColourTerm {
  T log_prob;
  T d_mean;       // d log_prob / d (coupled) mean
  T d_log_scale;  // d log_prob / d raw log-scale channel, through the clamp at -7
};

// log P(x | mean, log_scale) of x's bin, as reference.dmol_nll's torch.where chain chooses it:
//   x < -0.999: log sigmoid(plus_in) = plus_in - softplus(plus_in)
//   x >  0.999: -softplus(min_in)
//   else cdf_delta = sigmoid(plus_in) - sigmoid(min_in); log(cdf_delta) if cdf_delta > 1e-5,
//        else mid_in - log_scale - 2 softplus(mid_in) - log_bins (a NaN cdf_delta also lands here)
// softplus(v) = v > 20 ? v : max(v, 0) + log1p(exp(-|v|)); every branch needs one logarithm, of the
// selected argument. The derivatives are those of autograd through the chosen branch.
template <bool kGrad, typename T>
VF_DMOL_FN ColourTerm<T> colour_term(T x, T mean, T raw_log_scale, const Bins<T>& bins) {
  const T log_scale = raw_log_scale < T(kLogScaleMin) ? T(kLogScaleMin) : raw_log_scale;
  const T inv_stdv = vf_exp(-log_scale);
  const T centered = x - mean;
  const T plus_in = inv_stdv * (centered + bins.half_width);
  const T min_in = inv_stdv * (centered - bins.half_width);
  const T mid_in = inv_stdv * centered;
  // sigmoid(v) from e = exp(-|v|) and q = 1 / (1 + e): q for v >= 0, e q below, never 1 - tiny
  const T e_plus = vf_exp(-abs_of(plus_in));
  const T e_min = vf_exp(-abs_of(min_in));
  const T e_mid = vf_exp(-abs_of(mid_in));
  const T q_plus = T(1) / (T(1) + e_plus);
  const T q_min = T(1) / (T(1) + e_min);
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
  const T log_value = log_or_log1p(use_delta, log_arg);
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
    const T inv_delta = T(1) / cdf_delta;
    const T d_plus_delta = cdf_plus * (T(1) - cdf_plus) * inv_delta;
    const T d_min_delta = -(cdf_min * (T(1) - cdf_min) * inv_delta);
    const T q_mid = T(1) / (T(1) + e_mid);
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
    // torch.maximum's gradient: 1 above the floor, 1/2 at it, 0 below
    const T at_floor = raw_log_scale == T(kLogScaleMin) ? T(0.5) : T(0);
    const T clamp_grad = raw_log_scale > T(kLogScaleMin) ? T(1) : at_floor;
    term.d_log_scale = d_log_scale * clamp_grad;
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
template <bool kGrad, typename T>
VF_DMOL_FN MixtureTerm<T> mixture_term(T x0, T x1, T x2, const MixtureParams<T>& p, const Bins<T>& bins) {
  const T c0 = vf_tanh(p.raw_coeff[0]);
  const T c1 = vf_tanh(p.raw_coeff[1]);
  const T c2 = vf_tanh(p.raw_coeff[2]);
  const ColourTerm<T> r = colour_term<kGrad>(x0, p.mean[0], p.raw_log_scale[0], bins);
  const ColourTerm<T> g = colour_term<kGrad>(x1, p.mean[1] + c0 * x0, p.raw_log_scale[1], bins);
  const ColourTerm<T> b = colour_term<kGrad>(x2, p.mean[2] + c1 * x0 + c2 * x1, p.raw_log_scale[2], bins);
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

  VF_DMOL_FN void push(T v) {
    if (v > max) {
      sum = sum * vf_exp(max - v) + T(1);
      max = v;
    } else {
      sum += v == max ? T(1) : vf_exp(v - max);
    }
  }
  VF_DMOL_FN T log_sum() const { return vf_log(sum); }
  VF_DMOL_FN T value() const { return max + log_sum(); }
};

// ----------------------------------------------------------------------------------------------
// dmol_sample
// ----------------------------------------------------------------------------------------------

struct PixelSample {
  float x[3];
};

template <typename T>
VF_DMOL_FN T clamp_unit(T v) {
  return v < T(-1) ? T(-1) : (v > T(1) ? T(1) : v);
}

// Mixture k's Gumbel-perturbed logit at a pixel; its noise is Philox stream k
VF_DMOL_FN float gumbel_score(float logit, uint64_t seed, uint32_t pixel, uint32_t k) {
  const float u = philox_open_uniform(seed, pixel, k);
  return logit - vf_log(-vf_log(u));
}

// Whether mixture k's score replaces the best of mixtures < k in the Gumbel-max pick, starting from
// best = -inf and choice 0: torch.argmax keeps the first maximum and treats NaN as the largest value
VF_DMOL_FN bool replaces_best(float best, float score) { return (best == best) & ((score > best) | (score != score)); }

// mean + exp(max(raw_log_scale, -7)) * logit(u), u from Philox stream `stream`
VF_DMOL_FN float logistic_draw(float mean, float raw_log_scale, uint64_t seed, uint32_t pixel, uint32_t stream) {
  const float log_scale = raw_log_scale < float(kLogScaleMin) ? float(kLogScaleMin) : raw_log_scale;
  const float u = philox_open_uniform(seed, pixel, stream);
  return mean + vf_exp(log_scale) * (vf_log(u) - vf_log(1.0f - u));
}

// NaN for a NaN v, else 0
VF_DMOL_FN float nan_part(float v) { return v == v ? 0.0f : v; }

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

  VF_DMOL_FN void add(bool chosen, const MixtureParams<float>& p) {
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
  VF_DMOL_FN PixelSample sample(int64_t mixtures, uint64_t seed, uint32_t pixel) const {
    const uint32_t stream = static_cast<uint32_t>(mixtures);
    const float draw[3] = {logistic_draw(mean[0], raw_log_scale[0], seed, pixel, stream),
                           logistic_draw(mean[1], raw_log_scale[1], seed, pixel, stream + 1),
                           logistic_draw(mean[2], raw_log_scale[2], seed, pixel, stream + 2)};
    PixelSample out;
    out.x[0] = clamp_unit(draw[0]);
    out.x[1] = clamp_unit(draw[1] + vf_tanh(raw_coeff[0]) * out.x[0]);
    out.x[2] = clamp_unit(draw[2] + vf_tanh(raw_coeff[1]) * out.x[0] + vf_tanh(raw_coeff[2]) * out.x[1]);
    return out;
  }
};

// Mixture k's 9 parameters at a pixel; load(ch) returns channel ch of the pixel as float
template <typename Load>
VF_DMOL_FN MixtureParams<float> mixture_params(const Load& load, int64_t mixtures, int64_t k) {
  MixtureParams<float> p;
  for (int c = 0; c < 3; ++c) {
    p.mean[c] = load(mean_channel(mixtures, c, k));
    p.raw_log_scale[c] = load(log_scale_channel(mixtures, c, k));
    p.raw_coeff[c] = load(coeff_channel(mixtures, c, k));
  }
  return p;
}

// One pixel of reference.dmol_sample in float32 (the CUDA kernel; the CPU kernel runs the same steps
// over tiles of pixels).
template <typename Load>
VF_DMOL_FN PixelSample sample_pixel(const Load& load, int64_t mixtures, uint64_t seed, uint32_t pixel) {
  int64_t choice = 0;
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < mixtures; ++k) {
    const float score = gumbel_score(load(k), seed, pixel, static_cast<uint32_t>(k));
    if (replaces_best(best, score)) {
      best = score;
      choice = k;
    }
  }
  ChosenMixture chosen;
  for (int64_t k = 0; k < mixtures; ++k) chosen.add(k == choice, mixture_params(load, mixtures, k));
  return chosen.sample(mixtures, seed, pixel);
}

}  // namespace dmol
}  // namespace vdvae_fast
