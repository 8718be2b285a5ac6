// Counter-based randomness shared by the CPU and CUDA kernels.
//
// Philox4x32-10 with the constants and key schedule of Triton's tl.random, so that
// the Triton, CUDA, C++ and pure-PyTorch (vdvae_fast/philox.py) backends draw the
// same numbers for the same (seed, counter). Nothing is ever stored: backward
// passes regenerate epsilon from the seed and the element's logical index.
#pragma once

#include <cstdint>

#include "fast_math.h"

namespace vdvae_fast {

struct Philox4 {
  uint32_t v0, v1, v2, v3;
};

// The 64-bit product of the low word of `a` and a round constant: its high word is Philox's mulhi, its low
// word the mullo.
VF_HOST_DEVICE uint64_t mul_wide(uint64_t a, uint32_t m) { return (a & 0xffffffffu) * m; }

// Ten Philox rounds on counter (c0, c1, c2, c3) with key (low, high) halves of seed. The words live in
// 64-bit integers whose high halves may hold garbage, cut off by mul_wide and the final narrowing: with
// AVX-512, gcc then vectorizes the rounds in 64-bit lanes with one vpmullq per product, where 32-bit words
// make it widen and narrow every product (1.6x slower; AVX2 lacks vpmullq, and there 32-bit words would be
// 1.3x faster). nvcc still emits 32-bit operations and one IMAD.WIDE.U32 per product.
VF_HOST_DEVICE Philox4 philox(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint64_t w0 = c0, w1 = c1, w2 = c2, w3 = c3;
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffu);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t product_b = mul_wide(w2, 0xCD9E8D57u);
    const uint64_t product_a = mul_wide(w0, 0xD2511F53u);
    w0 = (product_b >> 32) ^ w1 ^ k0;
    w2 = (product_a >> 32) ^ w3 ^ k1;
    w1 = product_b;
    w3 = product_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {static_cast<uint32_t>(w0), static_cast<uint32_t>(w1), static_cast<uint32_t>(w2), static_cast<uint32_t>(w3)};
}

// tl.random.uint_to_uniform_float: [0, 1) without ever reaching 1.
VF_HOST_DEVICE float uint_to_uniform(uint32_t x) {
  int32_t s = static_cast<int32_t>(x);
  s = s < 0 ? ~s : s;
  return static_cast<float>(s) * 4.6566127342e-10f;
}

// A word as a uniform in [1e-5, 1 - 1e-5]: the interval is VDVAE's, which keeps log(u) and log(1 - u) finite
VF_HOST_DEVICE float open_uniform(uint32_t word) { return uint_to_uniform(word) * 0.99998f + 1.0e-5f; }

struct OpenUniforms4 {
  float u[4];
};

// dmol_sample's uniforms of streams 4 group .. 4 group + 3 of pixel `pixel`: the four words of counter
// (pixel, group, 0, 0), stream j being word j % 4 of group j / 4
VF_HOST_DEVICE OpenUniforms4 philox_open_uniforms(uint64_t seed, uint32_t pixel, uint32_t group) {
  const Philox4 r = philox(seed, pixel, group, 0u, 0u);
  return {{open_uniform(r.v0), open_uniform(r.v1), open_uniform(r.v2), open_uniform(r.v3)}};
}

}  // namespace vdvae_fast
