// CUDA kernel of dmol_sample: a block stages the channels of kTilePixels pixels in shared memory
// (dmol_tile_cuda.cuh: coalesced, vectorized where aligned, in either layout) and each thread runs
// dmol_math.h's dmol_sample_pixel on its pixel (Gumbel-max mixture pick, logistic draw, RGB coupling,
// clamp to [-1, 1]), with the mixture loops unrolled for M = 10. The randomness is Philox keyed by the
// seed and counted by the pixel's NCHW index, so the image does not depend on the layout.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "cuda_dispatch.cuh"
#include "dmol_math.h"
#include "dmol_tile_cuda.cuh"

namespace vdvae_fast {
namespace {

using dmol::kTilePixels;

constexpr int kCommonMixtures = 10;  // VDVAE's M: compiled with the mixture loops unrolled

template <typename scalar_t, int kMixtures, typename Scales>
__global__ void __launch_bounds__(kTilePixels)
    dmol_sample_forward_kernel(const scalar_t* __restrict__ logits, dmol::TileCopy copy, float* __restrict__ image,
                               dmol::ImageStrides out, int64_t mixtures, int64_t pixels, int64_t tiles_per_image,
                               Scales scales, uint64_t seed) {
  extern __shared__ float tile[];
  // 32-bit divisions: a 64-bit one calls a subroutine (checked on launch)
  const int64_t b = blockIdx.x / static_cast<uint32_t>(tiles_per_image);
  const int64_t first = (blockIdx.x % static_cast<uint32_t>(tiles_per_image)) * kTilePixels;
  const int count = pixels - first < kTilePixels ? static_cast<int>(pixels - first) : kTilePixels;
  const int t = threadIdx.x;
  dmol::copy_tile<true, scalar_t, 10 * kMixtures>(logits + b * copy.strides.batch, tile, copy, first, count);
  __syncthreads();
  if (t >= count) return;
  const int64_t p = first + t;
  const dmol::PixelSample s = dmol::dmol_sample_pixel<kMixtures>(dmol::SharedPixel{tile + t}, mixtures, scales, seed,
                                                                 static_cast<uint32_t>(b * pixels + p));
  float* dst = image + b * out.batch + out.pixel_offset(p);
#pragma unroll
  for (int c = 0; c < 3; ++c) dst[c * out.channel] = s.x[c];
}

at::Tensor dmol_sample_forward_cuda(const at::Tensor& logits, int64_t scale, double beta, double log_scale_min,
                                    int64_t seed) {
  TORCH_CHECK(logits.is_cuda(), "dmol_sample: logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 4 && logits.size(1) % 10 == 0 && logits.size(1) > 0,
              "dmol_sample: logits must be (B, 10M, H, W), got ", logits.sizes());
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t batch = logits.size(0), mixtures = logits.size(1) / 10;
  const int64_t pixels = logits.size(2) * logits.size(3), tiles_per_image = (pixels + kTilePixels - 1) / kTilePixels;
  at::Tensor image = at::empty({batch, 3, logits.size(2), logits.size(3)},
                               logits.options().dtype(at::kFloat).memory_format(logits.suggest_memory_format()));
  if (image.numel() == 0) return image;
  TORCH_CHECK(batch * tiles_per_image < (int64_t{1} << 31), "dmol_sample on CUDA takes fewer than 2^31 tiles of ",
              kTilePixels, " pixels per batch, got ", logits.sizes());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dmol::with_scales<float>(scale, beta, log_scale_min, [&](const auto& scales) {
    using Scales = std::decay_t<decltype(scales)>;
    VF_DISPATCH_CUDA_FLOAT_TYPES(logits.scalar_type(), "dmol_sample_forward_cuda", [&] {
      const auto run = [&](auto kernel) {
        const int bytes = dmol::tile_shared_bytes(kernel, logits.size(1), "dmol_sample", mixtures);
        kernel<<<batch * tiles_per_image, kTilePixels, bytes, stream>>>(
            logits.data_ptr<scalar_t>(), dmol::tile_copy_of(logits), image.data_ptr<float>(), dmol::strides_of(image),
            mixtures, pixels, tiles_per_image, scales, static_cast<uint64_t>(seed));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (mixtures == kCommonMixtures) {
        run(&dmol_sample_forward_kernel<scalar_t, kCommonMixtures, Scales>);
      } else {
        run(&dmol_sample_forward_kernel<scalar_t, 0, Scales>);
      }
    });
  });
  return image;
}

}  // namespace

TORCH_LIBRARY_IMPL(vdvae_fast_C, CUDA, m) { m.impl("dmol_sample", &dmol_sample_forward_cuda); }

}  // namespace vdvae_fast
