// CPU kernels of the DMoL distortion: dmol_nll_forward (per-image nats per dimension) and its fused
// backward, which recomputes everything from logits and x.
//
// Work is split into tiles of kTile pixels of one image. A tile's 10M channels are gathered through
// the tensor strides into rows of kTile lanes (so channels_last and NCHW are read without copies),
// and every loop over a row is a fixed-length loop over the lanes that the compiler vectorizes,
// dmol_math.h being branch-free. Each tile's sum of per-pixel log-likelihoods goes to its own slot
// and the slots are added in order afterwards, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "dmol_tile.h"
#include "kernel_checks.h"

// The math of the tiles (up to pop_options) is compiled with two GCC options changed:
// -fno-trapping-math, because under the default a float comparison counts as a possible trap,
// which stops the if-conversion of dmol_math.h's selects and with it the vectorization of the
// tile loops (nothing relies on FP exceptions, which PyTorch never unmasks; NaN and inf semantics
// are unchanged); and -fno-thread-jumps, because jump threading turns the shared branch masks of
// colour_term into separate paths that the vectorizer then executes one after another.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math", "no-thread-jumps")
#endif
#include "dmol_math.h"

namespace vdvae_fast {
namespace {

constexpr int64_t kTile = 32;  // pixels per tile: the lane count of the inner loops

// Per-lane logsumexp over `count` rows, split as shift + log_sum (shift = the max, or 0 where the
// max is infinite, as torch.logsumexp does) so that log_softmax = (v - shift) - log_sum keeps the
// precision of large mixture logits.
template <typename acc_t>
void logsumexp_rows(const acc_t* rows, int64_t count, acc_t* shift, acc_t* log_sum) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
#pragma omp simd
  for (int64_t t = 0; t < kTile; ++t) shift[t] = rows[t];
  for (int64_t k = 1; k < count; ++k) {
    const acc_t* row = rows + k * kTile;
#pragma omp simd
    for (int64_t t = 0; t < kTile; ++t) shift[t] = row[t] > shift[t] ? row[t] : shift[t];
  }
#pragma omp simd
  for (int64_t t = 0; t < kTile; ++t) shift[t] = (shift[t] == inf || shift[t] == -inf) ? acc_t(0) : shift[t];
  acc_t sum[kTile] = {};
  for (int64_t k = 0; k < count; ++k) {
    const acc_t* row = rows + k * kTile;
#pragma omp simd
    for (int64_t t = 0; t < kTile; ++t) sum[t] += fast_exp(row[t] - shift[t]);
  }
#pragma omp simd
  for (int64_t t = 0; t < kTile; ++t) log_sum[t] = fast_log(sum[t]);
}

// Scratch of one thread, reused across its tiles
template <typename acc_t>
struct Tile {
  int64_t mixtures;
  std::vector<acc_t> logits;     // 10M rows
  std::vector<acc_t> x;          // 3 rows
  std::vector<acc_t> log_probs;  // M rows: log p(x | k), then + log_softmax(pi)_k
  std::vector<acc_t> grad;       // 10M rows (backward only)
  acc_t mix_shift[kTile], mix_log_sum[kTile], all_shift[kTile], all_log_sum[kTile];

  Tile(int64_t mixtures, bool with_grad)
      : mixtures(mixtures),
        logits(10 * mixtures * kTile),
        x(3 * kTile),
        log_probs(mixtures * kTile),
        grad(with_grad ? 10 * mixtures * kTile : 0) {}

  const acc_t* row(int64_t channel) const { return logits.data() + channel * kTile; }

  // log_probs[k] = sum_c log P(x_c | k); with kGrad, grad rows of mixture k's 9 parameters get
  // d log_probs[k] / d parameter
  template <bool kGrad, bool kSoftplus>
  void mixture_log_probs(const dmol::Bins<acc_t>& bins, const dmol::Scales<kSoftplus, acc_t>& scales) {
    // mixture k's parameter j (mean, log-scale, coeff) of colour c is row M + 3Mc + Mj + k, so
    // its 9 rows lie s = M rows of kTile lanes apart from row M + k
    const int64_t s = mixtures * kTile;
    const acc_t* x0 = x.data();
    const acc_t* x1 = x0 + kTile;
    const acc_t* x2 = x1 + kTile;
    for (int64_t k = 0; k < mixtures; ++k) {
      const acc_t* p = logits.data() + (mixtures + k) * kTile;
      acc_t* d = kGrad ? grad.data() + (mixtures + k) * kTile : nullptr;
      acc_t* out = log_probs.data() + k * kTile;
#pragma omp simd
      for (int64_t t = 0; t < kTile; ++t) {
        const dmol::MixtureParams<acc_t> params{{p[t], p[3 * s + t], p[6 * s + t]},
                                                {p[s + t], p[4 * s + t], p[7 * s + t]},
                                                {p[2 * s + t], p[5 * s + t], p[8 * s + t]}};
        const auto term = dmol::mixture_term<kGrad>(dmol::PixelTargets<acc_t>(x0[t], x1[t], x2[t], bins), params,
                                                    bins, scales);
        out[t] = term.log_prob;
        if (kGrad) {
          for (int c = 0; c < 3; ++c) {
            d[3 * c * s + t] = term.d_mean[c];
            d[(3 * c + 1) * s + t] = term.d_log_scale[c];
            d[(3 * c + 2) * s + t] = term.d_coeff[c];
          }
        }
      }
    }
  }

