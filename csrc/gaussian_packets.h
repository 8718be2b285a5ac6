// The CUDA kernels' per-thread bodies of the Gaussian ops: the work on one packet of kVec consecutive elements
// in memory (16 bytes, or a single element when the kernels cannot take packets), as __host__ __device__
// functions, so that cuda_bodies_on_host.cpp runs on CPU tensors the very code the kernels run, eps and its
// indexing included (tests/test_cuda_math_on_host.py). F is the parametrization (gaussian_math.h's Form).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "gaussian_math.h"

namespace vdvae_fast {
namespace gaussian {

// sample_and_kl forward of the packet at offset `within` of image `image`: writes z, adds the KL terms to `sum`.
template <typename F, int kVec, typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
VF_HOST_DEVICE void sample_and_kl_forward_packet(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                                 const scalar_t* __restrict__ mu_p, const scalar_t* __restrict__ raw_p,
                                                 scalar_t* __restrict__ z, opmath_t& sum, uint32_t image,
                                                 int64_t within, const DenseLayout& layout, uint64_t seed,
                                                 const ScaleConstants<opmath_t>& constants) {
  using In = Packet<scalar_t, kVec>;
  const int64_t image_start = static_cast<int64_t>(image) * layout.image_size;
  const int64_t packet = (image_start + within) / kVec;
  const In pa = reinterpret_cast<const In*>(a)[packet];
  const In pb = reinterpret_cast<const In*>(b)[packet];
  const In pm = reinterpret_cast<const In*>(mu_p)[packet];
  const In pr = reinterpret_cast<const In*>(raw_p)[packet];
  In out;
  float eps[kVec];
  packet_eps(eps, seed, layout, static_cast<uint32_t>(image_start + within),
             [&](int v) { return layout.logical_index_in_image(image, static_cast<uint32_t>(within + v)); });
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    const SampleAndKl<opmath_t> r =
        sample_and_kl<F>(static_cast<opmath_t>(pa.v[v]), static_cast<opmath_t>(pb.v[v]),
                         static_cast<opmath_t>(pm.v[v]), static_cast<opmath_t>(pr.v[v]), eps[v], constants);
    out.v[v] = static_cast<scalar_t>(r.z);
    sum += r.kl;
  }
  reinterpret_cast<In*>(z)[packet] = out;
}

// sample_and_kl backward of the packet at offset `within` of image `image`, whose KL has upstream gradient grad_kl.
template <typename F, int kVec, typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
VF_HOST_DEVICE void sample_and_kl_backward_packet(const scalar_t* __restrict__ grad_z, opmath_t grad_kl,
                                                  const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                                  const scalar_t* __restrict__ mu_p,
                                                  const scalar_t* __restrict__ raw_p, scalar_t* __restrict__ g_a,
                                                  scalar_t* __restrict__ g_b, scalar_t* __restrict__ g_mu_p,
                                                  scalar_t* __restrict__ g_raw_p, uint32_t image, int64_t within,
                                                  const DenseLayout& layout, uint64_t seed,
                                                  const ScaleConstants<opmath_t>& constants) {
  using In = Packet<scalar_t, kVec>;
  const int64_t image_start = static_cast<int64_t>(image) * layout.image_size;
  const int64_t packet = (image_start + within) / kVec;
  const In gz = reinterpret_cast<const In*>(grad_z)[packet];
  const In pa = reinterpret_cast<const In*>(a)[packet];
  const In pb = reinterpret_cast<const In*>(b)[packet];
  const In pm = reinterpret_cast<const In*>(mu_p)[packet];
  const In pr = reinterpret_cast<const In*>(raw_p)[packet];
  In out_a, out_b, out_m, out_r;
  float eps[kVec];
  packet_eps(eps, seed, layout, static_cast<uint32_t>(image_start + within),
             [&](int v) { return layout.logical_index_in_image(image, static_cast<uint32_t>(within + v)); });
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    const InputGrads<opmath_t> d = sample_and_kl_grads<F>(
        static_cast<opmath_t>(gz.v[v]), grad_kl, static_cast<opmath_t>(pa.v[v]), static_cast<opmath_t>(pb.v[v]),
        static_cast<opmath_t>(pm.v[v]), static_cast<opmath_t>(pr.v[v]), eps[v], constants);
    out_a.v[v] = static_cast<scalar_t>(d.a);
    out_b.v[v] = static_cast<scalar_t>(d.b);
    out_m.v[v] = static_cast<scalar_t>(d.mu_p);
    out_r.v[v] = static_cast<scalar_t>(d.raw_p);
  }
  reinterpret_cast<In*>(g_a)[packet] = out_a;
  reinterpret_cast<In*>(g_b)[packet] = out_b;
  reinterpret_cast<In*>(g_mu_p)[packet] = out_m;
  reinterpret_cast<In*>(g_raw_p)[packet] = out_r;
}

