// Tiles of pixels in shared memory, the work unit of the DMoL CUDA kernels (dmol_nll_cuda.cu,
// dmol_sample_cuda.cu). A block of kTilePixels threads copies the 10M channels of kTilePixels pixels of
// one image into shared memory with coalesced (and, where aligned, 4-element vector) loads in either
// layout, each thread then runs the per-pixel body of dmol_math.h on its pixel's channels there, and
// the backward copies the gradient out the same way.
//
// The tile holds channel ch of pixel t at tile[ch * kTilePitch + t]. The odd pitch keeps shared memory
// free of bank conflicts both where a warp reads one channel of 32 pixels (the bodies) and where it
// writes 32 consecutive channels of one pixel (the channels_last copies).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace vdvae_fast {
namespace dmol {

constexpr int kTilePixels = 64;              // pixels per tile = threads per block
constexpr int kTilePitch = kTilePixels + 1;  // floats between two channels of the tile
constexpr int kPacket = 4;                   // elements of one vector load or store

// Shared memory of a block of `kernel` whose tile has `rows` channel rows. Where a large M needs more than
// the default 48 KiB, the kernel's limit is raised; past the GPU's limit the op refuses.
template <typename Kernel>
int tile_shared_bytes(Kernel kernel, int64_t rows, const char* op, int64_t mixtures) {
  const int64_t bytes = rows * kTilePitch * static_cast<int64_t>(sizeof(float));
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= limit, op, ": ", mixtures, " mixtures need ", bytes,
              " bytes of shared memory per block on CUDA, over this GPU's ", limit,
              "; use backend='triton' or 'cpu' for so many mixtures");
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  return static_cast<int>(bytes);
}

// The channels of one pixel of a tile: channel(ch) is a float in shared memory
struct SharedPixel {
  float* base;  // the tile plus the pixel's lane

  __device__ float& operator()(int64_t ch) const { return base[static_cast<int>(ch) * kTilePitch]; }
};

// Strides of a (B, C, H, W) tensor and the offset of pixel p = h W + w within an image
struct ImageStrides {
  int64_t batch, channel, height, width, image_width;

  __device__ int64_t pixel_offset(int64_t p) const { return (p / image_width) * height + (p % image_width) * width; }
};

inline ImageStrides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.size(3)};
}

// How a block moves a tile between global and shared memory, chosen once per tensor
enum class TileAccess : int {
  kPlanePackets,          // each channel a contiguous run of pixels (NCHW), aligned: vectors along pixels
  kChannelsInnerPackets,  // each pixel a contiguous run of channels (channels_last), aligned: vectors along it
  kChannelsInner,         // channels_last with a channel count or base not a multiple of 4: scalars along it
  kPerPixel,              // anything else: thread t walks pixel t's channels (coalesced when pixels are adjacent)
};

struct TileCopy {
  ImageStrides strides;
  int64_t channels;
  TileAccess access;
};

inline TileCopy tile_copy_of(const at::Tensor& t) {
  const int64_t channels = t.size(1), height = t.size(2), width = t.size(3);
  const bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % (kPacket * t.element_size()) == 0 &&
                       t.stride(0) % kPacket == 0;
  // The H and W dimensions collapse into one pixel dimension of this stride
  const auto pixels_with_stride = [&](int64_t s) {
    return (width == 1 || t.stride(3) == s) && (height == 1 || t.stride(2) == width * s);
  };
  TileAccess access = TileAccess::kPerPixel;
  if (pixels_with_stride(1) && aligned && t.stride(1) % kPacket == 0) {
    access = TileAccess::kPlanePackets;
  } else if (t.stride(1) == 1 && pixels_with_stride(channels)) {
    access = aligned && channels % kPacket == 0 ? TileAccess::kChannelsInnerPackets : TileAccess::kChannelsInner;
  }
  return {strides_of(t), channels, access};
}

template <typename scalar_t>
struct alignas(kPacket * sizeof(scalar_t)) Packet {
  scalar_t v[kPacket];
};

// Moves `count` pixels from `first` on of one image (its first element at `image`) into the tile
// (kLoad) or out of it. All threads of the block call it.
template <bool kLoad, typename scalar_t>
__device__ void copy_tile(std::conditional_t<kLoad, const scalar_t*, scalar_t*> image, float* tile,
                          const TileCopy& copy, int64_t first, int count) {
  const int t = threadIdx.x;
  const int channels = static_cast<int>(copy.channels);
  // one element: global <-> shared
  const auto move = [&](int64_t offset, float* shared) {
    if constexpr (kLoad) {
      *shared = static_cast<float>(image[offset]);
    } else {
      image[offset] = static_cast<scalar_t>(*shared);
    }
  };
  // kPacket elements at an aligned offset <-> shared floats `step` apart
  const auto move_packet = [&](int64_t offset, float* shared, int step) {
    if constexpr (kLoad) {
      const Packet<scalar_t> p = *reinterpret_cast<const Packet<scalar_t>*>(image + offset);
#pragma unroll
      for (int j = 0; j < kPacket; ++j) shared[j * step] = static_cast<float>(p.v[j]);
    } else {
      Packet<scalar_t> p;
#pragma unroll
      for (int j = 0; j < kPacket; ++j) p.v[j] = static_cast<scalar_t>(shared[j * step]);
      *reinterpret_cast<Packet<scalar_t>*>(image + offset) = p;
    }
  };
  TileAccess access = copy.access;
  if (access == TileAccess::kPlanePackets && count < kTilePixels) access = TileAccess::kPerPixel;
  switch (access) {
    case TileAccess::kPlanePackets: {
      // kLanes threads per channel, kTilePixels / kLanes channels per step
      constexpr int kLanes = kTilePixels / kPacket;
      const int lane_pixel = (t % kLanes) * kPacket;
      for (int ch = t / kLanes; ch < channels; ch += kTilePixels / kLanes) {
        move_packet(ch * copy.strides.channel + first + lane_pixel, tile + ch * kTilePitch + lane_pixel, 1);
      }
      break;
    }
    case TileAccess::kChannelsInnerPackets:
    case TileAccess::kChannelsInner: {
      // The tile is the contiguous run [first C, (first + count) C); thread t takes runs of `width`
      // elements kTilePixels runs apart, tracking (pixel, channel) without a division per step
      const int width = access == TileAccess::kChannelsInner ? 1 : kPacket;
      const int runs = count * channels / width;
      const int step = kTilePixels * width;
      int pixel = t * width / channels, ch = t * width % channels;
      for (int run = t; run < runs; run += kTilePixels) {
        const int64_t offset = first * channels + static_cast<int64_t>(run) * width;
        if (width == 1) {
          move(offset, tile + ch * kTilePitch + pixel);
        } else {
          move_packet(offset, tile + ch * kTilePitch + pixel, kTilePitch);
        }
        ch += step % channels;
        pixel += step / channels + (ch >= channels ? 1 : 0);
        ch -= ch >= channels ? channels : 0;
      }
      break;
    }
    case TileAccess::kPerPixel: {
      if (t < count) {
        const int64_t offset = copy.strides.pixel_offset(first + t);
        for (int ch = 0; ch < channels; ++ch) move(offset + ch * copy.strides.channel, tile + ch * kTilePitch + t);
      }
      break;
    }
  }
}

}  // namespace dmol
}  // namespace vdvae_fast
