// The CUDA kernels' per-pixel bodies (dmol_math.h's dmol_nll_forward_pixel, dmol_nll_backward_pixel,
// dmol_sample_pixel) run on the host, pixel by pixel over float32 CPU tensors, so that a CPU test can
// hold the very functions the GPU runs against the eager reference: only the kernels' indexing and
// their device math functions (fast_math.h's fast_* on MUFU) are left for a GPU to confirm. M = 10
// runs the unrolled instantiation the kernels use, other M the run-time one.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "dmol_math.h"
#include "kernel_checks.h"

namespace vdvae_fast {
namespace {

constexpr int kCommonMixtures = 10;

// The channels of one pixel, gathered into a float array
struct HostPixel {
  float* base;

  float& operator()(int64_t ch) const { return base[ch]; }
};

// Calls body(pixel channels, image b, pixel p, x0, x1, x2) for every pixel, with the channels gathered
// from and, after the body, scattered back into `logits` (contiguous float32)
template <typename Body>
void for_each_pixel(at::Tensor& logits, const at::Tensor& x, const Body& body) {
  const int64_t batch = logits.size(0), channels = logits.size(1), pixels = logits.size(2) * logits.size(3);
  float* data = logits.data_ptr<float>();
  const float* targets = x.data_ptr<float>();
  std::vector<float> channel(channels);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t p = 0; p < pixels; ++p) {
      float* image = data + b * channels * pixels;
      for (int64_t ch = 0; ch < channels; ++ch) channel[ch] = image[ch * pixels + p];
      const float* xp = targets + b * 3 * pixels + p;
      body(HostPixel{channel.data()}, b, p, xp[0], xp[pixels], xp[2 * pixels]);
      for (int64_t ch = 0; ch < channels; ++ch) image[ch * pixels + p] = channel[ch];
    }
  }
}

void check_float32(const at::Tensor& logits, const at::Tensor& x, int64_t num_bits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat,
              "the CUDA bodies run on float32 CPU tensors, got ", logits.scalar_type(), " on ", logits.device());
  check_dmol_inputs(logits, x, num_bits);
}

at::Tensor dmol_nll_forward_cuda_body_on_host(const at::Tensor& logits, const at::Tensor& x, int64_t num_bits,
                                              int64_t scale, double beta, double log_scale_min) {
  check_float32(logits, x, num_bits);
  at::Tensor work = logits.contiguous().clone();
  const int64_t mixtures = logits.size(1) / 10, pixels = logits.size(2) * logits.size(3);
  const auto bins = dmol::make_bins<float>(num_bits);
  std::vector<double> sums(logits.size(0), 0.0);
  dmol::with_scales<float>(scale, beta, log_scale_min, [&](const auto& scales) {
    for_each_pixel(work, x.contiguous(),
                   [&](const HostPixel& channel, int64_t b, int64_t, float x0, float x1, float x2) {
                     sums[b] += mixtures == kCommonMixtures
                                    ? dmol::dmol_nll_forward_pixel<kCommonMixtures>(channel, mixtures, x0, x1, x2,
                                                                                    bins, scales)
                                    : dmol::dmol_nll_forward_pixel<0>(channel, mixtures, x0, x1, x2, bins, scales);
                   });
  });
  at::Tensor nll = at::empty({logits.size(0)}, logits.options());
  for (int64_t b = 0; b < logits.size(0); ++b) nll[b] = -sums[b] / (3.0 * static_cast<double>(pixels));
  return nll;
}

at::Tensor dmol_nll_backward_cuda_body_on_host(const at::Tensor& grad_nll, const at::Tensor& logits,
                                               const at::Tensor& x, int64_t num_bits, int64_t scale, double beta,
                                               double log_scale_min) {
  check_float32(logits, x, num_bits);
  at::Tensor grad = logits.contiguous().clone();
  const int64_t mixtures = logits.size(1) / 10, pixels = logits.size(2) * logits.size(3);
  const auto bins = dmol::make_bins<float>(num_bits);
  const at::Tensor upstream = grad_nll.to(at::kFloat).contiguous();
  std::vector<float> joint(mixtures);
  const HostPixel joints{joint.data()};
  dmol::with_scales<float>(scale, beta, log_scale_min, [&](const auto& scales) {
    for_each_pixel(grad, x.contiguous(),
                   [&](const HostPixel& channel, int64_t b, int64_t, float x0, float x1, float x2) {
                     const float g = upstream.data_ptr<float>()[b] / static_cast<float>(3 * pixels);
                     if (mixtures == kCommonMixtures) {
                       dmol::dmol_nll_backward_pixel<kCommonMixtures>(channel, joints, mixtures, x0, x1, x2, bins,
                                                                      scales, g);
                     } else {
                       dmol::dmol_nll_backward_pixel<0>(channel, joints, mixtures, x0, x1, x2, bins, scales, g);
                     }
                   });
  });
  return grad;
}

at::Tensor dmol_sample_forward_cuda_body_on_host(const at::Tensor& logits, int64_t scale, double beta,
                                                 double log_scale_min, int64_t seed) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 4 &&
                  logits.size(1) % 10 == 0 && logits.size(1) > 0,
              "the CUDA bodies run on float32 CPU logits (B, 10M, H, W), got ", logits.sizes(), " ",
              logits.scalar_type());
  at::Tensor work = logits.contiguous().clone();
  const int64_t mixtures = logits.size(1) / 10, pixels = logits.size(2) * logits.size(3);
  at::Tensor image = at::empty({logits.size(0), 3, logits.size(2), logits.size(3)}, logits.options());
  float* out = image.data_ptr<float>();
  const at::Tensor unused_targets = at::zeros({logits.size(0), 3, logits.size(2), logits.size(3)}, logits.options());
  dmol::with_scales<float>(scale, beta, log_scale_min, [&](const auto& scales) {
    for_each_pixel(work, unused_targets, [&](const HostPixel& channel, int64_t b, int64_t p, float, float, float) {
      const auto counter = static_cast<uint32_t>(b * pixels + p);
      const auto key = static_cast<uint64_t>(seed);
      const dmol::PixelSample s =
          mixtures == kCommonMixtures
              ? dmol::dmol_sample_pixel<kCommonMixtures>(channel, mixtures, scales, key, counter)
              : dmol::dmol_sample_pixel<0>(channel, mixtures, scales, key, counter);
      for (int c = 0; c < 3; ++c) out[(b * 3 + c) * pixels + p] = s.x[c];
    });
  });
  return image;
}

}  // namespace

TORCH_LIBRARY_IMPL(vdvae_fast_C, CPU, m) {
  m.impl("dmol_nll_forward_cuda_body_on_host", &dmol_nll_forward_cuda_body_on_host);
  m.impl("dmol_nll_backward_cuda_body_on_host", &dmol_nll_backward_cuda_body_on_host);
  m.impl("dmol_sample_forward_cuda_body_on_host", &dmol_sample_forward_cuda_body_on_host);
}

}  // namespace vdvae_fast
