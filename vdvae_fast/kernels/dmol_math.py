"""Per-element DMoL math shared by the dmol_nll and dmol_sample kernels, plus their launch geometry."""

import math

import torch
import triton
import triton.language as tl

LOG_SCALE_MIN = tl.constexpr(-7.0)
# One [pixels, mixtures] tile holds 1024 elements, 4 per thread at 8 warps, so the backward's ~15 live tiles
# and their temporaries stay in registers (not measured on a GPU yet: the first thing to tune).
TILE_ELEMENTS = 1024
NUM_WARPS = 8


@triton.jit
def tanh(x):
    """tanh to a few ulp (tl has no tanh; libdevice does not run in the interpreter).

    (1 - e) / (1 + e) with e = exp(-2|x|) cancels for small |x|, so below 0.6 an odd polynomial fitted
    for relative error (3e-9; 0.8 ulp in float32) is used instead.
    """
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    x2 = x * x
    poly = x2 * -0.005895046051591635 + 0.02079588547348976
    poly = poly * x2 - 0.053783807903528214
    poly = poly * x2 + 0.13331924378871918
    poly = poly * x2 - 0.33333298563957214
    small = x + x * x2 * poly
    return tl.where(tl.abs(x) < 0.6, small, tl.where(x < 0.0, -t, t))


@triton.jit
def log_unit(x):
    """log(x) for float32 x in [2**-126, 1] (NaN stays NaN), within ~1.2 ulp.

    Half the instructions of tl.log (libdevice's logf checks for zeros, infinities and subnormals that
    cannot occur here); the log per element is a large part of the dmol kernels' arithmetic. x = 2**k m with
    m in [sqrt(1/2), sqrt(2)), and log(m) = f - f^2/2 + f^3 P(f) for f = m - 1, P fitted for absolute error.
    """
    bits = x.to(tl.int32, bitcast=True)
    exponent = (bits - 0x3F3504F3) >> 23
    f = (bits - (exponent << 23)).to(tl.float32, bitcast=True) - 1.0
    poly = f * -0.07631096988916397 + 0.128548264503479
    poly = poly * f - 0.1320788711309433
    poly = poly * f + 0.1419002115726471
    poly = poly * f - 0.16616524755954742
    poly = poly * f + 0.20001615583896637
    poly = poly * f - 0.25001057982444763
    poly = poly * f + 0.333333283662796
    f2 = f * f
    log_m = f - 0.5 * f2 + f2 * f * poly
    return tl.where(x == x, exponent.to(tl.float32) * 0.6931471805599453 + log_m, x)


@triton.jit
def log_scale(raw):
    """max(raw, -7) that keeps NaN (tl.maximum may drop it)."""
    return tl.where(raw < LOG_SCALE_MIN, LOG_SCALE_MIN, raw)


