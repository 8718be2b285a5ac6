// CPU kernels of sample_gaussian: VDVAE's prior sampling at temperature t, z = mu + t·sigma·eps with
// sigma = exp(raw) or softplus_beta(raw), and its gradients. eps comes from (seed, logical index) in forward
// and is regenerated in backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "gaussian_math.h"
#include "gaussian_parametrization.h"
#include "kernel_checks.h"

namespace vdvae_fast {
namespace {

constexpr int kTile = 1024;  // elements per stack-buffered tile of eps: a smaller one pays drawing's setup more often
constexpr int64_t kGrain = 8192;  // Philox makes each element costly: split work finer than ATen's default

// The math of one tile on opmath arrays. Restrict pointers are what lets gcc vectorize: through the
// kernels' lambda captures it would have to prove that the arrays do not overlap, and gives up.
// VF_VECTOR_LOOP inlines the math functions into the loop.
template <typename F, typename T>
VF_VECTOR_LOOP void forward_tile(const T* __restrict__ mu, const T* __restrict__ raw, const float* __restrict__ eps,
                                 T* __restrict__ z, T temperature, int count, gaussian::ScaleConstants<T> constants) {
  for (int k = 0; k < count; ++k) z[k] = gaussian::sample_gaussian<F>(mu[k], raw[k], temperature, eps[k], constants);
}

template <typename F, typename T>
VF_VECTOR_LOOP void backward_tile(const T* __restrict__ grad_z, const T* __restrict__ raw,
                                  const float* __restrict__ eps, T* __restrict__ g_raw, T temperature, int count,
                                  gaussian::ScaleConstants<T> constants) {
  for (int k = 0; k < count; ++k)
    g_raw[k] = gaussian::sample_gaussian_grad_raw<F>(grad_z[k], raw[k], temperature, eps[k], constants);
}

template <typename scalar_t, typename F>
void forward_parallel(const scalar_t* mu, const scalar_t* logsigma, scalar_t* z, int64_t numel, double temperature,
                      gaussian::DenseLayout layout, uint64_t seed, double beta) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto t = static_cast<opmath_t>(temperature);
  const auto constants = gaussian::ScaleConstants<opmath_t>::of(beta);
  const int64_t unit = gaussian::work_alignment(layout);
  at::parallel_for(0, numel / unit, std::max<int64_t>(1, kGrain / unit), [&](int64_t first, int64_t last) {
    gaussian::Staging<scalar_t, opmath_t, 3, kTile> tile;
    gaussian::for_each_eps_tile<kTile>(first * unit, last * unit, seed, layout,
                                       [&](int64_t start, int count, const float* eps) {
                                         forward_tile<F>(tile.load(mu + start, 0, count),
                                                         tile.load(logsigma + start, 1, count), eps,
                                                         tile.output(z + start, 2), t, count, constants);
                                         tile.store(z + start, 2, count);
                                       });
  });
}

// grad_logsigma only: ∂z/∂mu = 1, so grad_mu is grad_z itself, which the autograd formula passes through.
template <typename scalar_t, typename F>
void backward_parallel(const scalar_t* grad_z, const scalar_t* logsigma, scalar_t* g_logsigma,
                       int64_t numel, double temperature, gaussian::DenseLayout layout, uint64_t seed, double beta) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto t = static_cast<opmath_t>(temperature);
  const auto constants = gaussian::ScaleConstants<opmath_t>::of(beta);
  const int64_t unit = gaussian::work_alignment(layout);
  at::parallel_for(0, numel / unit, std::max<int64_t>(1, kGrain / unit), [&](int64_t first, int64_t last) {
    gaussian::Staging<scalar_t, opmath_t, 3, kTile> tile;
    gaussian::for_each_eps_tile<kTile>(first * unit, last * unit, seed, layout,
                                       [&](int64_t start, int count, const float* eps) {
                                         backward_tile<F>(tile.load(grad_z + start, 0, count),
                                                          tile.load(logsigma + start, 1, count), eps,
                                                          tile.output(g_logsigma + start, 2), t, count, constants);
                                         tile.store(g_logsigma + start, 2, count);
                                       });
  });
}

at::Tensor sample_gaussian_forward_cpu(const at::Tensor& mu, const at::Tensor& logsigma, double temperature,
                                       int64_t seed, int64_t scale, double beta) {
  check_dense(mu, "sample_gaussian");
  at::Tensor z = at::empty_like(mu);
  gaussian::with_form(scale, beta, "sample_gaussian", [&](auto form) {
    using F = decltype(form);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "sample_gaussian_forward_cpu", [&] {
      forward_parallel<scalar_t, F>(mu.data_ptr<scalar_t>(), logsigma.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                    mu.numel(), temperature, gaussian::layout_of(mu), static_cast<uint64_t>(seed),
                                    beta);
    });
  });
  return z;
}

at::Tensor sample_gaussian_backward_cpu(const at::Tensor& grad_z, const at::Tensor& mu, const at::Tensor& logsigma,
                                        double temperature, int64_t seed, int64_t scale, double beta) {
  check_dense(mu, "sample_gaussian");
  at::Tensor g_logsigma = at::empty_like(logsigma);
  gaussian::with_form(scale, beta, "sample_gaussian", [&](auto form) {
    using F = decltype(form);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "sample_gaussian_backward_cpu", [&] {
      backward_parallel<scalar_t, F>(grad_z.data_ptr<scalar_t>(), logsigma.data_ptr<scalar_t>(),
                                     g_logsigma.data_ptr<scalar_t>(), mu.numel(), temperature,
                                     gaussian::layout_of(mu), static_cast<uint64_t>(seed), beta);
    });
  });
  return g_logsigma;
}

}  // namespace

TORCH_LIBRARY_IMPL(vdvae_fast_C, CPU, m) {
  m.impl("sample_gaussian_forward", &sample_gaussian_forward_cpu);
  m.impl("sample_gaussian_backward", &sample_gaussian_backward_cpu);
}

}  // namespace vdvae_fast
