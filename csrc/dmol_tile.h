// Tiles of pixels of one image, the work unit of the DMoL CPU kernels (dmol_nll_cpu.cpp,
// dmol_sample_cpu.cpp): a tile's channels are gathered through the tensor strides into rows of kTile
// lanes, one lane per pixel, so that the kernels' loops over a row read consecutive memory whatever
// the layout.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

namespace vdvae_fast {

// Where the pixels of tile `tile` of an image lie: lane t is at offset(t) from the image's first
// element. When the H and W dimensions collapse into one stride (contiguous and channels_last do),
// offset(t) is affine in t and the copies below vectorize; other strides use a table.
template <int64_t kTile>
struct TilePixels {
  int64_t first, count;
  int64_t pixel_stride;  // 0 when H and W do not collapse
  int64_t channel_stride;
  bool channels_inner;  // channels_last: copy pixel by pixel, else channel by channel
  int64_t table[kTile];

  TilePixels(int64_t tile, const at::Tensor& t)
      : first(tile * kTile),
        count(std::min(kTile, t.size(2) * t.size(3) - tile * kTile)),
        pixel_stride(t.size(2) == 1 || t.stride(2) == t.size(3) * t.stride(3) ? t.stride(3) : 0),
        channel_stride(t.stride(1)),
        channels_inner(t.stride(1) < t.stride(3)) {
    for (int64_t i = 0; pixel_stride == 0 && i < count; ++i)
      table[i] = ((first + i) / t.size(3)) * t.stride(2) + ((first + i) % t.size(3)) * t.stride(3);
  }

  // Calls copy(channel, lane, offset of element (channel, lane)) for every element of the tile
  template <typename Copy>
  void for_each(int64_t channels, const Copy& copy) const {
    if (pixel_stride != 0) {
      visit(channels, copy, [&](int64_t t) { return (first + t) * pixel_stride; });
    } else {
      visit(channels, copy, [&](int64_t t) { return table[t]; });
    }
  }

 private:
  // channels_last copies run over blocks of channels whose float rows (of kTile lanes) fill 16 KiB,
  // so that the rows being written stay in L1
  static constexpr int64_t kChannelBlock = 4096 / kTile;

  template <typename Copy, typename Offset>
  void visit(int64_t channels, const Copy& copy, const Offset& offset) const {
    if (channels_inner) {
      for (int64_t block = 0; block < channels; block += kChannelBlock) {
        const int64_t block_end = std::min(block + kChannelBlock, channels);
        for (int64_t t = 0; t < count; ++t)
          for (int64_t ch = block; ch < block_end; ++ch) copy(ch, t, offset(t) + ch * channel_stride);
      }
    } else {
      for (int64_t ch = 0; ch < channels; ++ch)
        for (int64_t t = 0; t < count; ++t) copy(ch, t, offset(t) + ch * channel_stride);
    }
  }
};

// rows[ch][lane] = image[ch][pixel of lane] in acc_t; lanes past the tile's end get 0 (finite math)
template <int64_t kTile, typename scalar_t, typename acc_t>
void gather(const scalar_t* image, int64_t channels, const TilePixels<kTile>& tile, acc_t* rows) {
  tile.for_each(channels, [&](int64_t ch, int64_t t, int64_t offset) {
    rows[ch * kTile + t] = static_cast<acc_t>(image[offset]);
  });
  for (int64_t ch = 0; ch < channels; ++ch)
    for (int64_t t = tile.count; t < kTile; ++t) rows[ch * kTile + t] = acc_t(0);
}

template <int64_t kTile, typename scalar_t, typename acc_t>
void scatter(const acc_t* rows, int64_t channels, const TilePixels<kTile>& tile, scalar_t* image) {
  tile.for_each(channels, [&](int64_t ch, int64_t t, int64_t offset) {
    image[offset] = static_cast<scalar_t>(rows[ch * kTile + t]);
  });
}

}  // namespace vdvae_fast
