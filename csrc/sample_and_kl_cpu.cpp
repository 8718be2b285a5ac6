// CPU kernels of sample_and_kl: one fused pass draws VDVAE's posterior sample z = mu_q + sigma_q·eps and
// sums the rate KL(q‖p) (or its sampled estimate) per image, in every parametrization (gaussian_math.h, one
// instantiation of the loops each); backward regenerates eps from (seed, logical index).
//
// Every image is a contiguous block of memory in both layouts, cut into fixed chunks of about kChunk elements
// (whole pixel quads where channels_last tiles draw by quads).
// A chunk's KL partial is summed in a fixed order (per-lane tile sums, then double), and the partials
// of an image are added in chunk order, so the result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "gaussian_math.h"
#include "gaussian_parametrization.h"
#include "kernel_checks.h"

namespace vdvae_fast {
namespace {

constexpr int64_t kChunk = 16384;          // elements of one work item and one KL partial, at most
constexpr int kTile = 256;                 // elements per stack-buffered tile
constexpr int kLanes = 16;                 // independent accumulators, one SIMD register of floats
constexpr int64_t kGrainElements = 32768;  // below this much work, stay on one thread

// The image-aligned chunks shared by forward and backward: `size` elements each (an image's last may be
// shorter), a multiple of the layout's work alignment, which divides the image.
struct Chunks {
  int64_t per_image;
  int64_t size;
  int64_t per_image_chunks;

  int64_t count(int64_t batch) const { return batch * per_image_chunks; }
  int64_t image(int64_t item) const { return item / per_image_chunks; }
  int64_t begin(int64_t item) const { return image(item) * per_image + (item % per_image_chunks) * size; }
  int64_t end(int64_t item) const { return std::min(begin(item) + size, (image(item) + 1) * per_image); }
  int64_t grain() const {
    return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, std::min(per_image, size)));
  }
};

Chunks chunks_of(const gaussian::DenseLayout& layout) {
  const int64_t per_image = layout.image_size, unit = gaussian::work_alignment(layout);
  const int64_t size = std::max(unit, kChunk / unit * unit);
  return {per_image, size, (per_image + size - 1) / size};
}

// Sum of values[0, count) in a fixed order; pads the buffer (of kTile entries) with zeros up to the lanes.
template <typename T>
double tile_sum(T* values, int count) {
  const int padded = (count + kLanes - 1) / kLanes * kLanes;
  for (int k = count; k < padded; ++k) values[k] = T(0);
  T lanes[kLanes] = {};
  for (int k = 0; k < padded; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += values[k + l];
  }
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += static_cast<double>(lanes[l]);
  return sum;
}

// The math of one tile on opmath arrays. Restrict pointers are what lets gcc vectorize: through the
// kernels' lambda captures it would have to prove that the arrays do not overlap, and gives up.
// VF_VECTOR_LOOP inlines the math functions into the loop.
template <typename F, typename T>
VF_VECTOR_LOOP void forward_tile(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ mu_p,
                                 const T* __restrict__ raw_p, const float* __restrict__ eps, T* __restrict__ z,
                                 T* __restrict__ kl, int count, gaussian::ScaleConstants<T> constants) {
  for (int k = 0; k < count; ++k) {
    const gaussian::SampleAndKl<T> out = gaussian::sample_and_kl<F>(a[k], b[k], mu_p[k], raw_p[k], eps[k], constants);
    z[k] = out.z;
    kl[k] = out.kl;
  }
}

template <typename F, typename T>
VF_VECTOR_LOOP void backward_tile(const T* __restrict__ grad_z, T grad_kl, const T* __restrict__ a,
                                  const T* __restrict__ b, const T* __restrict__ mu_p, const T* __restrict__ raw_p,
                                  const float* __restrict__ eps, T* __restrict__ g_a, T* __restrict__ g_b,
                                  T* __restrict__ g_mu_p, T* __restrict__ g_raw_p, int count,
                                  gaussian::ScaleConstants<T> constants) {
  for (int k = 0; k < count; ++k) {
    const gaussian::InputGrads<T> d =
        gaussian::sample_and_kl_grads<F>(grad_z[k], grad_kl, a[k], b[k], mu_p[k], raw_p[k], eps[k], constants);
    g_a[k] = d.a;
    g_b[k] = d.b;
    g_mu_p[k] = d.mu_p;
    g_raw_p[k] = d.raw_p;
  }
}

template <typename scalar_t, typename F>
void forward_parallel(const scalar_t* mu_q, const scalar_t* logsigma_q, const scalar_t* mu_p,
                      const scalar_t* logsigma_p, scalar_t* z, at::opmath_type<scalar_t>* kl, int64_t batch,
                      gaussian::DenseLayout layout, uint64_t seed, double beta) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto constants = gaussian::ScaleConstants<opmath_t>::of(beta);
  const Chunks chunks = chunks_of(layout);
  std::vector<double> partial(chunks.count(batch), 0.0);
  at::parallel_for(0, chunks.count(batch), chunks.grain(), [&](int64_t first, int64_t last) {
    alignas(64) opmath_t kl_tile[kTile];
    gaussian::Staging<scalar_t, opmath_t, 5, kTile> tile;
    for (int64_t item = first; item < last; ++item) {
      double sum = 0.0;
      gaussian::for_each_eps_tile<kTile>(
          chunks.begin(item), chunks.end(item), seed, layout, [&](int64_t start, int count, const float* eps) {
            forward_tile<F>(tile.load(mu_q + start, 0, count), tile.load(logsigma_q + start, 1, count),
                            tile.load(mu_p + start, 2, count), tile.load(logsigma_p + start, 3, count), eps,
                            tile.output(z + start, 4), kl_tile, count, constants);
            tile.store(z + start, 4, count);
            sum += tile_sum(kl_tile, count);
          });
      partial[item] = sum;
    }
  });
  for (int64_t b = 0; b < batch; ++b) {
    double sum = 0.0;
    for (int64_t c = 0; c < chunks.per_image_chunks; ++c) sum += partial[b * chunks.per_image_chunks + c];
    kl[b] = static_cast<opmath_t>(sum);
  }
}

