// CPU kernels of gaussian_kl: the elementwise rate KL(q‖p) of VDVAE's diagonal Gaussians and its gradients,
// in every parametrization (gaussian_math.h), one instantiation of the loops per parametrization.
//
// No randomness and no reduction, and all tensors share one dense layout, so both kernels run over flat
// memory in order, split across threads by at::parallel_for.
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

constexpr int kTile = 256;  // elements per stack-buffered tile (half-precision inputs are widened per tile)
constexpr int64_t kGrain = 32768;

// The math of one tile on opmath arrays. Restrict pointers are what lets gcc vectorize: through the
// kernels' lambda captures it would have to prove that the arrays do not overlap, and gives up.
// VF_VECTOR_LOOP inlines the math functions into the loop.
template <typename F, typename T>
VF_VECTOR_LOOP void forward_tile(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ mu_p,
                                 const T* __restrict__ raw_p, T* __restrict__ kl, int count,
                                 gaussian::ScaleConstants<T> constants) {
  for (int k = 0; k < count; ++k) kl[k] = gaussian::gaussian_kl<F>(a[k], b[k], mu_p[k], raw_p[k], constants);
}

template <typename F, typename T>
VF_VECTOR_LOOP void backward_tile(const T* __restrict__ grad_kl, const T* __restrict__ a, const T* __restrict__ b,
                                  const T* __restrict__ mu_p, const T* __restrict__ raw_p, T* __restrict__ g_a,
                                  T* __restrict__ g_b, T* __restrict__ g_mu_p, T* __restrict__ g_raw_p, int count,
                                  gaussian::ScaleConstants<T> constants) {
  for (int k = 0; k < count; ++k) {
    const gaussian::InputGrads<T> d =
        gaussian::gaussian_kl_grads<F>(grad_kl[k], a[k], b[k], mu_p[k], raw_p[k], constants);
    g_a[k] = d.a;
    g_b[k] = d.b;
    g_mu_p[k] = d.mu_p;
    g_raw_p[k] = d.raw_p;
  }
}

template <typename scalar_t, typename F>
void forward_parallel(const scalar_t* mu_q, const scalar_t* logsigma_q, const scalar_t* mu_p,
                      const scalar_t* logsigma_p, at::opmath_type<scalar_t>* kl, int64_t numel, double beta) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto constants = gaussian::ScaleConstants<opmath_t>::of(beta);
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    gaussian::Staging<scalar_t, opmath_t, 4, kTile> tile;
    for (int64_t start = begin; start < end; start += kTile) {
      const int count = static_cast<int>(std::min<int64_t>(kTile, end - start));
      forward_tile<F>(tile.load(mu_q + start, 0, count), tile.load(logsigma_q + start, 1, count),
                      tile.load(mu_p + start, 2, count), tile.load(logsigma_p + start, 3, count), kl + start, count,
                      constants);
    }
  });
}

template <typename scalar_t, typename F>
void backward_parallel(const at::opmath_type<scalar_t>* grad_kl, const scalar_t* mu_q, const scalar_t* logsigma_q,
                       const scalar_t* mu_p, const scalar_t* logsigma_p, scalar_t* g_mu_q, scalar_t* g_logsigma_q,
                       scalar_t* g_mu_p, scalar_t* g_logsigma_p, int64_t numel, double beta) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto constants = gaussian::ScaleConstants<opmath_t>::of(beta);
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    gaussian::Staging<scalar_t, opmath_t, 8, kTile> tile;
    for (int64_t start = begin; start < end; start += kTile) {
      const int count = static_cast<int>(std::min<int64_t>(kTile, end - start));
      backward_tile<F>(grad_kl + start, tile.load(mu_q + start, 0, count), tile.load(logsigma_q + start, 1, count),
                       tile.load(mu_p + start, 2, count), tile.load(logsigma_p + start, 3, count),
                       tile.output(g_mu_q + start, 4), tile.output(g_logsigma_q + start, 5),
                       tile.output(g_mu_p + start, 6), tile.output(g_logsigma_p + start, 7), count, constants);
      tile.store(g_mu_q + start, 4, count);
      tile.store(g_logsigma_q + start, 5, count);
      tile.store(g_mu_p + start, 6, count);
      tile.store(g_logsigma_p + start, 7, count);
    }
  });
}

at::Tensor gaussian_kl_forward_cpu(const at::Tensor& mu_q, const at::Tensor& logsigma_q, const at::Tensor& mu_p,
                                   const at::Tensor& logsigma_p, int64_t scale, double beta, int64_t posterior) {
  check_dense(mu_q, "gaussian_kl");
  at::Tensor kl =
      at::empty_like(mu_q, mu_q.options().dtype(mu_q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  gaussian::with_form(scale, posterior, beta, "gaussian_kl", [&](auto form) {
    using F = decltype(form);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu_q.scalar_type(), "gaussian_kl_forward_cpu", [&] {
      forward_parallel<scalar_t, F>(mu_q.data_ptr<scalar_t>(), logsigma_q.data_ptr<scalar_t>(),
                                    mu_p.data_ptr<scalar_t>(), logsigma_p.data_ptr<scalar_t>(),
                                    kl.data_ptr<at::opmath_type<scalar_t>>(), mu_q.numel(), beta);
    });
  });
  return kl;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_kl_backward_cpu(const at::Tensor& grad_kl,
                                                                                    const at::Tensor& mu_q,
                                                                                    const at::Tensor& logsigma_q,
                                                                                    const at::Tensor& mu_p,
                                                                                    const at::Tensor& logsigma_p,
                                                                                    int64_t scale, double beta,
                                                                                    int64_t posterior) {
  check_dense(mu_q, "gaussian_kl");
  at::Tensor g_mu_q = at::empty_like(mu_q), g_logsigma_q = at::empty_like(logsigma_q);
  at::Tensor g_mu_p = at::empty_like(mu_p), g_logsigma_p = at::empty_like(logsigma_p);
  gaussian::with_form(scale, posterior, beta, "gaussian_kl", [&](auto form) {
    using F = decltype(form);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu_q.scalar_type(), "gaussian_kl_backward_cpu", [&] {
      backward_parallel<scalar_t, F>(grad_kl.data_ptr<at::opmath_type<scalar_t>>(), mu_q.data_ptr<scalar_t>(),
                                     logsigma_q.data_ptr<scalar_t>(), mu_p.data_ptr<scalar_t>(),
                                     logsigma_p.data_ptr<scalar_t>(), g_mu_q.data_ptr<scalar_t>(),
                                     g_logsigma_q.data_ptr<scalar_t>(), g_mu_p.data_ptr<scalar_t>(),
                                     g_logsigma_p.data_ptr<scalar_t>(), mu_q.numel(), beta);
    });
  });
  return {g_mu_q, g_logsigma_q, g_mu_p, g_logsigma_p};
}

}  // namespace

TORCH_LIBRARY_IMPL(vdvae_fast_C, CPU, m) {
  m.impl("gaussian_kl_forward", &gaussian_kl_forward_cpu);
  m.impl("gaussian_kl_backward", &gaussian_kl_backward_cpu);
}

}  // namespace vdvae_fast
