// CUDA kernels of the DMoL distortion: dmol_nll_forward (per-image nats per dimension) and its fused
// backward, which recomputes everything from logits and x.
//
// One thread per pixel loops over the mixtures in registers: a running logsumexp of the mixture
// logits, then one of log p(x | k) + log_softmax(pi)_k. The forward sums each block's pixels into
// a partial and a second kernel adds an image's partials in a fixed order (deterministic, no
// atomics). The backward makes the same two passes and a third that writes the gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dmol_math.h"
#include "kernel_checks.h"

namespace vdvae_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Strides of a (B, C, H, W) tensor; offset() of pixel p = h W + w of image b
struct Strides {
  int64_t batch, channel, height, width;

  __device__ int64_t offset(int64_t b, int64_t p, int64_t image_width) const {
    return b * batch + (p / image_width) * height + (p % image_width) * width;
  }
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

struct Geometry {
  int64_t mixtures, width, pixels;
  int64_t chunks;  // blocks per image
};

// Sum over the block, valid in thread 0; a fixed shuffle tree, so the result is reproducible
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T warp_sums[kWarps];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_sums[lane] : T(0);
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// The channels of one pixel of the logits, read through the channel stride in the math dtype
template <typename scalar_t, typename acc_t>
struct PixelLogits {
  const scalar_t* base;
  int64_t stride;

  __device__ acc_t operator()(int64_t ch) const { return static_cast<acc_t>(base[ch * stride]); }

  __device__ dmol::MixtureParams<acc_t> params(int64_t mixtures, int64_t k) const {
    dmol::MixtureParams<acc_t> p;
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      p.mean[c] = (*this)(dmol::mean_channel(mixtures, c, k));
      p.raw_log_scale[c] = (*this)(dmol::log_scale_channel(mixtures, c, k));
      p.raw_coeff[c] = (*this)(dmol::coeff_channel(mixtures, c, k));
    }
    return p;
  }
};

// The two running logsumexps of one pixel: over the mixture logits (mix) and over
// log p(x | k) + log_softmax(pi)_k (all), whose value is the pixel's log-likelihood
template <typename acc_t>
struct PixelMixture {
  dmol::LogSumExp<acc_t> mix, all;
  acc_t mix_log_sum;

  template <typename scalar_t>
  __device__ PixelMixture(const PixelLogits<scalar_t, acc_t>& px, acc_t x0, acc_t x1, acc_t x2, int64_t mixtures,
                          const dmol::Bins<acc_t>& bins) {
    for (int64_t k = 0; k < mixtures; ++k) mix.push(px(k));
    mix_log_sum = mix.log_sum();
    for (int64_t k = 0; k < mixtures; ++k) {
      const auto term = dmol::mixture_term<false>(x0, x1, x2, px.params(mixtures, k), bins);
      all.push(term.log_prob + log_softmax(px(k)));
    }
  }

  __device__ acc_t log_softmax(acc_t pi) const { return (pi - mix.max) - mix_log_sum; }
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ logits, Strides ls, const acc_t* __restrict__ x, Strides xs, Geometry g,
                   dmol::Bins<acc_t> bins, acc_t* __restrict__ partial) {
  const int64_t b = blockIdx.x / g.chunks;
  const int64_t p = (blockIdx.x % g.chunks) * kThreads + threadIdx.x;
  acc_t log_likelihood = 0;
  if (p < g.pixels) {
    const PixelLogits<scalar_t, acc_t> px{logits + ls.offset(b, p, g.width), ls.channel};
    const acc_t* xp = x + xs.offset(b, p, g.width);
    const PixelMixture<acc_t> m(px, xp[0], xp[xs.channel], xp[2 * xs.channel], g.mixtures, bins);
    log_likelihood = m.all.value();
  }
  log_likelihood = block_sum(log_likelihood);
  if (threadIdx.x == 0) partial[blockIdx.x] = log_likelihood;
}

