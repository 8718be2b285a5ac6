// CUDA kernels of sample_gaussian: VDVAE's prior sampling at temperature t, z = mu + t·sigma·eps with
// sigma = exp(raw) or softplus_beta(raw), and its gradients (per-packet bodies in gaussian_packets.h). eps comes
// from (seed, logical index) in forward and is regenerated in backward.
//
// Grid-stride loops over flat memory, 16-byte packets when every pointer is aligned and the size divides,
// work items of one packet, or of a pixel quad's four packets where channels_last allows (gaussian_cuda.cuh's
// launch_by_items).

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

template <typename F, typename scalar_t, int kVec, int kItem>
__global__ void __launch_bounds__(kThreads)
    sample_gaussian_forward_kernel(const scalar_t* __restrict__ mu, const scalar_t* __restrict__ logsigma,
                                   scalar_t* __restrict__ z, int64_t items, at::opmath_type<scalar_t> temperature,
                                   gaussian::DenseLayout layout, uint64_t seed,
                                   gaussian::ScaleConstants<at::opmath_type<scalar_t>> constants) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < items;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    gaussian::for_item_packets<kVec, kItem>(i, layout, seed, [&](int64_t p, const float(&eps)[kVec]) {
      gaussian::sample_gaussian_forward_packet<F, kVec>(mu, logsigma, z, p, temperature, eps, constants);
    });
  }
}

template <typename F, typename scalar_t, int kVec, int kItem>
__global__ void __launch_bounds__(kThreads)
    sample_gaussian_backward_kernel(const scalar_t* __restrict__ grad_z, const scalar_t* __restrict__ logsigma,
                                    scalar_t* __restrict__ g_logsigma, int64_t items,
                                    at::opmath_type<scalar_t> temperature, gaussian::DenseLayout layout,
                                    uint64_t seed, gaussian::ScaleConstants<at::opmath_type<scalar_t>> constants) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < items;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    gaussian::for_item_packets<kVec, kItem>(i, layout, seed, [&](int64_t p, const float(&eps)[kVec]) {
      gaussian::sample_gaussian_backward_packet<F, kVec>(grad_z, logsigma, g_logsigma, p, temperature, eps,
                                                         constants);
    });
  }
}

at::Tensor sample_gaussian_forward_cuda(const at::Tensor& mu, const at::Tensor& logsigma, double temperature,
                                        int64_t seed, int64_t scale, double beta) {
  check_dense(mu, "sample_gaussian");
  const c10::cuda::OptionalCUDAGuard device_guard(mu.device());
  at::Tensor z = at::empty_like(mu);
  const int64_t numel = mu.numel();
  if (numel == 0) return z;
  const gaussian::DenseLayout layout = gaussian::layout_of(mu);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  gaussian::with_form(scale, beta, "sample_gaussian", [&](auto form) {
    using F = decltype(form);
    VF_DISPATCH_CUDA_FLOAT_TYPES(mu.scalar_type(), "sample_gaussian_forward_cuda", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const auto launch = [&](auto vec, auto item) {
        constexpr int kVec = decltype(vec)::value, kItem = decltype(item)::value;
        sample_gaussian_forward_kernel<F, scalar_t, kVec, kItem><<<grid_for(numel / kItem), kThreads, 0, stream>>>(
            mu.data_ptr<scalar_t>(), logsigma.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), numel / kItem,
            static_cast<opmath_t>(temperature), layout, static_cast<uint64_t>(seed),
            gaussian::ScaleConstants<opmath_t>::of(beta));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      gaussian::launch_by_items<scalar_t>(numel, layout, {&mu, &logsigma, &z}, launch);
    });
  });
  return z;
}

at::Tensor sample_gaussian_backward_cuda(const at::Tensor& grad_z, const at::Tensor& mu, const at::Tensor& logsigma,
                                         double temperature, int64_t seed, int64_t scale, double beta) {
  check_dense(mu, "sample_gaussian");
  const c10::cuda::OptionalCUDAGuard device_guard(mu.device());
  at::Tensor g_logsigma = at::empty_like(logsigma);
  const int64_t numel = mu.numel();
  if (numel == 0) return g_logsigma;
  const gaussian::DenseLayout layout = gaussian::layout_of(mu);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  gaussian::with_form(scale, beta, "sample_gaussian", [&](auto form) {
    using F = decltype(form);
    VF_DISPATCH_CUDA_FLOAT_TYPES(mu.scalar_type(), "sample_gaussian_backward_cuda", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const auto launch = [&](auto vec, auto item) {
        constexpr int kVec = decltype(vec)::value, kItem = decltype(item)::value;
        sample_gaussian_backward_kernel<F, scalar_t, kVec, kItem><<<grid_for(numel / kItem), kThreads, 0, stream>>>(
            grad_z.data_ptr<scalar_t>(), logsigma.data_ptr<scalar_t>(), g_logsigma.data_ptr<scalar_t>(),
            numel / kItem, static_cast<opmath_t>(temperature), layout,
            static_cast<uint64_t>(seed), gaussian::ScaleConstants<opmath_t>::of(beta));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      gaussian::launch_by_items<scalar_t>(numel, layout, {&grad_z, &logsigma, &g_logsigma}, launch);
    });
  });
  return g_logsigma;
}

}  // namespace

TORCH_LIBRARY_IMPL(vdvae_fast_C, CUDA, m) {
  m.impl("sample_gaussian_forward", &sample_gaussian_forward_cuda);
  m.impl("sample_gaussian_backward", &sample_gaussian_backward_cuda);
}

}  // namespace vdvae_fast
