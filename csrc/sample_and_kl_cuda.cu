// CUDA kernels of sample_and_kl: one fused pass draws VDVAE's posterior sample z = mu_q + sigma_q·eps and
// sums the rate KL(q‖p) (or its sampled estimate) per image, in every parametrization (one instantiation each;
// the per-packet bodies are gaussian_packets.h's); backward regenerates eps from (seed, logical index).
//
// The grid is (image, slice): each image, a contiguous block of memory in both layouts, is cut into a number
// of slices that depends only on its size and work item (a packet, or a pixel quad's four packets:
// gaussian_cuda.cuh's launch_by_items), whose threads take the image's items in a fixed interleave. A block
// reduces its slice's KL in a fixed order and writes one partial; a second tiny kernel adds an image's partials
// in order. No atomics, so the sum is deterministic.

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

using gaussian::kThreads;
constexpr int64_t kElementsPerSlice = 2048;  // at least; a slice gives each thread one work item or more
constexpr int64_t kMaxSlices = 1024;

// Blocks per SM that a kernel's registers must allow (0: no bound, ptxas's own choice). A pixel-quad work item
// keeps 4·kVec eps live across the slow-path calls of its square roots, where ptxas's own choice spills a few
// registers in some parametrizations; bounding it to 2 blocks of kThreads (at most 128 registers) spills none.
template <int kVec, int kItem>
constexpr int kMinBlocks = kItem == kVec ? 0 : 2;

// Slices of an image whose work items hold `item` elements each.
int64_t slices_per_image(int64_t per_image, int64_t item) {
  const int64_t per_slice = std::max(kElementsPerSlice, kThreads * item);
  return std::min(kMaxSlices, std::max<int64_t>(1, (per_image + per_slice - 1) / per_slice));
}

