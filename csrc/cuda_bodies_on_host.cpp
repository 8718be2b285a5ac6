// The CUDA kernels' per-pixel bodies (dmol_math.h's dmol_nll_forward_pixel, dmol_nll_backward_pixel,
// dmol_sample_pixel) run on the host, pixel by pixel over float32 CPU tensors, so that a CPU test can
// hold the very functions the GPU runs against the eager reference: only the kernels' indexing and
// their device math functions (fast_math.h's fast_* on MUFU) are left for a GPU to confirm. M = 10
// runs the unrolled instantiation the kernels use, other M the run-time one.
//
// The Gaussian kernels' per-packet bodies (gaussian_packets.h) run the same way, packet by packet in the
// order of a single CUDA thread, with packets of 4 floats (the kernels' 16 bytes) or single elements, and
// the random ops' work items as the kernels choose them (pixel quads where channels_last allows): their
// indexing and eps included, only the grid and the block reduction of the KL are the GPU's own.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "dmol_math.h"
#include "gaussian_packets.h"
#include "gaussian_parametrization.h"
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

// The Gaussian bodies take float32 CPU tensors of one dense layout and packets of `vec` = 4 or 1 elements.
template <int kVec>
using Vec = std::integral_constant<int, kVec>;

void check_packets(const at::Tensor& t, int64_t vec, int64_t count) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "the CUDA bodies run on float32 CPU tensors, got ",
              t.scalar_type(), " on ", t.device());
  check_dense(t, "the Gaussian CUDA bodies");
  TORCH_CHECK(vec == 1 || (vec == 4 && count % 4 == 0), "packets of vec = 4 floats need a multiple of 4 elements (per ",
              "image for sample_and_kl), got vec = ", vec, " for ", count);
}

template <typename Body>
void with_packets(const at::Tensor& t, int64_t vec, int64_t count, Body&& body) {
  check_packets(t, vec, count);
  if (vec == 4) {
    body(Vec<4>());
  } else {
    body(Vec<1>());
  }
}

// For the ops that draw: body(Vec<kVec>, Vec<kItem>) with the work items the CUDA launch takes for this layout
// when its packets are `vec` elements wide.
template <typename Body>
void with_items(const at::Tensor& t, int64_t vec, int64_t count, const gaussian::DenseLayout& layout, Body&& body) {
  check_packets(t, vec, count);
  gaussian::with_work_items<4>(vec == 4, layout, body);
}

