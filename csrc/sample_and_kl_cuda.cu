// CUDA kernels of sample_and_kl: one fused pass draws VDVAE's posterior sample z = mu_q + sigma_q·eps and
// sums the rate KL(q‖p) per image; backward regenerates eps from (seed, logical index).
//
// The grid is (image, slice): each image, a contiguous block of memory in both layouts, is cut into a number
// of slices that depends only on its size. A block reduces its slice's KL in a fixed order and writes one
// partial; a second tiny kernel adds an image's partials in order. No atomics, so the sum is deterministic.

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

namespace vdvae_fast {
namespace {

using gaussian::kThreads;
constexpr int64_t kElementsPerSlice = 2048;
constexpr int64_t kMaxSlices = 1024;

int64_t slices_per_image(int64_t per_image) {
  return std::min(kMaxSlices, std::max<int64_t>(1, (per_image + kElementsPerSlice - 1) / kElementsPerSlice));
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

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    sample_and_kl_forward_kernel(const scalar_t* __restrict__ mu_q, const scalar_t* __restrict__ logsigma_q,
                                 const scalar_t* __restrict__ mu_p, const scalar_t* __restrict__ logsigma_p,
                                 scalar_t* __restrict__ z, at::opmath_type<scalar_t>* __restrict__ partials,
                                 int64_t slices, gaussian::DenseLayout layout, uint64_t seed) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Packet = gaussian::Packet<scalar_t, kVec>;
  const auto image = static_cast<uint32_t>(blockIdx.x / slices);
  const int64_t slice = blockIdx.x % slices;
  const int64_t per_image = layout.image_size;
  const int64_t image_start = static_cast<int64_t>(image) * per_image;
  opmath_t sum = 0;
  for (int64_t within = (slice * kThreads + threadIdx.x) * kVec; within < per_image;
       within += slices * kThreads * kVec) {
    const int64_t packet = (image_start + within) / kVec;
    const Packet mq = reinterpret_cast<const Packet*>(mu_q)[packet];
    const Packet lsq = reinterpret_cast<const Packet*>(logsigma_q)[packet];
    const Packet mp = reinterpret_cast<const Packet*>(mu_p)[packet];
    const Packet lsp = reinterpret_cast<const Packet*>(logsigma_p)[packet];
    Packet out;
    float eps[kVec];
    gaussian::packet_eps(eps, seed, layout, static_cast<uint32_t>(image_start + within), [&](int v) {
      return layout.logical_index_in_image(image, static_cast<uint32_t>(within + v));
    });
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const auto mu = static_cast<opmath_t>(mq.v[v]), logsigma = static_cast<opmath_t>(lsq.v[v]);
      out.v[v] = static_cast<scalar_t>(gaussian::sample(mu, logsigma, opmath_t(1), eps[v]));
      sum += gaussian::kl(mu, logsigma, static_cast<opmath_t>(mp.v[v]), static_cast<opmath_t>(lsp.v[v]));
    }
    reinterpret_cast<Packet*>(z)[packet] = out;
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

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    sample_and_kl_backward_kernel(const scalar_t* __restrict__ grad_z,
                                  const at::opmath_type<scalar_t>* __restrict__ grad_kl,
                                  const scalar_t* __restrict__ mu_q, const scalar_t* __restrict__ logsigma_q,
                                  const scalar_t* __restrict__ mu_p, const scalar_t* __restrict__ logsigma_p,
                                  scalar_t* __restrict__ g_mu_q, scalar_t* __restrict__ g_logsigma_q,
                                  scalar_t* __restrict__ g_mu_p, scalar_t* __restrict__ g_logsigma_p, int64_t slices,
                                  gaussian::DenseLayout layout, uint64_t seed) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Packet = gaussian::Packet<scalar_t, kVec>;
  const auto image = static_cast<uint32_t>(blockIdx.x / slices);
  const int64_t slice = blockIdx.x % slices;
  const int64_t per_image = layout.image_size;
  const int64_t image_start = static_cast<int64_t>(image) * per_image;
  const opmath_t gkl = grad_kl[image];
  for (int64_t within = (slice * kThreads + threadIdx.x) * kVec; within < per_image;
       within += slices * kThreads * kVec) {
    const int64_t packet = (image_start + within) / kVec;
    const Packet gz = reinterpret_cast<const Packet*>(grad_z)[packet];
    const Packet mq = reinterpret_cast<const Packet*>(mu_q)[packet];
    const Packet lsq = reinterpret_cast<const Packet*>(logsigma_q)[packet];
    const Packet mp = reinterpret_cast<const Packet*>(mu_p)[packet];
    const Packet lsp = reinterpret_cast<const Packet*>(logsigma_p)[packet];
    Packet out_mq, out_lsq, out_mp, out_lsp;
    float eps[kVec];
    gaussian::packet_eps(eps, seed, layout, static_cast<uint32_t>(image_start + within), [&](int v) {
      return layout.logical_index_in_image(image, static_cast<uint32_t>(within + v));
    });
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const auto grad = static_cast<opmath_t>(gz.v[v]), logsigma = static_cast<opmath_t>(lsq.v[v]);
      const gaussian::KlGrads<opmath_t> d =
          gaussian::kl_grads(gkl, static_cast<opmath_t>(mq.v[v]), logsigma, static_cast<opmath_t>(mp.v[v]),
                             static_cast<opmath_t>(lsp.v[v]));
      out_mq.v[v] = static_cast<scalar_t>(grad + d.mu_q);
      out_lsq.v[v] =
          static_cast<scalar_t>(gaussian::sample_grad_logsigma(grad, logsigma, opmath_t(1), eps[v]) + d.logsigma_q);
      out_mp.v[v] = static_cast<scalar_t>(d.mu_p);
      out_lsp.v[v] = static_cast<scalar_t>(d.logsigma_p);
    }
    reinterpret_cast<Packet*>(g_mu_q)[packet] = out_mq;
    reinterpret_cast<Packet*>(g_logsigma_q)[packet] = out_lsq;
    reinterpret_cast<Packet*>(g_mu_p)[packet] = out_mp;
    reinterpret_cast<Packet*>(g_logsigma_p)[packet] = out_lsp;
  }
}

std::tuple<at::Tensor, at::Tensor> sample_and_kl_forward_cuda(const at::Tensor& mu_q, const at::Tensor& logsigma_q,
                                                              const at::Tensor& mu_p, const at::Tensor& logsigma_p,
                                                              int64_t seed) {
  check_dense(mu_q, "sample_and_kl");
  const c10::cuda::OptionalCUDAGuard device_guard(mu_q.device());
  const int64_t batch = mu_q.size(0);
  const gaussian::DenseLayout layout = gaussian::layout_of(mu_q);
  at::Tensor z = at::empty_like(mu_q);
  const auto kl_dtype = mu_q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor kl = at::empty({batch}, mu_q.options().dtype(kl_dtype));
  if (mu_q.numel() == 0) return {z, kl.zero_()};
  const int64_t slices = slices_per_image(layout.image_size);
  TORCH_CHECK(batch * slices < (int64_t{1} << 31), "sample_and_kl: batch too large for one grid");
  at::Tensor partials = at::empty({batch * slices}, mu_q.options().dtype(kl_dtype));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  VF_DISPATCH_CUDA_FLOAT_TYPES(mu_q.scalar_type(), "sample_and_kl_forward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto launch = [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      sample_and_kl_forward_kernel<scalar_t, kVec><<<static_cast<unsigned>(batch * slices), kThreads, 0, stream>>>(
          mu_q.data_ptr<scalar_t>(), logsigma_q.data_ptr<scalar_t>(), mu_p.data_ptr<scalar_t>(),
          logsigma_p.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), partials.data_ptr<opmath_t>(), slices, layout,
          static_cast<uint64_t>(seed));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    gaussian::launch_by_packets<scalar_t>(layout.image_size, {&mu_q, &logsigma_q, &mu_p, &logsigma_p, &z}, launch);
    const int blocks = static_cast<int>((batch + kThreads - 1) / kThreads);
    sample_and_kl_finish_kernel<opmath_t>
        <<<blocks, kThreads, 0, stream>>>(partials.data_ptr<opmath_t>(), kl.data_ptr<opmath_t>(), batch, slices);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_and_kl_backward_cuda(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& mu_q, const at::Tensor& logsigma_q,
    const at::Tensor& mu_p, const at::Tensor& logsigma_p, int64_t seed) {
  check_dense(mu_q, "sample_and_kl");
  const c10::cuda::OptionalCUDAGuard device_guard(mu_q.device());
  const int64_t batch = mu_q.size(0);
  const gaussian::DenseLayout layout = gaussian::layout_of(mu_q);
  at::Tensor g_mu_q = at::empty_like(mu_q), g_logsigma_q = at::empty_like(logsigma_q);
  at::Tensor g_mu_p = at::empty_like(mu_p), g_logsigma_p = at::empty_like(logsigma_p);
  if (mu_q.numel() == 0) return {g_mu_q, g_logsigma_q, g_mu_p, g_logsigma_p};
  const int64_t slices = slices_per_image(layout.image_size);
  TORCH_CHECK(batch * slices < (int64_t{1} << 31), "sample_and_kl: batch too large for one grid");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  VF_DISPATCH_CUDA_FLOAT_TYPES(mu_q.scalar_type(), "sample_and_kl_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto launch = [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      sample_and_kl_backward_kernel<scalar_t, kVec><<<static_cast<unsigned>(batch * slices), kThreads, 0, stream>>>(
          grad_z.data_ptr<scalar_t>(), grad_kl.data_ptr<opmath_t>(), mu_q.data_ptr<scalar_t>(),
          logsigma_q.data_ptr<scalar_t>(), mu_p.data_ptr<scalar_t>(), logsigma_p.data_ptr<scalar_t>(),
          g_mu_q.data_ptr<scalar_t>(), g_logsigma_q.data_ptr<scalar_t>(), g_mu_p.data_ptr<scalar_t>(),
          g_logsigma_p.data_ptr<scalar_t>(), slices, layout, static_cast<uint64_t>(seed));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    gaussian::launch_by_packets<scalar_t>(
        layout.image_size,
        {&grad_z, &mu_q, &logsigma_q, &mu_p, &logsigma_p, &g_mu_q, &g_logsigma_q, &g_mu_p, &g_logsigma_p}, launch);
  });
  return {g_mu_q, g_logsigma_q, g_mu_p, g_logsigma_p};
}

}  // namespace

TORCH_LIBRARY_IMPL(vdvae_fast_C, CUDA, m) {
  m.impl("sample_and_kl_forward", &sample_and_kl_forward_cuda);
  m.impl("sample_and_kl_backward", &sample_and_kl_backward_cuda);
}

}  // namespace vdvae_fast
