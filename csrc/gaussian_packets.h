// The CUDA kernels' per-thread bodies of the Gaussian ops: the work on one packet of kVec consecutive elements
// in memory (16 bytes, or a single element when the kernels cannot take packets), and the work items of the
// ops that draw (a packet, or the four packets of a pixel quad), as __host__ __device__ functions, so that
// cuda_bodies_on_host.cpp runs on CPU tensors the very code the kernels run, eps and its indexing included
// (tests/test_cuda_math_on_host.py). F is the parametrization (gaussian_math.h's Form).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <type_traits>

#include "gaussian_math.h"

namespace vdvae_fast {
namespace gaussian {

// The four inputs (or their four gradients) of one packet, as the Gaussian ops' bodies load and store them.
template <typename scalar_t, int kVec>
struct InputPackets {
  Packet<scalar_t, kVec> a, b, mu_p, raw_p;
};

template <int kVec, typename scalar_t>
VF_HOST_DEVICE InputPackets<scalar_t, kVec> load_inputs(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                                        const scalar_t* __restrict__ mu_p,
                                                        const scalar_t* __restrict__ raw_p, int64_t packet) {
  using In = Packet<scalar_t, kVec>;
  return {reinterpret_cast<const In*>(a)[packet], reinterpret_cast<const In*>(b)[packet],
          reinterpret_cast<const In*>(mu_p)[packet], reinterpret_cast<const In*>(raw_p)[packet]};
}

// Lane v of the input gradients, cast to the inputs' dtype.
template <int kVec, typename scalar_t, typename opmath_t>
VF_HOST_DEVICE void set_lane(InputPackets<scalar_t, kVec>& grads, int v, const InputGrads<opmath_t>& d) {
  grads.a.v[v] = static_cast<scalar_t>(d.a);
  grads.b.v[v] = static_cast<scalar_t>(d.b);
  grads.mu_p.v[v] = static_cast<scalar_t>(d.mu_p);
  grads.raw_p.v[v] = static_cast<scalar_t>(d.raw_p);
}

template <int kVec, typename scalar_t>
VF_HOST_DEVICE void store_grads(const InputPackets<scalar_t, kVec>& grads, scalar_t* __restrict__ g_a,
                                scalar_t* __restrict__ g_b, scalar_t* __restrict__ g_mu_p,
                                scalar_t* __restrict__ g_raw_p, int64_t packet) {
  using In = Packet<scalar_t, kVec>;
  reinterpret_cast<In*>(g_a)[packet] = grads.a;
  reinterpret_cast<In*>(g_b)[packet] = grads.b;
  reinterpret_cast<In*>(g_mu_p)[packet] = grads.mu_p;
  reinterpret_cast<In*>(g_raw_p)[packet] = grads.raw_p;
}

// The work items of the random ops' kernels on a tensor that takes packets of kVec elements (`packets`) or
// else single elements: calls launch(std::integral_constant<int, vec>, std::integral_constant<int, item>) with
// the packet width and the elements of one item (for_item_packets). Pixel quads (channels_last with W % 4 == 0)
// take items of four packets where C is a multiple of kVec, else of four single elements, as one Philox call
// per group outweighs the narrower loads; other layouts take one packet (or element) per item.
template <int kVec, typename Launch>
inline void with_work_items(bool packets, const DenseLayout& layout, Launch&& launch) {
  using Packets = std::integral_constant<int, kVec>;
  using Elements = std::integral_constant<int, 1>;
  if (!layout.pixel_quads) {
    if (packets) {
      launch(Packets(), Packets());
    } else {
      launch(Elements(), Elements());
    }
  } else if (packets && layout.channels % kVec == 0) {
    launch(Packets(), std::integral_constant<int, 4 * kVec>());
  } else {
    launch(Elements(), std::integral_constant<int, 4>());
  }
}

// Calls body(packet, eps) on the packets of work item `item` of a random op, eps the packet's kVec draws.
// kItem = kVec: the item is one packet of consecutive memory (item = packet index), drawn by packet_eps.
// kItem = 4·kVec (pixel quads, with_work_items): the item is kVec channels of the pixels (h, 4k..4k+3), the four
// packets C / kVec apart, and each channel's group takes one Philox call (pixel j draws lane j).
template <int kVec, int kItem, typename Body>
VF_HOST_DEVICE void for_item_packets(int64_t item, const DenseLayout& layout, uint64_t seed, Body&& body) {
  static_assert(kItem == kVec || kItem == 4 * kVec, "a work item is one packet or a pixel quad of packets");
  if constexpr (kItem == kVec) {
    float eps[kVec];
    packet_eps(eps, seed, layout, static_cast<uint32_t>(item * kVec));
    body(item, eps);
  } else {
    const uint32_t per_pixel = layout.channels / kVec, group_stride = layout.plane >> 2;
    const auto index = static_cast<uint32_t>(item);
    const uint32_t quad = index / per_pixel, channel_packet = index - quad * per_pixel;
    const uint32_t packet = 4u * quad * per_pixel + channel_packet;
    const uint32_t first_group =
        layout.quad_first_group(packet * kVec) + channel_packet * static_cast<uint32_t>(kVec) * group_stride;
    float eps[4][kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      group_eps(eps[0][v], eps[1][v], eps[2][v], eps[3][v], seed,
                first_group + static_cast<uint32_t>(v) * group_stride);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) body(static_cast<int64_t>(packet + static_cast<uint32_t>(j) * per_pixel), eps[j]);
  }
}

// sample_and_kl forward of packet `packet`, whose eps are given: writes z, adds the KL terms to `sum`.
template <typename F, int kVec, typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
VF_HOST_DEVICE void sample_and_kl_forward_packet(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                                 const scalar_t* __restrict__ mu_p, const scalar_t* __restrict__ raw_p,
                                                 scalar_t* __restrict__ z, opmath_t& sum, int64_t packet,
                                                 const float (&eps)[kVec], const ScaleConstants<opmath_t>& constants) {
  using In = Packet<scalar_t, kVec>;
  const InputPackets<scalar_t, kVec> in = load_inputs<kVec>(a, b, mu_p, raw_p, packet);
  In out;
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    const SampleAndKl<opmath_t> r =
        sample_and_kl<F>(static_cast<opmath_t>(in.a.v[v]), static_cast<opmath_t>(in.b.v[v]),
                         static_cast<opmath_t>(in.mu_p.v[v]), static_cast<opmath_t>(in.raw_p.v[v]), eps[v], constants);
    out.v[v] = static_cast<scalar_t>(r.z);
    sum += r.kl;
  }
  reinterpret_cast<In*>(z)[packet] = out;
}

// sample_and_kl backward of packet `packet`, whose eps are given and whose image's KL has upstream gradient grad_kl.
template <typename F, int kVec, typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
VF_HOST_DEVICE void sample_and_kl_backward_packet(const scalar_t* __restrict__ grad_z, opmath_t grad_kl,
                                                  const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                                  const scalar_t* __restrict__ mu_p,
                                                  const scalar_t* __restrict__ raw_p, scalar_t* __restrict__ g_a,
                                                  scalar_t* __restrict__ g_b, scalar_t* __restrict__ g_mu_p,
                                                  scalar_t* __restrict__ g_raw_p, int64_t packet,
                                                  const float (&eps)[kVec],
                                                  const ScaleConstants<opmath_t>& constants) {
  using In = Packet<scalar_t, kVec>;
  const In gz = reinterpret_cast<const In*>(grad_z)[packet];
  const InputPackets<scalar_t, kVec> in = load_inputs<kVec>(a, b, mu_p, raw_p, packet);
  InputPackets<scalar_t, kVec> grads;
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    set_lane(grads, v,
             sample_and_kl_grads<F>(static_cast<opmath_t>(gz.v[v]), grad_kl, static_cast<opmath_t>(in.a.v[v]),
                                    static_cast<opmath_t>(in.b.v[v]), static_cast<opmath_t>(in.mu_p.v[v]),
                                    static_cast<opmath_t>(in.raw_p.v[v]), eps[v], constants));
  }
  store_grads(grads, g_a, g_b, g_mu_p, g_raw_p, packet);
}

