// CUDA kernels of the DMoL distortion: dmol_nll_forward (per-image nats per dimension) and its fused
// backward, which recomputes everything from logits and x in one pass over the mixtures.
//
// A block of kTilePixels threads stages the channels of kTilePixels pixels in shared memory
// (dmol_tile_cuda.cuh: coalesced, vectorized where aligned, in either layout); each thread runs
// dmol_math.h's per-pixel body on its pixel, with the mixture loop unrolled for M = 10. The forward
// sums each block's pixels into a partial and a second kernel adds an image's partials in a fixed
// order (deterministic, no atomics). The backward writes the gradient over the staged channels and
// copies it out.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "cuda_dispatch.cuh"
#include "dmol_math.h"
#include "dmol_tile_cuda.cuh"
#include "kernel_checks.h"

namespace vdvae_fast {
namespace {

using dmol::kTilePitch;
using dmol::kTilePixels;

constexpr int kFinishThreads = 256;
constexpr int kCommonMixtures = 10;  // VDVAE's M: compiled with the mixture loops unrolled
// Blocks per SM the register allocation must allow: 65536 / (64 * 8) = 128 registers per thread
constexpr int kMinBlocks = 8;

// Sum over the threads of the block, valid in thread 0; a fixed shuffle tree, so it is reproducible
template <int kThreads>
__device__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 1; w < kThreads / 32; ++w) v += warp_sums[w];
  }
  return v;
}

// What both kernels need to find and score a pixel
struct PixelTask {
  int64_t mixtures, pixels, tiles_per_image;
  dmol::Bins<float> bins;

  // 32-bit divisions: a 64-bit one calls a subroutine (tiles_per_image < 2^31, checked on launch)
  __device__ int64_t image() const { return blockIdx.x / static_cast<uint32_t>(tiles_per_image); }
  __device__ int64_t first() const { return (blockIdx.x % static_cast<uint32_t>(tiles_per_image)) * kTilePixels; }
  __device__ int count() const {
    const int64_t left = pixels - first();
    return left < kTilePixels ? static_cast<int>(left) : kTilePixels;
  }
};

// The three target values of pixel p of image b
struct Targets {
  float x0, x1, x2;

  __device__ Targets(const float* x, const dmol::ImageStrides& s, int64_t b, int64_t p) {
    const float* at = x + b * s.batch + s.pixel_offset(p);
    x0 = at[0];
    x1 = at[s.channel];
    x2 = at[2 * s.channel];
  }
};

template <typename scalar_t, int kMixtures, typename Scales>
__global__ void __launch_bounds__(kTilePixels, kMinBlocks)
    dmol_nll_forward_kernel(const scalar_t* __restrict__ logits, dmol::TileCopy copy, const float* __restrict__ x,
                            dmol::ImageStrides xs, PixelTask task, Scales scales, float* __restrict__ partial) {
  extern __shared__ float tile[];
  const int64_t b = task.image(), first = task.first();
  const int count = task.count(), t = threadIdx.x;
  dmol::copy_tile<true, scalar_t, 10 * kMixtures>(logits + b * copy.strides.batch, tile, copy, first, count);
  __syncthreads();
  float log_likelihood = 0.0f;
  if (t < count) {
    const Targets target(x, xs, b, first + t);
    log_likelihood = dmol::dmol_nll_forward_pixel<kMixtures>(dmol::SharedPixel{tile + t}, task.mixtures, target.x0,
                                                             target.x1, target.x2, task.bins, scales);
  }
  log_likelihood = block_sum<kTilePixels>(log_likelihood);
  if (t == 0) partial[blockIdx.x] = log_likelihood;
}

// nll[b] = -(sum of image b's partials) / (3 H W)
__global__ void __launch_bounds__(kFinishThreads)
    dmol_nll_finish_kernel(const float* __restrict__ partial, int64_t tiles_per_image, float dims,
                           float* __restrict__ nll) {
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < tiles_per_image; i += kFinishThreads)
    sum += partial[blockIdx.x * tiles_per_image + i];
  sum = block_sum<kFinishThreads>(sum);
  if (threadIdx.x == 0) nll[blockIdx.x] = -sum / dims;
}

template <typename scalar_t, int kMixtures, typename Scales>
__global__ void __launch_bounds__(kTilePixels, kMinBlocks)
    dmol_nll_backward_kernel(const float* __restrict__ grad_nll, int64_t grad_nll_stride,
                             const scalar_t* __restrict__ logits, dmol::TileCopy copy, const float* __restrict__ x,
                             dmol::ImageStrides xs, scalar_t* __restrict__ grad_logits, dmol::TileCopy grad_copy,
                             PixelTask task, Scales scales, float dims) {
  extern __shared__ float tile[];
  const int64_t b = task.image(), first = task.first();
  const int count = task.count(), t = threadIdx.x;
  dmol::copy_tile<true, scalar_t, 10 * kMixtures>(logits + b * copy.strides.batch, tile, copy, first, count);
  __syncthreads();
  if (t < count) {
    const Targets target(x, xs, b, first + t);
    // the joint log-probabilities of the mixtures, in M rows after the 10M channel rows
    const dmol::SharedPixel joint{tile + copy.channels * kTilePitch + t};
    dmol::dmol_nll_backward_pixel<kMixtures>(dmol::SharedPixel{tile + t}, joint, task.mixtures, target.x0, target.x1,
                                             target.x2, task.bins, scales, grad_nll[b * grad_nll_stride] / dims);
  }
  __syncthreads();
  dmol::copy_tile<false, scalar_t, 10 * kMixtures>(grad_logits + b * grad_copy.strides.batch, tile, grad_copy, first,
                                                   count);
}