  // Adds log_softmax(pi) to log_probs; afterwards the per-pixel log-likelihood is
  // all_shift + all_log_sum (the logsumexp over mixtures)
  void mix() {
    logsumexp_rows(row(0), mixtures, mix_shift, mix_log_sum);
    for (int64_t k = 0; k < mixtures; ++k) {
      const acc_t* pi = row(k);
      acc_t* out = log_probs.data() + k * kTile;
#pragma omp simd
      for (int64_t t = 0; t < kTile; ++t) out[t] += (pi[t] - mix_shift[t]) - mix_log_sum[t];
    }
    logsumexp_rows(log_probs.data(), mixtures, all_shift, all_log_sum);
  }

  // Gradient of the tile's pixels' -log p(x), each with weight g = grad_nll / (3 H W); the grad rows
  // hold d log p(x | k) / d param on entry. d/dpi_k = g (softmax(pi)_k - r_k) and
  // d/dparam = -g r_k d log p(x | k) / dparam, with r the posterior responsibilities softmax_k(log_probs).
  void backprop(acc_t g) {
    for (int64_t k = 0; k < mixtures; ++k) {
      const acc_t* pi = row(k);
      const acc_t* lp = log_probs.data() + k * kTile;
      acc_t* d_pi = grad.data() + k * kTile;
      acc_t weight[kTile];
#pragma omp simd
      for (int64_t t = 0; t < kTile; ++t) {
        const acc_t r = fast_exp((lp[t] - all_shift[t]) - all_log_sum[t]);
        const acc_t softmax = fast_exp((pi[t] - mix_shift[t]) - mix_log_sum[t]);
        d_pi[t] = g * (softmax - r);
        weight[t] = -g * r;
      }
      for (int c = 0; c < 3; ++c) {
        for (const int64_t ch : {dmol::mean_channel(mixtures, c, k), dmol::log_scale_channel(mixtures, c, k),
                                 dmol::coeff_channel(mixtures, c, k)}) {
          acc_t* d = grad.data() + ch * kTile;
#pragma omp simd
          for (int64_t t = 0; t < kTile; ++t) d[t] *= weight[t];
        }
      }
    }
  }
};

}  // namespace
}  // namespace vdvae_fast
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

namespace vdvae_fast {
namespace {

struct Geometry {
  int64_t batch, mixtures, height, width, pixels, tiles_per_image;

  Geometry(const at::Tensor& logits)
      : batch(logits.size(0)),
        mixtures(logits.size(1) / 10),
        height(logits.size(2)),
        width(logits.size(3)),
        pixels(height * width),
        tiles_per_image((pixels + kTile - 1) / kTile) {}