// gaussian_kl forward of packet p (the tensors are flat: no randomness, no reduction).
template <typename F, int kVec, typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
VF_HOST_DEVICE void gaussian_kl_forward_packet(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                               const scalar_t* __restrict__ mu_p, const scalar_t* __restrict__ raw_p,
                                               opmath_t* __restrict__ kl, int64_t p,
                                               const ScaleConstants<opmath_t>& constants) {
  using Out = Packet<opmath_t, kVec>;
  const InputPackets<scalar_t, kVec> in = load_inputs<kVec>(a, b, mu_p, raw_p, p);
  Out out;
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    out.v[v] = gaussian_kl<F>(static_cast<opmath_t>(in.a.v[v]), static_cast<opmath_t>(in.b.v[v]),
                              static_cast<opmath_t>(in.mu_p.v[v]), static_cast<opmath_t>(in.raw_p.v[v]), constants);
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
  using Grad = Packet<opmath_t, kVec>;
  const Grad gk = reinterpret_cast<const Grad*>(grad_kl)[p];
  const InputPackets<scalar_t, kVec> in = load_inputs<kVec>(a, b, mu_p, raw_p, p);
  InputPackets<scalar_t, kVec> grads;
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    set_lane(grads, v,
             gaussian_kl_grads<F>(gk.v[v], static_cast<opmath_t>(in.a.v[v]), static_cast<opmath_t>(in.b.v[v]),
                                  static_cast<opmath_t>(in.mu_p.v[v]), static_cast<opmath_t>(in.raw_p.v[v]),
                                  constants));
  }
  store_grads(grads, g_a, g_b, g_mu_p, g_raw_p, p);
}

