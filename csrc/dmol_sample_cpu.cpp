// CPU kernel of dmol_sample: the steps of dmol_math.h's dmol_sample_pixel (Gumbel-max mixture pick,
// logistic draw, RGB coupling, clamp to [-1, 1]) over tiles of kTile pixels of one image, each step a
// loop over the tile's lanes that the compiler vectorizes (Philox included). Float NCHW logits are
// read in place, one contiguous row per channel; other layouts and dtypes are gathered into rows.
// The randomness is Philox keyed by the seed and counted by the pixel's NCHW index, so the image
// does not depend on the layout, the tiling or the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "dmol_tile.h"

// The tile math (up to pop_options) is compiled as dmol_nll_cpu.cpp's, with -fno-trapping-math and
// -fno-thread-jumps, without which gcc does not if-convert dmol_math.h's selects and the loops stay
// scalar.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math", "no-thread-jumps")
#endif
#include "dmol_math.h"

namespace vdvae_fast {
namespace {

constexpr int64_t kTile = 256;  // pixels per tile: the lane count of the inner loops

// Per-lane state of a tile between the steps, as structure of arrays
struct Lanes {
  alignas(64) float best[kTile];
  alignas(64) int32_t choice[kTile];
  alignas(64) float mean[3][kTile];
  alignas(64) float raw_log_scale[3][kTile];
  alignas(64) float raw_coeff[3][kTile];
  alignas(64) float x[3][kTile];
  alignas(64) float uniform[4][kTile];         // the four streams of one Philox group
  alignas(64) float colour_uniform[3][kTile];  // streams M, M + 1, M + 2

  dmol::ChosenMixture chosen(int64_t t) const {
    dmol::ChosenMixture m;
    for (int c = 0; c < 3; ++c) {
      m.mean[c] = mean[c][t];
      m.raw_log_scale[c] = raw_log_scale[c][t];
      m.raw_coeff[c] = raw_coeff[c][t];
    }
    return m;
  }

  void set_chosen(int64_t t, const dmol::ChosenMixture& m) {
    for (int c = 0; c < 3; ++c) {
      mean[c][t] = m.mean[c];
      raw_log_scale[c][t] = m.raw_log_scale[c];
      raw_coeff[c][t] = m.raw_coeff[c];
    }
  }
};

// dmol_sample_pixel's steps for the `count` lanes of a tile, on its channel rows (channel ch of lane t at
// rows[ch * row_stride + t]). flatten inlines Philox and the math into the loops, where a call would
// stop the vectorizer.
template <bool kSoftplus>
__attribute__((flatten)) void sample_tile(const float* __restrict__ rows, int64_t row_stride, int64_t mixtures,
                                          int64_t count, const dmol::Scales<kSoftplus, float>& scales, uint64_t seed,
                                          uint32_t first_pixel, Lanes& lanes) {
  for (int64_t t = 0; t < count; ++t) {
    lanes.best[t] = -std::numeric_limits<float>::infinity();
    lanes.choice[t] = 0;
  }
  // streams 0..M-1 are the Gumbel uniforms, M..M+2 the colours'; one Philox call draws four streams
  for (int64_t group = 0; 4 * group < mixtures + 3; ++group) {
    for (int64_t t = 0; t < count; ++t) {
      const OpenUniforms4 u =
          philox_open_uniforms(seed, first_pixel + static_cast<uint32_t>(t), static_cast<uint32_t>(group));
      for (int lane = 0; lane < 4; ++lane) lanes.uniform[lane][t] = u.u[lane];
    }
    for (int64_t lane = 0; lane < 4; ++lane) {
      const int64_t k = 4 * group + lane;
      const float* u = lanes.uniform[lane];
      if (k < mixtures) {
        const float* logit = rows + k * row_stride;
        for (int64_t t = 0; t < count; ++t) {
          const float score = dmol::gumbel_score(logit[t], u[t]);
          const bool replace = dmol::replaces_best(lanes.best[t], score);
          lanes.best[t] = replace ? score : lanes.best[t];
          lanes.choice[t] = replace ? static_cast<int32_t>(k) : lanes.choice[t];
        }
      } else if (k < mixtures + 3) {
        std::copy(u, u + count, lanes.colour_uniform[k - mixtures]);
      }
    }
  }
  for (int64_t t = 0; t < count; ++t) lanes.set_chosen(t, dmol::ChosenMixture{});
  // mixture k's parameter j of colour c is channel M + 3Mc + Mj + k: its 9 rows lie s apart from row M + k
  const int64_t s = mixtures * row_stride;
  for (int64_t k = 0; k < mixtures; ++k) {
    const float* p = rows + (mixtures + k) * row_stride;
    for (int64_t t = 0; t < count; ++t) {
      dmol::ChosenMixture chosen = lanes.chosen(t);
      chosen.add(lanes.choice[t] == k, {{p[t], p[3 * s + t], p[6 * s + t]},
                                        {p[s + t], p[4 * s + t], p[7 * s + t]},
                                        {p[2 * s + t], p[5 * s + t], p[8 * s + t]}});
      lanes.set_chosen(t, chosen);
    }
  }
  for (int64_t t = 0; t < count; ++t) {
    const float u[3] = {lanes.colour_uniform[0][t], lanes.colour_uniform[1][t], lanes.colour_uniform[2][t]};
    const dmol::PixelSample x = lanes.chosen(t).sample(scales, u);
    for (int c = 0; c < 3; ++c) lanes.x[c][t] = x.x[c];
  }
}

}  // namespace
}  // namespace vdvae_fast
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

