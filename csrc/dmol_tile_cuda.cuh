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

  // 32-bit division: a 64-bit one calls a subroutine (the ops check that H W < 2^31)
  __device__ int64_t pixel_offset(int64_t p) const {
    const uint32_t row = static_cast<uint32_t>(p) / static_cast<uint32_t>(image_width);
    return row * height + (p - static_cast<int64_t>(row) * image_width) * width;
  }
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
  const bool aligned =
      reinterpret_cast<uintptr_t>(t.data_ptr()) % (kPacket * t.element_size()) == 0 && t.stride(0) % kPacket == 0;
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

// kPacket elements at an aligned address, as floats: one 16-byte (float) or 8-byte (half types) access
template <typename scalar_t>
struct alignas(kPacket * sizeof(scalar_t)) Packet {
  scalar_t v[kPacket];
};

template <typename scalar_t>
__device__ void load_packet(const scalar_t* at, float* shared, int step) {
  const Packet<scalar_t> p = *reinterpret_cast<const Packet<scalar_t>*>(at);
#pragma unroll
  for (int j = 0; j < kPacket; ++j) shared[j * step] = static_cast<float>(p.v[j]);
}

// One vector store instruction, written out: nvcc splits a float4 assignment into four scalar stores here
template <typename scalar_t>
__device__ void store_packet(scalar_t* at, const float* shared, int step) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(at), "f"(shared[0]), "f"(shared[step]),
                 "f"(shared[2 * step]), "f"(shared[3 * step]));
  } else {
    const auto bits = [&](int j) { return static_cast<uint32_t>(static_cast<scalar_t>(shared[j * step]).x); };
    asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(at), "r"(bits(0) | (bits(1) << 16)),
                 "r"(bits(2) | (bits(3) << 16)));
  }
}

// Moves `count` pixels from `first` on of one image (its first element at `image`) into the tile
// (kLoad) or out of it. All threads of the block call it. kChannels > 0 fixes the channel count at compile
// time: the vector copies then unroll fully, with every address an immediate offset from one base (the
// scalar fallbacks stay loops).
template <bool kLoad, typename scalar_t, int kChannels>
__device__ void copy_tile(std::conditional_t<kLoad, const scalar_t*, scalar_t*> image, float* tile,
                          const TileCopy& copy, int64_t first, int count) {
  const int t = threadIdx.x;
  const int channels = kChannels > 0 ? kChannels : static_cast<int>(copy.channels);
  const auto move = [](auto global, float* shared) {
    if constexpr (kLoad) {
      *shared = static_cast<float>(*global);
    } else {
      *global = static_cast<scalar_t>(*shared);
    }
  };
  // kPacket elements at an aligned address <-> shared floats `step` apart
  const auto move_packet = [](auto global, float* shared, int step) {
    if constexpr (kLoad) {
      load_packet(global, shared, step);
    } else {
      store_packet(global, shared, step);
    }
  };
  constexpr int kWarps = kTilePixels / 32;
  constexpr int kUnroll = kChannels > 0 ? kTilePixels / kWarps : 1;
  TileAccess access = copy.access;
  if (access == TileAccess::kPlanePackets && count < kTilePixels) access = TileAccess::kPerPixel;
  switch (access) {
    case TileAccess::kPlanePackets: {
      // A channel's kTilePixels pixels are kLanes packets: the block moves kRows channels per step
      constexpr int kLanes = kTilePixels / kPacket, kRows = kTilePixels / kLanes;
      const int pixel = (t % kLanes) * kPacket, row = t / kLanes;
      const auto global = image + row * copy.strides.channel + first + pixel;
      float* shared = tile + row * kTilePitch + pixel;
      const int64_t global_step = kRows * copy.strides.channel;
#pragma unroll
      for (int step = 0; step < channels / kRows; ++step) {
        move_packet(global + step * global_step, shared + step * kRows * kTilePitch, 1);
      }
      const int last = channels / kRows * kRows + row;
      if (last < channels) move_packet(global + channels / kRows * global_step, tile + last * kTilePitch + pixel, 1);
      break;
    }
    case TileAccess::kChannelsInnerPackets: {
      // A pixel's channels are one contiguous run of channels / kPacket packets: warp w moves pixels w,
      // w + kWarps, ..., lane l packets l, l + 32, ... of each
      const int warp = t / 32, lane = t % 32, packets = channels / kPacket;
      const int rows = (count - warp + kWarps - 1) / kWarps;
#pragma unroll
      for (int chunk = 0; chunk < (packets + 31) / 32; ++chunk) {
        const int packet = lane + chunk * 32;
        if (packet >= packets) break;
        const auto global = image + (first + warp) * channels + packet * kPacket;
        float* shared = tile + packet * kPacket * kTilePitch + warp;
        if (rows == kTilePixels / kWarps) {
#pragma unroll kUnroll
          for (int r = 0; r < kTilePixels / kWarps; ++r) {
            move_packet(global + r * kWarps * channels, shared + r * kWarps, kTilePitch);
          }
        } else {
#pragma unroll 1
          for (int r = 0; r < rows; ++r) move_packet(global + r * kWarps * channels, shared + r * kWarps, kTilePitch);
        }
      }
      break;
    }
    case TileAccess::kChannelsInner: {
      // The same run one element at a time: lanes take consecutive channels
      const int warp = t / 32, lane = t % 32;
#pragma unroll 1
      for (int pixel = warp; pixel < count; pixel += kWarps) {
#pragma unroll 1
        for (int ch = lane; ch < channels; ch += 32)
          move(image + (first + pixel) * channels + ch, tile + ch * kTilePitch + pixel);
      }
      break;
    }
    case TileAccess::kPerPixel: {
      if (t < count) {
        const auto global = image + copy.strides.pixel_offset(first + t);
#pragma unroll 1
        for (int ch = 0; ch < channels; ++ch) move(global + ch * copy.strides.channel, tile + ch * kTilePitch + t);
      }
      break;
    }
  }
}

}  // namespace dmol
}  // namespace vdvae_fast