  int64_t num_tiles() const { return batch * tiles_per_image; }
};

// Tiles per task: ~16k mixture terms, enough to amortize a thread, small enough to balance
int64_t grain_for(const Geometry& g) { return std::max<int64_t>(1, 16384 / (kTile * g.mixtures)); }

template <typename scalar_t, typename acc_t, typename Scales>
void forward_impl(const at::Tensor& logits, const at::Tensor& x, int64_t num_bits, const Scales& scales,
                  at::Tensor& nll) {
  const Geometry geo(logits);
  const auto bins = dmol::make_bins<acc_t>(num_bits);
  const scalar_t* logits_data = logits.data_ptr<scalar_t>();
  const acc_t* x_data = x.data_ptr<acc_t>();
  std::vector<double> partial(geo.num_tiles());
  at::parallel_for(0, geo.num_tiles(), grain_for(geo), [&](int64_t begin, int64_t end) {
    Tile<acc_t> tile(geo.mixtures, false);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / geo.tiles_per_image;
      const TilePixels<kTile> in_logits(i % geo.tiles_per_image, logits);
      const TilePixels<kTile> in_x(i % geo.tiles_per_image, x);
      gather(logits_data + b * logits.stride(0), logits.size(1), in_logits, tile.logits.data());
      gather(x_data + b * x.stride(0), 3, in_x, tile.x.data());
      tile.template mixture_log_probs<false>(bins, scales);
      tile.mix();
      double sum = 0.0;
      for (int64_t t = 0; t < in_logits.count; ++t) sum += static_cast<double>(tile.all_shift[t] + tile.all_log_sum[t]);
      partial[i] = sum;
    }
  });
  acc_t* out = nll.data_ptr<acc_t>();
  const double dims = 3.0 * static_cast<double>(geo.pixels);
  for (int64_t b = 0; b < geo.batch; ++b) {
    double sum = 0.0;
    for (int64_t j = 0; j < geo.tiles_per_image; ++j) sum += partial[b * geo.tiles_per_image + j];
    out[b] = static_cast<acc_t>(-sum / dims);
  }
}

template <typename scalar_t, typename acc_t, typename Scales>
void backward_impl(const at::Tensor& grad_nll, const at::Tensor& logits, const at::Tensor& x, int64_t num_bits,
                   const Scales& scales, at::Tensor& grad_logits) {
  const Geometry geo(logits);
  const auto bins = dmol::make_bins<acc_t>(num_bits);
  const scalar_t* logits_data = logits.data_ptr<scalar_t>();
  const acc_t* x_data = x.data_ptr<acc_t>();
  const acc_t* grad_nll_data = grad_nll.data_ptr<acc_t>();
  scalar_t* grad_data = grad_logits.data_ptr<scalar_t>();
  const acc_t dims = static_cast<acc_t>(3 * geo.pixels);
  at::parallel_for(0, geo.num_tiles(), grain_for(geo), [&](int64_t begin, int64_t end) {
    Tile<acc_t> tile(geo.mixtures, true);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / geo.tiles_per_image;
      const TilePixels<kTile> in_logits(i % geo.tiles_per_image, logits);
      const TilePixels<kTile> in_x(i % geo.tiles_per_image, x);
      const TilePixels<kTile> in_grad(i % geo.tiles_per_image, grad_logits);
      gather(logits_data + b * logits.stride(0), logits.size(1), in_logits, tile.logits.data());
      gather(x_data + b * x.stride(0), 3, in_x, tile.x.data());
      tile.template mixture_log_probs<true>(bins, scales);
      tile.mix();
      tile.backprop(grad_nll_data[b * grad_nll.stride(0)] / dims);
      scatter(tile.grad.data(), grad_logits.size(1), in_grad, grad_data + b * grad_logits.stride(0));
    }
  });
}

at::Tensor dmol_nll_forward_cpu(const at::Tensor& logits, const at::Tensor& x, int64_t num_bits, int64_t scale,
                                double beta, double log_scale_min) {
  check_dmol_inputs(logits, x, num_bits);
  at::Tensor nll = at::empty({logits.size(0)}, logits.options().dtype(x.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dmol_nll_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dmol::with_scales<acc_t>(scale, beta, log_scale_min, [&](const auto& scales) {
      forward_impl<scalar_t, acc_t>(logits, x, num_bits, scales, nll);
    });
  });
  return nll;
}

at::Tensor dmol_nll_backward_cpu(const at::Tensor& grad_nll, const at::Tensor& logits, const at::Tensor& x,
                                 int64_t num_bits, int64_t scale, double beta, double log_scale_min) {
  check_dmol_inputs(logits, x, num_bits);
  TORCH_CHECK(grad_nll.dim() == 1 && grad_nll.size(0) == logits.size(0) && grad_nll.scalar_type() == x.scalar_type(),
              "dmol: grad_nll must be (B,) in the math dtype, got ", grad_nll.sizes(), " ", grad_nll.scalar_type());
  at::Tensor grad_logits = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dmol_nll_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dmol::with_scales<acc_t>(scale, beta, log_scale_min, [&](const auto& scales) {
      backward_impl<scalar_t, acc_t>(grad_nll, logits, x, num_bits, scales, grad_logits);
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(vdvae_fast_C, CPU, m) {
  m.impl("dmol_nll_forward", &dmol_nll_forward_cpu);
  m.impl("dmol_nll_backward", &dmol_nll_backward_cpu);
}

}  // namespace vdvae_fast