namespace vdvae_fast {
namespace {

at::Tensor dmol_sample_forward_cpu(const at::Tensor& logits, int64_t scale, double beta, double log_scale_min,
                                   int64_t seed) {
  TORCH_CHECK(logits.dim() == 4 && logits.size(1) % 10 == 0 && logits.size(1) > 0,
              "dmol_sample: logits must be (B, 10M, H, W), got ", logits.sizes());
  const int64_t batch = logits.size(0), channels = logits.size(1), mixtures = channels / 10;
  const int64_t pixels = logits.size(2) * logits.size(3), tiles_per_image = (pixels + kTile - 1) / kTile;
  at::Tensor image = at::empty({batch, 3, logits.size(2), logits.size(3)},
                               logits.options().dtype(at::kFloat).memory_format(logits.suggest_memory_format()));
  float* out = image.data_ptr<float>();
  // Tiles per task: ~16k Gumbel draws, enough to amortize a thread, small enough to balance
  const int64_t grain = std::max<int64_t>(1, 16384 / (kTile * mixtures));
  dmol::with_scales<float>(scale, beta, log_scale_min, [&](const auto& scales) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dmol_sample_forward_cpu", [&] {
      const scalar_t* in = logits.data_ptr<scalar_t>();
      at::parallel_for(0, batch * tiles_per_image, grain, [&](int64_t begin, int64_t end) {
        Lanes lanes;
        std::vector<float> gathered;
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = i / tiles_per_image;
          const TilePixels<kTile> in_logits(i % tiles_per_image, logits);
          const scalar_t* image_in = in + b * logits.stride(0);
          // float rows that are consecutive in memory are read in place
          const float* rows;
          int64_t row_stride;
          if (std::is_same<scalar_t, float>::value && in_logits.pixel_stride == 1) {
            rows = reinterpret_cast<const float*>(image_in) + in_logits.first;
            row_stride = in_logits.channel_stride;
          } else {
            gathered.resize(channels * kTile);
            gather(image_in, channels, in_logits, gathered.data());
            rows = gathered.data();
            row_stride = kTile;
          }
          sample_tile(rows, row_stride, mixtures, in_logits.count, scales, static_cast<uint64_t>(seed),
                      static_cast<uint32_t>(b * pixels + in_logits.first), lanes);
          scatter(&lanes.x[0][0], 3, TilePixels<kTile>(i % tiles_per_image, image), out + b * image.stride(0));
        }
      });
    });
  });
  return image;
}

}  // namespace

TORCH_LIBRARY_IMPL(vdvae_fast_C, CPU, m) { m.impl("dmol_sample", &dmol_sample_forward_cpu); }

}  // namespace vdvae_fast
