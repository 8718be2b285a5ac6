// Launch helpers shared by the CUDA kernels of the Gaussian ops (sample_and_kl, gaussian_kl, sample_gaussian):
// block size, grid size, the 16-byte packet test and the random ops' work items (the layout check is
// kernel_checks.h's).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "cuda_dispatch.cuh"
#include "gaussian_math.h"
#include "gaussian_packets.h"
#include "kernel_checks.h"

namespace vdvae_fast {
namespace gaussian {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;

// Blocks of a grid-stride loop over `packets` work items.
inline int grid_for(int64_t packets) {
  return static_cast<int>(std::min(kMaxBlocks, (packets + kThreads - 1) / kThreads));
}

// Packets of 16 bytes of the input dtype when `count` (the elements a packet must not straddle: all of them,
// or one image) divides and every pointer is aligned to its packet (tensors of the math dtype hold 16 or 32
// bytes per packet); else the kernels take single elements.
template <typename scalar_t>
bool can_use_packets(int64_t count, std::initializer_list<const at::Tensor*> tensors) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (count % kVec != 0) return false;
  for (const at::Tensor* t : tensors) {
    if (!is_aligned(t->data_ptr(), static_cast<uintptr_t>(t->element_size()) * kVec)) return false;
  }
  return true;
}

// Calls launch(std::integral_constant<int, kVec>) with the packet width can_use_packets allows, else with 1.
template <typename scalar_t, typename Launch>
void launch_by_packets(int64_t count, std::initializer_list<const at::Tensor*> tensors, Launch&& launch) {
  if (can_use_packets<scalar_t>(count, tensors)) {
    launch(std::integral_constant<int, 16 / sizeof(scalar_t)>());
  } else {
    launch(std::integral_constant<int, 1>());
  }
}

// For the ops that draw: calls launch(std::integral_constant<int, kVec>, std::integral_constant<int, kItem>)
// with the packet width and work item gaussian_packets.h's with_work_items takes for this layout, packets of
// 16 bytes where can_use_packets allows them.
template <typename scalar_t, typename Launch>
void launch_by_items(int64_t count, const DenseLayout& layout, std::initializer_list<const at::Tensor*> tensors,
                     Launch&& launch) {
  with_work_items<16 / sizeof(scalar_t)>(can_use_packets<scalar_t>(count, tensors), layout, launch);
}

}  // namespace gaussian
}  // namespace vdvae_fast