void check_inputs(const at::Tensor& logits, const at::Tensor& x, int64_t num_bits) {
  TORCH_CHECK(logits.is_cuda() && x.device() == logits.device(), "dmol: logits and x must be on one CUDA device");
  check_dmol_inputs(logits, x, num_bits);
}

PixelTask task_of(const at::Tensor& logits, int64_t num_bits) {
  const int64_t pixels = logits.size(2) * logits.size(3);
  TORCH_CHECK(
      pixels < (int64_t{1} << 31) && logits.size(0) * ((pixels + kTilePixels - 1) / kTilePixels) < (int64_t{1} << 31),
      "dmol_nll on CUDA takes fewer than 2^31 pixels per image and tiles per batch, got ", logits.sizes());
  return {logits.size(1) / 10, pixels, (pixels + kTilePixels - 1) / kTilePixels, dmol::make_bins<float>(num_bits)};
}

at::Tensor dmol_nll_forward_cuda(const at::Tensor& logits, const at::Tensor& x, int64_t num_bits, int64_t scale,
                                 double beta, double log_scale_min) {
  check_inputs(logits, x, num_bits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const PixelTask task = task_of(logits, num_bits);
  const int64_t batch = logits.size(0);
  at::Tensor nll = at::empty({batch}, logits.options().dtype(at::kFloat));
  if (batch == 0) return nll;
  at::Tensor partial = at::zeros({batch * task.tiles_per_image}, nll.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dmol::with_scales<float>(scale, beta, log_scale_min, [&](const auto& scales) {
    using Scales = std::decay_t<decltype(scales)>;
    VF_DISPATCH_CUDA_FLOAT_TYPES(logits.scalar_type(), "dmol_nll_forward_cuda", [&] {
      const auto run = [&](auto kernel) {
        const int bytes = dmol::tile_shared_bytes(kernel, logits.size(1), "dmol_nll", task.mixtures);
        kernel<<<batch * task.tiles_per_image, kTilePixels, bytes, stream>>>(
            logits.data_ptr<scalar_t>(), dmol::tile_copy_of(logits), x.data_ptr<float>(), dmol::strides_of(x), task,
            scales, partial.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (task.pixels > 0) {
        if (task.mixtures == kCommonMixtures) {
          run(&dmol_nll_forward_kernel<scalar_t, kCommonMixtures, Scales>);
        } else {
          run(&dmol_nll_forward_kernel<scalar_t, 0, Scales>);
        }
      }
    });
  });
  dmol_nll_finish_kernel<<<batch, kFinishThreads, 0, stream>>>(
      partial.data_ptr<float>(), task.tiles_per_image, static_cast<float>(3 * task.pixels), nll.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return nll;
}

at::Tensor dmol_nll_backward_cuda(const at::Tensor& grad_nll, const at::Tensor& logits, const at::Tensor& x,
                                  int64_t num_bits, int64_t scale, double beta, double log_scale_min) {
  check_inputs(logits, x, num_bits);
  TORCH_CHECK(grad_nll.device() == logits.device() && grad_nll.dim() == 1 && grad_nll.size(0) == logits.size(0) &&
                  grad_nll.scalar_type() == x.scalar_type(),
              "dmol: grad_nll must be (B,) in the math dtype on the device of logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const PixelTask task = task_of(logits, num_bits);
  at::Tensor grad_logits = at::empty_like(logits);
  if (grad_logits.numel() == 0) return grad_logits;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dmol::with_scales<float>(scale, beta, log_scale_min, [&](const auto& scales) {
    using Scales = std::decay_t<decltype(scales)>;
    VF_DISPATCH_CUDA_FLOAT_TYPES(logits.scalar_type(), "dmol_nll_backward_cuda", [&] {
      const auto run = [&](auto kernel) {
        const int bytes = dmol::tile_shared_bytes(kernel, logits.size(1) + task.mixtures, "dmol_nll", task.mixtures);
        kernel<<<logits.size(0) * task.tiles_per_image, kTilePixels, bytes, stream>>>(
            grad_nll.data_ptr<float>(), grad_nll.stride(0), logits.data_ptr<scalar_t>(), dmol::tile_copy_of(logits),
            x.data_ptr<float>(), dmol::strides_of(x), grad_logits.data_ptr<scalar_t>(),
            dmol::tile_copy_of(grad_logits), task, scales, static_cast<float>(3 * task.pixels));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (task.mixtures == kCommonMixtures) {
        run(&dmol_nll_backward_kernel<scalar_t, kCommonMixtures, Scales>);
      } else {
        run(&dmol_nll_backward_kernel<scalar_t, 0, Scales>);
      }
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(vdvae_fast_C, CUDA, m) {
  m.impl("dmol_nll_forward", &dmol_nll_forward_cuda);
  m.impl("dmol_nll_backward", &dmol_nll_backward_cuda);
}

}  // namespace vdvae_fast