// gaussian_kl forward of packet p (the tensors are flat: no randomness, no reduction).
template <typename F, int kVec, typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
VF_HOST_DEVICE void gaussian_kl_forward_packet(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                               const scalar_t* __restrict__ mu_p, const scalar_t* __restrict__ raw_p,
                                               opmath_t* __restrict__ kl, int64_t p,
                                               const ScaleConstants<opmath_t>& constants) {
  using In = Packet<scalar_t, kVec>;
  using Out = Packet<opmath_t, kVec>;
  const In pa = reinterpret_cast<const In*>(a)[p];
  const In pb = reinterpret_cast<const In*>(b)[p];
  const In pm = reinterpret_cast<const In*>(mu_p)[p];
  const In pr = reinterpret_cast<const In*>(raw_p)[p];
  Out out;
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    out.v[v] = gaussian_kl<F>(static_cast<opmath_t>(pa.v[v]), static_cast<opmath_t>(pb.v[v]),
                              static_cast<opmath_t>(pm.v[v]), static_cast<opmath_t>(pr.v[v]), constants);
  }
  reinterpret_cast<Out*>(kl)[p] = out;
}

template <typename F, int kVec, typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
VF_HOST_DEVICE void gaussian_kl_backward_packet(const opmath_t* __restrict__ grad_kl, const scalar_t* __restrict__ a,
                                                const scalar_t* __restrict__ b, const scalar_t* __restrict__ mu_p,
                                                const scalar_t* __restrict__ raw_p, scalar_t* __restrict__ g_a,
                                                scalar_t* __restrict__ g_b, scalar_t* __restrict__ g_mu_p,
                                                scalar_t* __restrict__ g_raw_p, int64_t p,
                                                const ScaleConstants<opmath_t>& constants) {
  using In = Packet<scalar_t, kVec>;
  using Grad = Packet<opmath_t, kVec>;
  const Grad gk = reinterpret_cast<const Grad*>(grad_kl)[p];
  const In pa = reinterpret_cast<const In*>(a)[p];
  const In pb = reinterpret_cast<const In*>(b)[p];
  const In pm = reinterpret_cast<const In*>(mu_p)[p];
  const In pr = reinterpret_cast<const In*>(raw_p)[p];
  In out_a, out_b, out_m, out_r;
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    const InputGrads<opmath_t> d =
        gaussian_kl_grads<F>(gk.v[v], static_cast<opmath_t>(pa.v[v]), static_cast<opmath_t>(pb.v[v]),
                             static_cast<opmath_t>(pm.v[v]), static_cast<opmath_t>(pr.v[v]), constants);
    out_a.v[v] = static_cast<scalar_t>(d.a);
    out_b.v[v] = static_cast<scalar_t>(d.b);
    out_m.v[v] = static_cast<scalar_t>(d.mu_p);
    out_r.v[v] = static_cast<scalar_t>(d.raw_p);
  }
  reinterpret_cast<In*>(g_a)[p] = out_a;
  reinterpret_cast<In*>(g_b)[p] = out_b;
  reinterpret_cast<In*>(g_mu_p)[p] = out_m;
  reinterpret_cast<In*>(g_raw_p)[p] = out_r;
}

// sample_gaussian forward of packet p.
template <typename F, int kVec, typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
VF_HOST_DEVICE void sample_gaussian_forward_packet(const scalar_t* __restrict__ mu, const scalar_t* __restrict__ raw,
                                                   scalar_t* __restrict__ z, int64_t p, opmath_t temperature,
                                                   const DenseLayout& layout, uint64_t seed,
                                                   const ScaleConstants<opmath_t>& constants) {
  using In = Packet<scalar_t, kVec>;
  const In m = reinterpret_cast<const In*>(mu)[p];
  const In r = reinterpret_cast<const In*>(raw)[p];
  In out;
  float eps[kVec];
  packet_eps(eps, seed, layout, static_cast<uint32_t>(p * kVec),
             [&](int v) { return layout.logical_index(static_cast<uint32_t>(p * kVec + v)); });
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    out.v[v] = static_cast<scalar_t>(sample_gaussian<F>(static_cast<opmath_t>(m.v[v]), static_cast<opmath_t>(r.v[v]),
                                                        temperature, eps[v], constants));
  }
  reinterpret_cast<In*>(z)[p] = out;
}

// sample_gaussian backward of packet p: ∂z/∂mu = 1, so grad_mu is grad_z itself.
template <typename F, int kVec, typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
VF_HOST_DEVICE void sample_gaussian_backward_packet(const scalar_t* __restrict__ grad_z,
                                                    const scalar_t* __restrict__ raw, scalar_t* __restrict__ g_mu,
                                                    scalar_t* __restrict__ g_raw, int64_t p, opmath_t temperature,
                                                    const DenseLayout& layout, uint64_t seed,
                                                    const ScaleConstants<opmath_t>& constants) {
  using In = Packet<scalar_t, kVec>;
  const In gz = reinterpret_cast<const In*>(grad_z)[p];
  const In r = reinterpret_cast<const In*>(raw)[p];
  In out;
  float eps[kVec];
  packet_eps(eps, seed, layout, static_cast<uint32_t>(p * kVec),
             [&](int v) { return layout.logical_index(static_cast<uint32_t>(p * kVec + v)); });
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    out.v[v] = static_cast<scalar_t>(sample_gaussian_grad_raw<F>(static_cast<opmath_t>(gz.v[v]),
                                                                 static_cast<opmath_t>(r.v[v]), temperature, eps[v],
                                                                 constants));
  }
  reinterpret_cast<In*>(g_mu)[p] = gz;
  reinterpret_cast<In*>(g_raw)[p] = out;
}

}  // namespace gaussian
}  // namespace vdvae_fast