// Sum over the block in a fixed order (warp shuffles, then the warps' sums); the result is in thread 0.
template <typename T>
__device__ T block_sum(T value) {
  __shared__ T warp_sums[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kThreads / 32 ? warp_sums[lane] : T(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

template <typename F, typename scalar_t, int kVec, int kItem>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<kVec, kItem>))
    sample_and_kl_forward_kernel(const scalar_t* __restrict__ mu_q, const scalar_t* __restrict__ logsigma_q,
                                 const scalar_t* __restrict__ mu_p, const scalar_t* __restrict__ logsigma_p,
                                 scalar_t* __restrict__ z, at::opmath_type<scalar_t>* __restrict__ partials,
                                 int64_t slices, gaussian::DenseLayout layout, uint64_t seed,
                                 gaussian::ScaleConstants<at::opmath_type<scalar_t>> constants) {
  const auto image = static_cast<uint32_t>(blockIdx.x / slices);
  const int64_t slice = blockIdx.x % slices;
  const int64_t items = layout.image_size / kItem;
  at::opmath_type<scalar_t> sum = 0;
  for (int64_t i = slice * kThreads + threadIdx.x; i < items; i += slices * kThreads) {
    gaussian::for_item_packets<kVec, kItem>(image * items + i, layout, seed, [&](int64_t p, const float(&eps)[kVec]) {
      gaussian::sample_and_kl_forward_packet<F, kVec>(mu_q, logsigma_q, mu_p, logsigma_p, z, sum, p, eps, constants);
    });
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// One thread per image adds its slices' partials in order.
template <typename T>
__global__ void sample_and_kl_finish_kernel(const T* __restrict__ partials, T* __restrict__ kl, int64_t batch,
                                            int64_t slices) {
  const int64_t image = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (image >= batch) return;
  double sum = 0.0;
  for (int64_t s = 0; s < slices; ++s) sum += static_cast<double>(partials[image * slices + s]);
  kl[image] = static_cast<T>(sum);
}

template <typename F, typename scalar_t, int kVec, int kItem>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<kVec, kItem>))
    sample_and_kl_backward_kernel(const scalar_t* __restrict__ grad_z,
                                  const at::opmath_type<scalar_t>* __restrict__ grad_kl,
                                  const scalar_t* __restrict__ mu_q, const scalar_t* __restrict__ logsigma_q,
                                  const scalar_t* __restrict__ mu_p, const scalar_t* __restrict__ logsigma_p,
                                  scalar_t* __restrict__ g_mu_q, scalar_t* __restrict__ g_logsigma_q,
                                  scalar_t* __restrict__ g_mu_p, scalar_t* __restrict__ g_logsigma_p, int64_t slices,
                                  gaussian::DenseLayout layout, uint64_t seed,
                                  gaussian::ScaleConstants<at::opmath_type<scalar_t>> constants) {
  const auto image = static_cast<uint32_t>(blockIdx.x / slices);
  const int64_t slice = blockIdx.x % slices;
  const int64_t items = layout.image_size / kItem;
  const at::opmath_type<scalar_t> gkl = grad_kl[image];
  for (int64_t i = slice * kThreads + threadIdx.x; i < items; i += slices * kThreads) {
    gaussian::for_item_packets<kVec, kItem>(image * items + i, layout, seed, [&](int64_t p, const float(&eps)[kVec]) {
      gaussian::sample_and_kl_backward_packet<F, kVec>(grad_z, gkl, mu_q, logsigma_q, mu_p, logsigma_p, g_mu_q,
                                                       g_logsigma_q, g_mu_p, g_logsigma_p, p, eps, constants);
    });
  }
}

std::tuple<at::Tensor, at::Tensor> sample_and_kl_forward_cuda(const at::Tensor& mu_q, const at::Tensor& logsigma_q,
                                                              const at::Tensor& mu_p, const at::Tensor& logsigma_p,
                                                              int64_t seed, int64_t scale, double beta,
                                                              int64_t posterior, int64_t kl_estimator) {
  check_dense(mu_q, "sample_and_kl");
  const c10::cuda::OptionalCUDAGuard device_guard(mu_q.device());
  const int64_t batch = mu_q.size(0);
  const gaussian::DenseLayout layout = gaussian::layout_of(mu_q);
  at::Tensor z = at::empty_like(mu_q);
  const auto kl_dtype = mu_q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor kl = at::empty({batch}, mu_q.options().dtype(kl_dtype));
  if (mu_q.numel() == 0) return {z, kl.zero_()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  gaussian::with_form(scale, posterior, kl_estimator, beta, "sample_and_kl", [&](auto form) {
    using F = decltype(form);
    VF_DISPATCH_CUDA_FLOAT_TYPES(mu_q.scalar_type(), "sample_and_kl_forward_cuda", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const auto launch = [&](auto vec, auto item) {
        constexpr int kVec = decltype(vec)::value, kItem = decltype(item)::value;
        const int64_t slices = slices_per_image(layout.image_size, kItem);
        TORCH_CHECK(batch * slices < (int64_t{1} << 31), "sample_and_kl: batch too large for one grid");
        at::Tensor partials = at::empty({batch * slices}, mu_q.options().dtype(kl_dtype));
        sample_and_kl_forward_kernel<F, scalar_t, kVec, kItem>
            <<<static_cast<unsigned>(batch * slices), kThreads, 0, stream>>>(
                mu_q.data_ptr<scalar_t>(), logsigma_q.data_ptr<scalar_t>(), mu_p.data_ptr<scalar_t>(),
                logsigma_p.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), partials.data_ptr<opmath_t>(), slices,
                layout, static_cast<uint64_t>(seed), gaussian::ScaleConstants<opmath_t>::of(beta));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const int blocks = static_cast<int>((batch + kThreads - 1) / kThreads);
        sample_and_kl_finish_kernel<opmath_t>
            <<<blocks, kThreads, 0, stream>>>(partials.data_ptr<opmath_t>(), kl.data_ptr<opmath_t>(), batch, slices);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      gaussian::launch_by_items<scalar_t>(layout.image_size, layout, {&mu_q, &logsigma_q, &mu_p, &logsigma_p, &z},
                                          launch);
    });
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_and_kl_backward_cuda(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& mu_q, const at::Tensor& logsigma_q,
    const at::Tensor& mu_p, const at::Tensor& logsigma_p, int64_t seed, int64_t scale, double beta, int64_t posterior,
    int64_t kl_estimator) {
  check_dense(mu_q, "sample_and_kl");
  const c10::cuda::OptionalCUDAGuard device_guard(mu_q.device());
  const int64_t batch = mu_q.size(0);
  const gaussian::DenseLayout layout = gaussian::layout_of(mu_q);
  at::Tensor g_mu_q = at::empty_like(mu_q), g_logsigma_q = at::empty_like(logsigma_q);
  at::Tensor g_mu_p = at::empty_like(mu_p), g_logsigma_p = at::empty_like(logsigma_p);
  if (mu_q.numel() == 0) return {g_mu_q, g_logsigma_q, g_mu_p, g_logsigma_p};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  gaussian::with_form(scale, posterior, kl_estimator, beta, "sample_and_kl", [&](auto form) {
    using F = decltype(form);
    VF_DISPATCH_CUDA_FLOAT_TYPES(mu_q.scalar_type(), "sample_and_kl_backward_cuda", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const auto launch = [&](auto vec, auto item) {
        constexpr int kVec = decltype(vec)::value, kItem = decltype(item)::value;
        const int64_t slices = slices_per_image(layout.image_size, kItem);
        TORCH_CHECK(batch * slices < (int64_t{1} << 31), "sample_and_kl: batch too large for one grid");
        sample_and_kl_backward_kernel<F, scalar_t, kVec, kItem>
            <<<static_cast<unsigned>(batch * slices), kThreads, 0, stream>>>(
                grad_z.data_ptr<scalar_t>(), grad_kl.data_ptr<opmath_t>(), mu_q.data_ptr<scalar_t>(),
                logsigma_q.data_ptr<scalar_t>(), mu_p.data_ptr<scalar_t>(), logsigma_p.data_ptr<scalar_t>(),
                g_mu_q.data_ptr<scalar_t>(), g_logsigma_q.data_ptr<scalar_t>(), g_mu_p.data_ptr<scalar_t>(),
                g_logsigma_p.data_ptr<scalar_t>(), slices, layout, static_cast<uint64_t>(seed),
                gaussian::ScaleConstants<opmath_t>::of(beta));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      gaussian::launch_by_items<scalar_t>(
          layout.image_size, layout,
          {&grad_z, &mu_q, &logsigma_q, &mu_p, &logsigma_p, &g_mu_q, &g_logsigma_q, &g_mu_p, &g_logsigma_p}, launch);
    });
  });
  return {g_mu_q, g_logsigma_q, g_mu_p, g_logsigma_p};
}

}  // namespace

TORCH_LIBRARY_IMPL(vdvae_fast_C, CUDA, m) {
  m.impl("sample_and_kl_forward", &sample_and_kl_forward_cuda);
  m.impl("sample_and_kl_backward", &sample_and_kl_backward_cuda);
}

}  // namespace vdvae_fast
