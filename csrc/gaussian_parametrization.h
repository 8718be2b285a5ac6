// The Gaussian ops' parametrization arguments (the indices ops.py passes for reference.SCALES, POSTERIORS and
// KL_ESTIMATORS, and the softplus beta), checked and turned into a gaussian::Form type once per call, outside
// the kernels' loops. Shared by the CPU and CUDA files.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "gaussian_math.h"

namespace vdvae_fast {
namespace gaussian {

template <typename Enum, Enum kValue>
using Code = std::integral_constant<Enum, kValue>;

template <typename Body>
void with_scale(int64_t scale, double beta, const char* op, Body&& body) {
  TORCH_CHECK(scale == 0 || scale == 1, op, ": scale must be 0 (exp) or 1 (softplus), got ", scale);
  TORCH_CHECK(std::isfinite(beta) && beta > 0.0, op, ": beta (the softplus sharpness) must be finite and > 0, got ",
              beta);
  if (scale == 0) {
    body(Code<Scale, Scale::kExp>());
  } else {
    body(Code<Scale, Scale::kSoftplus>());
  }
}

template <typename Body>
void with_posterior(int64_t posterior, const char* op, Body&& body) {
  TORCH_CHECK(posterior >= 0 && posterior <= 2, op,
              ": posterior must be 0 (direct), 1 (residual) or 2 (precision_weighted), got ", posterior);
  if (posterior == 0) {
    body(Code<Posterior, Posterior::kDirect>());
  } else if (posterior == 1) {
    body(Code<Posterior, Posterior::kResidual>());
  } else {
    body(Code<Posterior, Posterior::kPrecisionWeighted>());
  }
}

template <typename Body>
void with_estimator(int64_t kl_estimator, const char* op, Body&& body) {
  TORCH_CHECK(kl_estimator == 0 || kl_estimator == 1, op, ": kl_estimator must be 0 (analytic) or 1 (sampled), got ",
              kl_estimator);
  if (kl_estimator == 0) {
    body(Code<KlEstimator, KlEstimator::kAnalytic>());
  } else {
    body(Code<KlEstimator, KlEstimator::kSampled>());
  }
}

// Calls body(Form<...>()) for the parametrization the codes name: sample_and_kl's (every code), gaussian_kl's
// (no estimator: analytic) and sample_gaussian's (the scale only), each instantiating only the forms it can run.
template <typename Body>
void with_form(int64_t scale, int64_t posterior, int64_t kl_estimator, double beta, const char* op, Body&& body) {
  with_scale(scale, beta, op, [&](auto s) {
    with_posterior(posterior, op, [&](auto p) {
      with_estimator(kl_estimator, op,
                     [&](auto e) { body(Form<decltype(s)::value, decltype(p)::value, decltype(e)::value>()); });
    });
  });
}

template <typename Body>
void with_form(int64_t scale, int64_t posterior, double beta, const char* op, Body&& body) {
  with_scale(scale, beta, op, [&](auto s) {
    with_posterior(posterior, op, [&](auto p) { body(Form<decltype(s)::value, decltype(p)::value>()); });
  });
}

template <typename Body>
void with_form(int64_t scale, double beta, const char* op, Body&& body) {
  with_scale(scale, beta, op, [&](auto s) { body(Form<decltype(s)::value>()); });
}

}  // namespace gaussian
}  // namespace vdvae_fast
