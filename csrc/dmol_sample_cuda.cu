// CUDA kernel of dmol_sample: one thread per pixel runs dmol_math.h's sample_pixel (Gumbel-max
// mixture pick, logistic draw, RGB coupling, clamp to [-1, 1]). The randomness is Philox keyed by
// the seed and counted by the pixel's NCHW index, so the image does not depend on the layout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dmol_math.h"

namespace vdvae_fast {
namespace {

constexpr int kThreads = 256;

struct Strides {
  int64_t batch, channel, height, width;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const scalar_t* __restrict__ logits, Strides in, float* __restrict__ image, Strides out,
                  int64_t mixtures, int64_t width, int64_t pixels, int64_t total, uint64_t seed) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (p >= total) return;
  const int64_t b = p / pixels, h = (p % pixels) / width, w = p % width;
  const scalar_t* pixel = logits + b * in.batch + h * in.height + w * in.width;
  const auto load = [&](int64_t ch) { return static_cast<float>(pixel[ch * in.channel]); };
  const dmol::PixelSample s = dmol::sample_pixel(load, mixtures, seed, static_cast<uint32_t>(p));
  float* dst = image + b * out.batch + h * out.height + w * out.width;
#pragma unroll
  for (int c = 0; c < 3; ++c) dst[c * out.channel] = s.x[c];
}

at::Tensor dmol_sample_cuda(const at::Tensor& logits, int64_t seed) {
  TORCH_CHECK(logits.is_cuda(), "dmol_sample: logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 4 && logits.size(1) % 10 == 0 && logits.size(1) > 0,
              "dmol_sample: logits must be (B, 10M, H, W), got ", logits.sizes());
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t batch = logits.size(0), mixtures = logits.size(1) / 10;
  const int64_t height = logits.size(2), width = logits.size(3), pixels = height * width;
  at::Tensor image = at::empty({batch, 3, height, width},
                               logits.options().dtype(at::kFloat).memory_format(logits.suggest_memory_format()));
  const int64_t total = batch * pixels;
  if (total == 0) return image;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dmol_sample_cuda", [&] {
    sample_kernel<scalar_t><<<(total + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), strides_of(logits), image.data_ptr<float>(), strides_of(image), mixtures, width,
        pixels, total, static_cast<uint64_t>(seed));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return image;
}

}  // namespace

TORCH_LIBRARY_IMPL(vdvae_fast_C, CUDA, m) { m.impl("dmol_sample", &dmol_sample_cuda); }

}  // namespace vdvae_fast
