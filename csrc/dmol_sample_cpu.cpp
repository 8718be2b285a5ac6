// CPU kernel of dmol_sample: one image from the DMoL per call, pixel by pixel (dmol_math.h's
// sample_pixel: Gumbel-max mixture pick, logistic draw, RGB coupling, clamp to [-1, 1]).
// The randomness is Philox keyed by the seed and counted by the pixel's NCHW index, so the image
// does not depend on the layout or the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dmol_math.h"

namespace vdvae_fast {
namespace {

at::Tensor dmol_sample_cpu(const at::Tensor& logits, int64_t seed) {
  TORCH_CHECK(logits.dim() == 4 && logits.size(1) % 10 == 0 && logits.size(1) > 0,
              "dmol_sample: logits must be (B, 10M, H, W), got ", logits.sizes());
  const int64_t batch = logits.size(0), mixtures = logits.size(1) / 10;
  const int64_t height = logits.size(2), width = logits.size(3), pixels = height * width;
  at::Tensor image = at::empty({batch, 3, height, width},
                               logits.options().dtype(at::kFloat).memory_format(logits.suggest_memory_format()));
  float* out = image.data_ptr<float>();
  const auto out_strides = image.strides();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dmol_sample_cpu", [&] {
    const scalar_t* in = logits.data_ptr<scalar_t>();
    const auto in_strides = logits.strides();
    at::parallel_for(0, batch * pixels, 256, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / pixels, h = (p % pixels) / width, w = p % width;
        const scalar_t* pixel = in + b * in_strides[0] + h * in_strides[2] + w * in_strides[3];
        const auto load = [&](int64_t ch) { return static_cast<float>(pixel[ch * in_strides[1]]); };
        const dmol::PixelSample s =
            dmol::sample_pixel(load, mixtures, static_cast<uint64_t>(seed), static_cast<uint32_t>(p));
        float* dst = out + b * out_strides[0] + h * out_strides[2] + w * out_strides[3];
        for (int c = 0; c < 3; ++c) dst[c * out_strides[1]] = s.x[c];
      }
    });
  });
  return image;
}

}  // namespace

TORCH_LIBRARY_IMPL(vdvae_fast_C, CPU, m) { m.impl("dmol_sample", &dmol_sample_cpu); }

}  // namespace vdvae_fast