// nll[b] = -(sum of image b's partials) / (3 H W)
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finish_kernel(const acc_t* __restrict__ partial, int64_t chunks, acc_t dims, acc_t* __restrict__ nll) {
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < chunks; i += kThreads) sum += partial[blockIdx.x * chunks + i];
  sum = block_sum(sum);
  if (threadIdx.x == 0) nll[blockIdx.x] = -sum / dims;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const acc_t* __restrict__ grad_nll, int64_t grad_nll_stride, const scalar_t* __restrict__ logits,
                    Strides ls, const acc_t* __restrict__ x, Strides xs, scalar_t* __restrict__ grad_logits, Strides gs,
                    Geometry g, dmol::Bins<acc_t> bins, acc_t dims) {
  const int64_t b = blockIdx.x / g.chunks;
  const int64_t p = (blockIdx.x % g.chunks) * kThreads + threadIdx.x;
  if (p >= g.pixels) return;
  const PixelLogits<scalar_t, acc_t> px{logits + ls.offset(b, p, g.width), ls.channel};
  const acc_t* xp = x + xs.offset(b, p, g.width);
  const acc_t x0 = xp[0], x1 = xp[xs.channel], x2 = xp[2 * xs.channel];
  const PixelMixture<acc_t> m(px, x0, x1, x2, g.mixtures, bins);
  const acc_t all_log_sum = m.all.log_sum();
  scalar_t* out = grad_logits + gs.offset(b, p, g.width);
  const auto store = [&](int64_t ch, acc_t v) { out[ch * gs.channel] = static_cast<scalar_t>(v); };
  // d/dpi_k = g (softmax(pi)_k - r_k), d/dparam = -g r_k d log p(x | k) / dparam, with r the
  // posterior responsibilities and g = grad_nll / (3 H W) the gradient of each pixel's -log p(x)
  const acc_t grad = grad_nll[b * grad_nll_stride] / dims;
  for (int64_t k = 0; k < g.mixtures; ++k) {
    const acc_t pi = px(k);
    const auto term = dmol::mixture_term<true>(x0, x1, x2, px.params(g.mixtures, k), bins);
    const acc_t log_softmax = m.log_softmax(pi);
    const acc_t r = dmol::vf_exp((term.log_prob + log_softmax - m.all.max) - all_log_sum);
    const acc_t weight = -grad * r;
    store(k, grad * (dmol::vf_exp(log_softmax) - r));
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      store(dmol::mean_channel(g.mixtures, c, k), weight * term.d_mean[c]);
      store(dmol::log_scale_channel(g.mixtures, c, k), weight * term.d_log_scale[c]);
      store(dmol::coeff_channel(g.mixtures, c, k), weight * term.d_coeff[c]);
    }
  }
}

void check_inputs(const at::Tensor& logits, const at::Tensor& x, int64_t num_bits) {
  TORCH_CHECK(logits.is_cuda() && x.device() == logits.device(), "dmol: logits and x must be on one CUDA device");
  check_dmol_inputs(logits, x, num_bits);
}

Geometry geometry_of(const at::Tensor& logits) {
  const int64_t pixels = logits.size(2) * logits.size(3);
  return {logits.size(1) / 10, logits.size(3), pixels, (pixels + kThreads - 1) / kThreads};
}

at::Tensor dmol_nll_forward_cuda(const at::Tensor& logits, const at::Tensor& x, int64_t num_bits) {
  check_inputs(logits, x, num_bits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Geometry g = geometry_of(logits);
  const int64_t batch = logits.size(0);
  at::Tensor nll = at::empty({batch}, logits.options().dtype(x.scalar_type()));
  if (batch == 0) return nll;
  at::Tensor partial = at::empty({batch * g.chunks}, nll.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dmol_nll_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (g.pixels > 0) {
      forward_kernel<scalar_t, acc_t><<<batch * g.chunks, kThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), strides_of(logits), x.data_ptr<acc_t>(), strides_of(x), g,
          dmol::make_bins<acc_t>(num_bits), partial.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    finish_kernel<acc_t><<<batch, kThreads, 0, stream>>>(partial.data_ptr<acc_t>(), g.chunks,
                                                         static_cast<acc_t>(3 * g.pixels), nll.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return nll;
}

at::Tensor dmol_nll_backward_cuda(const at::Tensor& grad_nll, const at::Tensor& logits, const at::Tensor& x,
                                  int64_t num_bits) {
  check_inputs(logits, x, num_bits);
  TORCH_CHECK(grad_nll.device() == logits.device() && grad_nll.dim() == 1 && grad_nll.size(0) == logits.size(0) &&
                  grad_nll.scalar_type() == x.scalar_type(),
              "dmol: grad_nll must be (B,) in the math dtype on the device of logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const Geometry g = geometry_of(logits);
  at::Tensor grad_logits = at::empty_like(logits);
  if (grad_logits.numel() == 0) return grad_logits;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dmol_nll_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, acc_t><<<logits.size(0) * g.chunks, kThreads, 0, stream>>>(
        grad_nll.data_ptr<acc_t>(), grad_nll.stride(0), logits.data_ptr<scalar_t>(), strides_of(logits),
        x.data_ptr<acc_t>(), strides_of(x), grad_logits.data_ptr<scalar_t>(), strides_of(grad_logits), g,
        dmol::make_bins<acc_t>(num_bits), static_cast<acc_t>(3 * g.pixels));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(vdvae_fast_C, CUDA, m) {
  m.impl("dmol_nll_forward", &dmol_nll_forward_cuda);
  m.impl("dmol_nll_backward", &dmol_nll_backward_cuda);
}

}  // namespace vdvae_fast