// sample_gaussian forward of packet p, whose eps are given.
template <typename F, int kVec, typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
VF_HOST_DEVICE void sample_gaussian_forward_packet(const scalar_t* __restrict__ mu, const scalar_t* __restrict__ raw,
                                                   scalar_t* __restrict__ z, int64_t p, opmath_t temperature,
                                                   const float (&eps)[kVec],
                                                   const ScaleConstants<opmath_t>& constants) {
  using In = Packet<scalar_t, kVec>;
  const In m = reinterpret_cast<const In*>(mu)[p];
  const In r = reinterpret_cast<const In*>(raw)[p];
  In out;
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    out.v[v] = static_cast<scalar_t>(sample_gaussian<F>(static_cast<opmath_t>(m.v[v]), static_cast<opmath_t>(r.v[v]),
                                                        temperature, eps[v], constants));
  }
  reinterpret_cast<In*>(z)[p] = out;
}

// sample_gaussian backward of packet p, whose eps are given: grad_logsigma only. ∂z/∂mu = 1, so grad_mu is grad_z
// itself, which the autograd formula passes through without a kernel.
template <typename F, int kVec, typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
VF_HOST_DEVICE void sample_gaussian_backward_packet(const scalar_t* __restrict__ grad_z,
                                                    const scalar_t* __restrict__ raw, scalar_t* __restrict__ g_raw,
                                                    int64_t p, opmath_t temperature,
                                                    const float (&eps)[kVec],
                                                    const ScaleConstants<opmath_t>& constants) {
  using In = Packet<scalar_t, kVec>;
  const In gz = reinterpret_cast<const In*>(grad_z)[p];
  const In r = reinterpret_cast<const In*>(raw)[p];
  In out;
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    out.v[v] = static_cast<scalar_t>(sample_gaussian_grad_raw<F>(static_cast<opmath_t>(gz.v[v]),
                                                                 static_cast<opmath_t>(r.v[v]), temperature, eps[v],
                                                                 constants));
  }
  reinterpret_cast<In*>(g_raw)[p] = out;
}

}  // namespace gaussian
}  // namespace vdvae_fast
