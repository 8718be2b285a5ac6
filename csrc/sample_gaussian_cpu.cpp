// CPU kernels of sample_gaussian: VDVAE's prior sampling at temperature t, z = mu + t·sigma·eps, and its
// gradients. eps comes from (seed, logical index) in forward and is regenerated in backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "gaussian_math.h"
#include "kernel_checks.h"

namespace vdvae_fast {
namespace {

constexpr int kTile = 256;        // elements per stack-buffered tile of eps
constexpr int64_t kGrain = 8192;  // Philox makes each element costly: split work finer than ATen's default

// The math of one tile on opmath arrays. Restrict pointers are what lets gcc vectorize: through the
// kernels' lambda captures it would have to prove that the arrays do not overlap, and gives up.
// VF_VECTOR_LOOP inlines the math functions into the loop.
template <typename T>
VF_VECTOR_LOOP void forward_tile(const T* __restrict__ mu, const T* __restrict__ logsigma,
                                 const float* __restrict__ eps, T* __restrict__ z, T temperature, int count) {
  for (int k = 0; k < count; ++k) z[k] = gaussian::sample(mu[k], logsigma[k], temperature, eps[k]);
}

template <typename T>
VF_VECTOR_LOOP void backward_tile(const T* __restrict__ grad_z, const T* __restrict__ logsigma,
                                  const float* __restrict__ eps, T* __restrict__ g_logsigma, T temperature, int count) {
  for (int k = 0; k < count; ++k)
    g_logsigma[k] = gaussian::sample_grad_logsigma(grad_z[k], logsigma[k], temperature, eps[k]);
}

template <typename scalar_t>
void forward_parallel(const scalar_t* mu, const scalar_t* logsigma, scalar_t* z, int64_t numel, double temperature,
                      gaussian::DenseLayout layout, uint64_t seed) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto t = static_cast<opmath_t>(temperature);
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) float eps[kTile];
    alignas(64) uint32_t index[kTile];
    gaussian::Staging<scalar_t, opmath_t, 3, kTile> tile;
    for (int64_t start = begin; start < end; start += kTile) {
      const int count = static_cast<int>(std::min<int64_t>(kTile, end - start));
      gaussian::fill_eps(eps, index, static_cast<uint32_t>(start), count, seed, layout);
      forward_tile(tile.load(mu + start, 0, count), tile.load(logsigma + start, 1, count), eps,
                   tile.output(z + start, 2), t, count);
      tile.store(z + start, 2, count);
    }
  });
}

// ∂z/∂mu = 1: grad_mu is grad_z itself, copied (the dtypes agree).
template <typename scalar_t>
void backward_parallel(const scalar_t* grad_z, const scalar_t* logsigma, scalar_t* g_mu, scalar_t* g_logsigma,
                       int64_t numel, double temperature, gaussian::DenseLayout layout, uint64_t seed) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto t = static_cast<opmath_t>(temperature);
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) float eps[kTile];
    alignas(64) uint32_t index[kTile];
    gaussian::Staging<scalar_t, opmath_t, 3, kTile> tile;
    std::copy(grad_z + begin, grad_z + end, g_mu + begin);
    for (int64_t start = begin; start < end; start += kTile) {
      const int count = static_cast<int>(std::min<int64_t>(kTile, end - start));
      gaussian::fill_eps(eps, index, static_cast<uint32_t>(start), count, seed, layout);
      backward_tile(tile.load(grad_z + start, 0, count), tile.load(logsigma + start, 1, count), eps,
                    tile.output(g_logsigma + start, 2), t, count);
      tile.store(g_logsigma + start, 2, count);
    }
  });
}

at::Tensor sample_gaussian_forward_cpu(const at::Tensor& mu, const at::Tensor& logsigma, double temperature,
                                       int64_t seed) {
  check_dense(mu, "sample_gaussian");
  at::Tensor z = at::empty_like(mu);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "sample_gaussian_forward_cpu", [&] {
    forward_parallel<scalar_t>(mu.data_ptr<scalar_t>(), logsigma.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                               mu.numel(), temperature, gaussian::layout_of(mu), static_cast<uint64_t>(seed));
  });
  return z;
}

std::tuple<at::Tensor, at::Tensor> sample_gaussian_backward_cpu(const at::Tensor& grad_z, const at::Tensor& mu,
                                                                const at::Tensor& logsigma, double temperature,
                                                                int64_t seed) {
  check_dense(mu, "sample_gaussian");
  at::Tensor g_mu = at::empty_like(mu), g_logsigma = at::empty_like(logsigma);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "sample_gaussian_backward_cpu", [&] {
    backward_parallel<scalar_t>(grad_z.data_ptr<scalar_t>(), logsigma.data_ptr<scalar_t>(), g_mu.data_ptr<scalar_t>(),
                                g_logsigma.data_ptr<scalar_t>(), mu.numel(), temperature, gaussian::layout_of(mu),
                                static_cast<uint64_t>(seed));
  });
  return {g_mu, g_logsigma};
}

}  // namespace

TORCH_LIBRARY_IMPL(vdvae_fast_C, CPU, m) {
  m.impl("sample_gaussian_forward", &sample_gaussian_forward_cpu);
  m.impl("sample_gaussian_backward", &sample_gaussian_backward_cpu);
}

}  // namespace vdvae_fast
