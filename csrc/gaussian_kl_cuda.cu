// CUDA kernels of gaussian_kl: the elementwise rate KL(q‖p) of VDVAE's diagonal Gaussians and its gradients,
// in every parametrization (one instantiation each; the per-packet bodies are gaussian_packets.h's).
//
// Grid-stride loops over flat memory (all tensors share one dense layout), 16-byte packets when every
// pointer is aligned and the size divides, single elements otherwise.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "gaussian_cuda.cuh"
#include "gaussian_packets.h"
#include "gaussian_parametrization.h"

namespace vdvae_fast {
namespace {

using gaussian::grid_for;
using gaussian::kThreads;

template <typename F, typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    gaussian_kl_forward_kernel(const scalar_t* __restrict__ mu_q, const scalar_t* __restrict__ logsigma_q,
                               const scalar_t* __restrict__ mu_p, const scalar_t* __restrict__ logsigma_p,
                               at::opmath_type<scalar_t>* __restrict__ kl, int64_t packets,
                               gaussian::ScaleConstants<at::opmath_type<scalar_t>> constants) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; p < packets;
       p += static_cast<int64_t>(gridDim.x) * kThreads) {
    gaussian::gaussian_kl_forward_packet<F, kVec>(mu_q, logsigma_q, mu_p, logsigma_p, kl, p, constants);
  }
}

template <typename F, typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    gaussian_kl_backward_kernel(const at::opmath_type<scalar_t>* __restrict__ grad_kl,
                                const scalar_t* __restrict__ mu_q, const scalar_t* __restrict__ logsigma_q,
                                const scalar_t* __restrict__ mu_p, const scalar_t* __restrict__ logsigma_p,
                                scalar_t* __restrict__ g_mu_q, scalar_t* __restrict__ g_logsigma_q,
                                scalar_t* __restrict__ g_mu_p, scalar_t* __restrict__ g_logsigma_p, int64_t packets,
                                gaussian::ScaleConstants<at::opmath_type<scalar_t>> constants) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; p < packets;
       p += static_cast<int64_t>(gridDim.x) * kThreads) {
    gaussian::gaussian_kl_backward_packet<F, kVec>(grad_kl, mu_q, logsigma_q, mu_p, logsigma_p, g_mu_q, g_logsigma_q,
                                                   g_mu_p, g_logsigma_p, p, constants);
  }
}

at::Tensor gaussian_kl_forward_cuda(const at::Tensor& mu_q, const at::Tensor& logsigma_q, const at::Tensor& mu_p,
                                    const at::Tensor& logsigma_p, int64_t scale, double beta, int64_t posterior) {
  check_dense(mu_q, "gaussian_kl");
  const c10::cuda::OptionalCUDAGuard device_guard(mu_q.device());
  at::Tensor kl =
      at::empty_like(mu_q, mu_q.options().dtype(mu_q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  const int64_t numel = mu_q.numel();
  if (numel == 0) return kl;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  gaussian::with_form(scale, posterior, beta, "gaussian_kl", [&](auto form) {
    using F = decltype(form);
    VF_DISPATCH_CUDA_FLOAT_TYPES(mu_q.scalar_type(), "gaussian_kl_forward_cuda", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const auto launch = [&](auto vec) {
        constexpr int kVec = decltype(vec)::value;
        gaussian_kl_forward_kernel<F, scalar_t, kVec><<<grid_for(numel / kVec), kThreads, 0, stream>>>(
            mu_q.data_ptr<scalar_t>(), logsigma_q.data_ptr<scalar_t>(), mu_p.data_ptr<scalar_t>(),
            logsigma_p.data_ptr<scalar_t>(), kl.data_ptr<opmath_t>(), numel / kVec,
            gaussian::ScaleConstants<opmath_t>::of(beta));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      gaussian::launch_by_packets<scalar_t>(numel, {&mu_q, &logsigma_q, &mu_p, &logsigma_p, &kl}, launch);
    });
  });
  return kl;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_kl_backward_cuda(const at::Tensor& grad_kl,
                                                                                     const at::Tensor& mu_q,
                                                                                     const at::Tensor& logsigma_q,
                                                                                     const at::Tensor& mu_p,
                                                                                     const at::Tensor& logsigma_p,
                                                                                     int64_t scale, double beta,
                                                                                     int64_t posterior) {
  check_dense(mu_q, "gaussian_kl");
  const c10::cuda::OptionalCUDAGuard device_guard(mu_q.device());
  at::Tensor g_mu_q = at::empty_like(mu_q), g_logsigma_q = at::empty_like(logsigma_q);
  at::Tensor g_mu_p = at::empty_like(mu_p), g_logsigma_p = at::empty_like(logsigma_p);
  const int64_t numel = mu_q.numel();
  if (numel == 0) return {g_mu_q, g_logsigma_q, g_mu_p, g_logsigma_p};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  gaussian::with_form(scale, posterior, beta, "gaussian_kl", [&](auto form) {
    using F = decltype(form);
    VF_DISPATCH_CUDA_FLOAT_TYPES(mu_q.scalar_type(), "gaussian_kl_backward_cuda", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const auto launch = [&](auto vec) {
        constexpr int kVec = decltype(vec)::value;
        gaussian_kl_backward_kernel<F, scalar_t, kVec><<<grid_for(numel / kVec), kThreads, 0, stream>>>(
            grad_kl.data_ptr<opmath_t>(), mu_q.data_ptr<scalar_t>(), logsigma_q.data_ptr<scalar_t>(),
            mu_p.data_ptr<scalar_t>(), logsigma_p.data_ptr<scalar_t>(), g_mu_q.data_ptr<scalar_t>(),
            g_logsigma_q.data_ptr<scalar_t>(), g_mu_p.data_ptr<scalar_t>(), g_logsigma_p.data_ptr<scalar_t>(),
            numel / kVec, gaussian::ScaleConstants<opmath_t>::of(beta));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      gaussian::launch_by_packets<scalar_t>(
          numel, {&grad_kl, &mu_q, &logsigma_q, &mu_p, &logsigma_p, &g_mu_q, &g_logsigma_q, &g_mu_p, &g_logsigma_p},
          launch);
    });
  });
  return {g_mu_q, g_logsigma_q, g_mu_p, g_logsigma_p};
}

}  // namespace

TORCH_LIBRARY_IMPL(vdvae_fast_C, CUDA, m) {
  m.impl("gaussian_kl_forward", &gaussian_kl_forward_cuda);
  m.impl("gaussian_kl_backward", &gaussian_kl_backward_cuda);
}

}  // namespace vdvae_fast