std::tuple<at::Tensor, at::Tensor> sample_and_kl_forward_cuda_body_on_host(
    const at::Tensor& mu_q, const at::Tensor& logsigma_q, const at::Tensor& mu_p, const at::Tensor& logsigma_p,
    int64_t seed, int64_t scale, double beta, int64_t posterior, int64_t kl_estimator, int64_t vec) {
  const gaussian::DenseLayout layout = gaussian::layout_of(mu_q);
  at::Tensor z = at::empty_like(mu_q);
  at::Tensor kl = at::zeros({mu_q.size(0)}, mu_q.options());
  with_items(mu_q, vec, layout.image_size, layout, [&](auto packet, auto item) {
    constexpr int kVec = decltype(packet)::value, kItem = decltype(item)::value;
    gaussian::with_form(scale, posterior, kl_estimator, beta, "sample_and_kl", [&](auto form) {
      const auto constants = gaussian::ScaleConstants<float>::of(beta);
      const int64_t items = layout.image_size / kItem;
      for (int64_t image = 0; image < mu_q.size(0); ++image) {
        float sum = 0.0f;
        for (int64_t i = 0; i < items; ++i) {
          gaussian::for_item_packets<kVec, kItem>(
              image * items + i, layout, static_cast<uint64_t>(seed), [&](int64_t p, const float(&eps)[kVec]) {
                gaussian::sample_and_kl_forward_packet<decltype(form), kVec>(
                    mu_q.data_ptr<float>(), logsigma_q.data_ptr<float>(), mu_p.data_ptr<float>(),
                    logsigma_p.data_ptr<float>(), z.data_ptr<float>(), sum, p, eps, constants);
              });
        }
        kl.data_ptr<float>()[image] = sum;
      }
    });
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_and_kl_backward_cuda_body_on_host(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& mu_q, const at::Tensor& logsigma_q,
    const at::Tensor& mu_p, const at::Tensor& logsigma_p, int64_t seed, int64_t scale, double beta, int64_t posterior,
    int64_t kl_estimator, int64_t vec) {
  const gaussian::DenseLayout layout = gaussian::layout_of(mu_q);
  at::Tensor g_mu_q = at::empty_like(mu_q), g_logsigma_q = at::empty_like(mu_q);
  at::Tensor g_mu_p = at::empty_like(mu_q), g_logsigma_p = at::empty_like(mu_q);
  const at::Tensor upstream = grad_kl.contiguous();
  with_items(mu_q, vec, layout.image_size, layout, [&](auto packet, auto item) {
    constexpr int kVec = decltype(packet)::value, kItem = decltype(item)::value;
    gaussian::with_form(scale, posterior, kl_estimator, beta, "sample_and_kl", [&](auto form) {
      const auto constants = gaussian::ScaleConstants<float>::of(beta);
      const int64_t items = layout.image_size / kItem;
      for (int64_t image = 0; image < mu_q.size(0); ++image) {
        for (int64_t i = 0; i < items; ++i) {
          gaussian::for_item_packets<kVec, kItem>(
              image * items + i, layout, static_cast<uint64_t>(seed), [&](int64_t p, const float(&eps)[kVec]) {
                gaussian::sample_and_kl_backward_packet<decltype(form), kVec>(
                    grad_z.data_ptr<float>(), upstream.data_ptr<float>()[image], mu_q.data_ptr<float>(),
                    logsigma_q.data_ptr<float>(), mu_p.data_ptr<float>(), logsigma_p.data_ptr<float>(),
                    g_mu_q.data_ptr<float>(), g_logsigma_q.data_ptr<float>(), g_mu_p.data_ptr<float>(),
                    g_logsigma_p.data_ptr<float>(), p, eps, constants);
              });
        }
      }
    });
  });
  return {g_mu_q, g_logsigma_q, g_mu_p, g_logsigma_p};
}

at::Tensor gaussian_kl_forward_cuda_body_on_host(const at::Tensor& mu_q, const at::Tensor& logsigma_q,
                                                 const at::Tensor& mu_p, const at::Tensor& logsigma_p, int64_t scale,
                                                 double beta, int64_t posterior, int64_t vec) {
  at::Tensor kl = at::empty_like(mu_q);
  with_packets(mu_q, vec, mu_q.numel(), [&](auto packet) {
    constexpr int kVec = decltype(packet)::value;
    gaussian::with_form(scale, posterior, beta, "gaussian_kl", [&](auto form) {
      const auto constants = gaussian::ScaleConstants<float>::of(beta);
      for (int64_t p = 0; p < mu_q.numel() / kVec; ++p) {
        gaussian::gaussian_kl_forward_packet<decltype(form), kVec>(
            mu_q.data_ptr<float>(), logsigma_q.data_ptr<float>(), mu_p.data_ptr<float>(), logsigma_p.data_ptr<float>(),
            kl.data_ptr<float>(), p, constants);
      }
    });
  });
  return kl;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_kl_backward_cuda_body_on_host(
    const at::Tensor& grad_kl, const at::Tensor& mu_q, const at::Tensor& logsigma_q, const at::Tensor& mu_p,
    const at::Tensor& logsigma_p, int64_t scale, double beta, int64_t posterior, int64_t vec) {
  at::Tensor g_mu_q = at::empty_like(mu_q), g_logsigma_q = at::empty_like(mu_q);
  at::Tensor g_mu_p = at::empty_like(mu_q), g_logsigma_p = at::empty_like(mu_q);
  with_packets(mu_q, vec, mu_q.numel(), [&](auto packet) {
    constexpr int kVec = decltype(packet)::value;
    gaussian::with_form(scale, posterior, beta, "gaussian_kl", [&](auto form) {
      const auto constants = gaussian::ScaleConstants<float>::of(beta);
      for (int64_t p = 0; p < mu_q.numel() / kVec; ++p) {
        gaussian::gaussian_kl_backward_packet<decltype(form), kVec>(
            grad_kl.data_ptr<float>(), mu_q.data_ptr<float>(), logsigma_q.data_ptr<float>(), mu_p.data_ptr<float>(),
            logsigma_p.data_ptr<float>(), g_mu_q.data_ptr<float>(), g_logsigma_q.data_ptr<float>(),
            g_mu_p.data_ptr<float>(), g_logsigma_p.data_ptr<float>(), p, constants);
      }
    });
  });
  return {g_mu_q, g_logsigma_q, g_mu_p, g_logsigma_p};
}

// sample_gaussian's work items in the order the CUDA kernels cut them; body(form, packet, p, eps, constants)
// runs one packet's body (packet: the packet width as an integral constant).
template <typename Body>
void for_each_sample_gaussian_packet(const at::Tensor& mu, int64_t seed, int64_t scale, double beta, int64_t vec,
                                     Body&& body) {
  const gaussian::DenseLayout layout = gaussian::layout_of(mu);
  with_items(mu, vec, mu.numel(), layout, [&](auto packet, auto item) {
    constexpr int kVec = decltype(packet)::value, kItem = decltype(item)::value;
    gaussian::with_form(scale, beta, "sample_gaussian", [&](auto form) {
      const auto constants = gaussian::ScaleConstants<float>::of(beta);
      for (int64_t i = 0; i < mu.numel() / kItem; ++i) {
        gaussian::for_item_packets<kVec, kItem>(
            i, layout, static_cast<uint64_t>(seed),
            [&](int64_t p, const float(&eps)[kVec]) { body(form, packet, p, eps, constants); });
      }
    });
  });
}

at::Tensor sample_gaussian_forward_cuda_body_on_host(const at::Tensor& mu, const at::Tensor& logsigma,
                                                     double temperature, int64_t seed, int64_t scale, double beta,
                                                     int64_t vec) {
  at::Tensor z = at::empty_like(mu);
  for_each_sample_gaussian_packet(mu, seed, scale, beta, vec, [&](auto form, auto packet, int64_t p, const auto& eps,
                                                                   const auto& constants) {
    gaussian::sample_gaussian_forward_packet<decltype(form), decltype(packet)::value>(
        mu.data_ptr<float>(), logsigma.data_ptr<float>(), z.data_ptr<float>(), p, static_cast<float>(temperature), eps,
        constants);
  });
  return z;
}

at::Tensor sample_gaussian_backward_cuda_body_on_host(const at::Tensor& grad_z, const at::Tensor& mu,
                                                     const at::Tensor& logsigma, double temperature, int64_t seed,
                                                     int64_t scale, double beta, int64_t vec) {
  at::Tensor g_logsigma = at::empty_like(mu);
  for_each_sample_gaussian_packet(mu, seed, scale, beta, vec, [&](auto form, auto packet, int64_t p, const auto& eps,
                                                                   const auto& constants) {
    gaussian::sample_gaussian_backward_packet<decltype(form), decltype(packet)::value>(
        grad_z.data_ptr<float>(), logsigma.data_ptr<float>(), g_logsigma.data_ptr<float>(), p,
        static_cast<float>(temperature), eps, constants);
  });
  return g_logsigma;
}

}  // namespace

TORCH_LIBRARY_IMPL(vdvae_fast_C, CPU, m) {
  m.impl("dmol_nll_forward_cuda_body_on_host", &dmol_nll_forward_cuda_body_on_host);
  m.impl("dmol_nll_backward_cuda_body_on_host", &dmol_nll_backward_cuda_body_on_host);
  m.impl("dmol_sample_forward_cuda_body_on_host", &dmol_sample_forward_cuda_body_on_host);
  m.impl("sample_and_kl_forward_cuda_body_on_host", &sample_and_kl_forward_cuda_body_on_host);
  m.impl("sample_and_kl_backward_cuda_body_on_host", &sample_and_kl_backward_cuda_body_on_host);
  m.impl("gaussian_kl_forward_cuda_body_on_host", &gaussian_kl_forward_cuda_body_on_host);
  m.impl("gaussian_kl_backward_cuda_body_on_host", &gaussian_kl_backward_cuda_body_on_host);
  m.impl("sample_gaussian_forward_cuda_body_on_host", &sample_gaussian_forward_cuda_body_on_host);
  m.impl("sample_gaussian_backward_cuda_body_on_host", &sample_gaussian_backward_cuda_body_on_host);
}

}  // namespace vdvae_fast
