// Argument checks that the CPU and CUDA kernels of an op share. ops.py validates inputs for users; these
// guard the kernels' own assumptions when torch.ops.vdvae_fast_C is called directly.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

namespace vdvae_fast {

// The Gaussian kernels index memory as contiguous or as channels_last (gaussian_math.h's DenseLayout).
inline void check_dense(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              " kernels take contiguous or channels_last tensors");
}

// dmol_nll's logits (B, 10M, H, W), targets x (B, 3, H, W) in the math dtype, and a supported bit depth.
inline void check_dmol_inputs(const at::Tensor& logits, const at::Tensor& x, int64_t num_bits) {
  TORCH_CHECK(logits.dim() == 4 && logits.size(1) % 10 == 0 && logits.size(1) > 0,
              "dmol: logits must be (B, 10M, H, W), got ", logits.sizes());
  TORCH_CHECK(x.dim() == 4 && x.size(0) == logits.size(0) && x.size(1) == 3 && x.size(2) == logits.size(2) &&
                  x.size(3) == logits.size(3),
              "dmol: x must be (B, 3, H, W) matching logits, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::toOpMathType(logits.scalar_type()),
              "dmol: x must be in the math dtype of logits, got ", x.scalar_type());
  TORCH_CHECK(num_bits == 5 || num_bits == 8, "dmol: num_bits must be 5 or 8, got ", num_bits);
}

}  // namespace vdvae_fast