template <typename scalar_t, typename F>
void backward_parallel(const scalar_t* grad_z, const at::opmath_type<scalar_t>* grad_kl, const scalar_t* mu_q,
                       const scalar_t* logsigma_q, const scalar_t* mu_p, const scalar_t* logsigma_p, scalar_t* g_mu_q,
                       scalar_t* g_logsigma_q, scalar_t* g_mu_p, scalar_t* g_logsigma_p, int64_t batch,
                       gaussian::DenseLayout layout, uint64_t seed, double beta) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto constants = gaussian::ScaleConstants<opmath_t>::of(beta);
  const Chunks chunks = chunks_of(layout);
  at::parallel_for(0, chunks.count(batch), chunks.grain(), [&](int64_t first, int64_t last) {
    gaussian::Staging<scalar_t, opmath_t, 9, kTile> tile;
    for (int64_t item = first; item < last; ++item) {
      const opmath_t grad_kl_image = grad_kl[chunks.image(item)];
      gaussian::for_each_eps_tile<kTile>(
          chunks.begin(item), chunks.end(item), seed, layout, [&](int64_t start, int count, const float* eps) {
            backward_tile<F>(tile.load(grad_z + start, 0, count), grad_kl_image, tile.load(mu_q + start, 1, count),
                             tile.load(logsigma_q + start, 2, count), tile.load(mu_p + start, 3, count),
                             tile.load(logsigma_p + start, 4, count), eps, tile.output(g_mu_q + start, 5),
                             tile.output(g_logsigma_q + start, 6), tile.output(g_mu_p + start, 7),
                             tile.output(g_logsigma_p + start, 8), count, constants);
            tile.store(g_mu_q + start, 5, count);
            tile.store(g_logsigma_q + start, 6, count);
            tile.store(g_mu_p + start, 7, count);
            tile.store(g_logsigma_p + start, 8, count);
          });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sample_and_kl_forward_cpu(const at::Tensor& mu_q, const at::Tensor& logsigma_q,
                                                             const at::Tensor& mu_p, const at::Tensor& logsigma_p,
                                                             int64_t seed, int64_t scale, double beta,
                                                             int64_t posterior, int64_t kl_estimator) {
  check_dense(mu_q, "sample_and_kl");
  const int64_t batch = mu_q.size(0);
  at::Tensor z = at::empty_like(mu_q);
  at::Tensor kl =
      at::empty({batch}, mu_q.options().dtype(mu_q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  gaussian::with_form(scale, posterior, kl_estimator, beta, "sample_and_kl", [&](auto form) {
    using F = decltype(form);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu_q.scalar_type(), "sample_and_kl_forward_cpu", [&] {
      forward_parallel<scalar_t, F>(mu_q.data_ptr<scalar_t>(), logsigma_q.data_ptr<scalar_t>(),
                                    mu_p.data_ptr<scalar_t>(), logsigma_p.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                    kl.data_ptr<at::opmath_type<scalar_t>>(), batch, gaussian::layout_of(mu_q),
                                    static_cast<uint64_t>(seed), beta);
    });
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_and_kl_backward_cpu(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& mu_q, const at::Tensor& logsigma_q,
    const at::Tensor& mu_p, const at::Tensor& logsigma_p, int64_t seed, int64_t scale, double beta, int64_t posterior,
    int64_t kl_estimator) {
  check_dense(mu_q, "sample_and_kl");
  at::Tensor g_mu_q = at::empty_like(mu_q), g_logsigma_q = at::empty_like(logsigma_q);
  at::Tensor g_mu_p = at::empty_like(mu_p), g_logsigma_p = at::empty_like(logsigma_p);
  gaussian::with_form(scale, posterior, kl_estimator, beta, "sample_and_kl", [&](auto form) {
    using F = decltype(form);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu_q.scalar_type(), "sample_and_kl_backward_cpu", [&] {
      backward_parallel<scalar_t, F>(grad_z.data_ptr<scalar_t>(), grad_kl.data_ptr<at::opmath_type<scalar_t>>(),
                                     mu_q.data_ptr<scalar_t>(), logsigma_q.data_ptr<scalar_t>(),
                                     mu_p.data_ptr<scalar_t>(), logsigma_p.data_ptr<scalar_t>(),
                                     g_mu_q.data_ptr<scalar_t>(), g_logsigma_q.data_ptr<scalar_t>(),
                                     g_mu_p.data_ptr<scalar_t>(), g_logsigma_p.data_ptr<scalar_t>(), mu_q.size(0),
                                     gaussian::layout_of(mu_q), static_cast<uint64_t>(seed), beta);
    });
  });
  return {g_mu_q, g_logsigma_q, g_mu_p, g_logsigma_p};
}

}  // namespace

TORCH_LIBRARY_IMPL(vdvae_fast_C, CPU, m) {
  m.impl("sample_and_kl_forward", &sample_and_kl_forward_cpu);
  m.impl("sample_and_kl_backward", &sample_and_kl_backward_cpu);
}

}  // namespace vdvae_fast