@triton.jit
def channel_log_prob(x, mean, raw_log_scale, HALF: tl.constexpr, LOG_BINS: tl.constexpr):
    """log P(x) of one colour channel under one logistic, d/dmean, d/d(raw log-scale) and where the clamp holds.

    Each sigmoid and softplus is built from e = exp(-|v|) and r = 1 / (1 + e): sigmoid(v) is r or e*r,
    softplus(v) is max(v, 0) - log(r). The four cases of the contract then reduce to `offset + log(arg)`,
    one log per element. cdf_delta is the contract's sigmoid(plus_in) - sigmoid(min_in): it cancels in the
    right tail just as the reference does (same branch choices, same values), and its derivative uses
    sigmoid * (1 - sigmoid) as torch's does, so the two roundings cancel in their ratio.
    Derivatives take the form dlp/dmean = -s (wp - wm) and dlp/dlog_scale = -(plus_in wp - min_in wm + tiny),
    with wp, wm the weights of the two bin edges and tiny 1 in the tiny-bin case.
    """
    ls = log_scale(raw_log_scale)
    inv_s = tl.exp(-ls)
    centered = x - mean
    plus_in = inv_s * (centered + HALF)
    min_in = inv_s * (centered - HALF)
    mid_in = inv_s * centered

    e_plus = tl.exp(-tl.abs(plus_in))
    r_plus = 1.0 / (1.0 + e_plus)
    e_min = tl.exp(-tl.abs(min_in))
    r_min = 1.0 / (1.0 + e_min)
    e_mid = tl.exp(-tl.abs(mid_in))
    r_mid = 1.0 / (1.0 + e_mid)
    plus_pos = plus_in >= 0.0
    min_pos = min_in >= 0.0
    cdf_plus = tl.where(plus_pos, r_plus, e_plus * r_plus)  # sigmoid(plus_in)
    cdf_plus_c = tl.where(plus_pos, e_plus * r_plus, r_plus)  # 1 - sigmoid(plus_in), without cancellation
    cdf_min = tl.where(min_pos, r_min, e_min * r_min)
    cdf_delta = cdf_plus - cdf_min

    left = x < -0.999
    right = x > 0.999
    bulk = cdf_delta > 1e-5
    # tiny bin: mid_in - ls - 2 softplus(mid_in) - log_bins = -|mid_in| - ls - log_bins + 2 log(r_mid)
    arg = tl.where(left, r_plus, tl.where(right, r_min, tl.where(bulk, cdf_delta, r_mid * r_mid)))
    offset = tl.where(
        left,
        tl.where(plus_pos, 0.0, plus_in),
        tl.where(right, tl.where(min_pos, -min_in, 0.0), tl.where(bulk, 0.0, -tl.abs(mid_in) - ls - LOG_BINS)),
    )
    log_prob = offset + log_unit(arg)

    inv_delta = 1.0 / tl.where(bulk, cdf_delta, 1.0)
    # tiny bin: d/dmid of the log-density is 1 - 2 sigmoid(mid_in), split evenly between the two edges.
    half_slope = 0.5 * tl.where(mid_in >= 0.0, e_mid - 1.0, 1.0 - e_mid) * r_mid
    w_plus = tl.where(
        left, cdf_plus_c, tl.where(right, 0.0, tl.where(bulk, cdf_plus * (1.0 - cdf_plus) * inv_delta, half_slope))
    )
    w_min = tl.where(
        left, 0.0, tl.where(right, cdf_min, tl.where(bulk, cdf_min * (1.0 - cdf_min) * inv_delta, -half_slope))
    )
    tiny = tl.where(left | right | bulk, 0.0, 1.0)
    d_mean = -inv_s * (w_plus - w_min)
    d_log_scale = -(plus_in * w_plus - min_in * w_min + tiny)
    # torch.maximum's gradient: halved at the tie, and zero below the clamp even where the upstream
    # gradient is NaN, so the caller applies `clamped` after multiplying by it
    d_raw_log_scale = tl.where(raw_log_scale == LOG_SCALE_MIN, 0.5 * d_log_scale, d_log_scale)
    return log_prob, d_mean, d_raw_log_scale, raw_log_scale < LOG_SCALE_MIN


@triton.jit
def pixel_offsets(pixels, W, stride_h, stride_w, MERGED_HW: tl.constexpr):
    """Offsets of pixels (h * W + w) given the h and w strides; merged layouts hold the pixel stride in stride_w."""
    if MERGED_HW:
        return pixels * stride_w
    else:
        return (pixels // W) * stride_h + (pixels % W) * stride_w


@triton.jit
def load_group(ptrs, group, stride_c, mask, NUM_MIX: tl.constexpr):
    """The [BLOCK_P, M_PAD] tile of channel group `group` (channels group*M .. group*M + M - 1) as float32."""
    return tl.load(ptrs + group * NUM_MIX * stride_c, mask=mask, other=0.0).to(tl.float32)


def bin_constants(num_bits: int) -> tuple[float, float]:
    """(half bin width, log of the half number of bins) of targets scaled to [-1, 1]."""
    levels = 2**num_bits - 1
    return 1.0 / levels, math.log(levels / 2)


def pixel_strides(t: torch.Tensor) -> tuple[int, int, int, int, bool]:
    """(batch, channel, h, w) strides and whether h and w merge into one pixel stride (held in the w slot).

    Contiguous and channels_last tensors both merge, which keeps pixel offsets a single multiply
    and lets Triton prove contiguity along pixels (NCHW) for vectorized loads.
    """
    _, _, height, width = t.shape
    sb, sc, sh, sw = t.stride()
    if height == 1:
        return sb, sc, sh, sw, True
    if width == 1:
        return sb, sc, sh, sh, True
    return sb, sc, sh, sw, sh == width * sw


def tile_shape(num_mix: int, pixels: int) -> tuple[int, int]:
    """(BLOCK_P, M_PAD): all mixtures of a pixel in one tile row, the tile size bounded for registers."""
    m_pad = triton.next_power_of_2(num_mix)
    block_p = max(16, min(TILE_ELEMENTS // m_pad, triton.next_power_of_2(pixels)))
    return block_p, m_pad
