"""Per-pixel DMoL math shared by the dmol_nll and dmol_sample kernels, and their launch geometry.

Both kernels give each pixel one lane and loop over the M mixtures (a loop, not unrolled, so code size and
compile time do not grow with M), so no mixture is padded and nothing is reduced across lanes. Log-probabilities are carried in base 2 (bits): a
channel's bin probability is `exp2(offset) * arg` with `arg` in [1e-5, 1], so a mixture's probability is a
product and the per-pixel log-sum-exp needs one exp2 per mixture and one log per pixel, not one log per
channel. Special functions come in two forms selected by the constexpr COMPILED: the bare MUFU instruction
(inline PTX) when compiled for a GPU, plain Triton arithmetic in the interpreter, which cannot run PTX.
"""

import math

import torch
import triton
import triton.language as tl

from ..reference import SCALES

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NUM_WARPS = 4
# Pixels per thread: 4 consecutive pixels of a channel plane are one 16-byte load in contiguous float32.
PIXELS_PER_THREAD = 1


@triton.jit
def reciprocal(x, COMPILED: tl.constexpr):
    """1 / x for normal x: MUFU.RCP (within 1 ulp) on the GPU, without the range fix-ups of Triton's `/`."""
    if COMPILED:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], tl.float32, True, 1)
    else:
        return 1.0 / x


@triton.jit
def fast_log2(x, COMPILED: tl.constexpr):
    """log2 of a normal x > 0: MUFU.LG2 on the GPU (absolute error below 2**-22 near 1)."""
    if COMPILED:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], tl.float32, True, 1)
    else:
        return tl.log2(x)


@triton.jit
def tanh_parts(raw, COMPILED: tl.constexpr):
    """(tanh(raw), 1 - tanh(raw)**2) from r = 1 / (1 + exp(2 raw)): tanh = 1 - 2r and 1 - tanh**2 = 4r(1 - r).

    The absolute error is a few 1e-8 (the coefficient only enters means as coefficient * x, |x| <= 1, so
    absolute error is what matters); both saturate cleanly for |raw| large and NaN stays NaN.
    """
    r = reciprocal(1.0 + tl.exp2(raw * (2.0 * LOG2E)), COMPILED)
    return 1.0 - 2.0 * r, 4.0 * r * (1.0 - r)


@triton.jit
def log1p_ratio(y, COMPILED: tl.constexpr):
    """log1p(y) / y for y in [0, 1] (1 at 0) in plain arithmetic: with s = y / (2 + y) <= 1/3, log1p(y) =
    2 atanh(s) = 2 s (1 + s**2/3 + s**4/5 + ...), whose terms after s**12/13 add less than 2e-8."""
    r = reciprocal(2.0 + y, COMPILED)
    s = y * r
    z = s * s
    p = z * (1.0 / 13.0) + 1.0 / 11.0
    p = p * z + 1.0 / 9.0
    p = p * z + 1.0 / 7.0
    p = p * z + 1.0 / 5.0
    p = p * z + 1.0 / 3.0
    p = p * z + 1.0
    return 2.0 * r * p


@triton.jit
def log_scale(
    raw,
    SOFTPLUS: tl.constexpr,
    BETA: tl.constexpr,
    LOG_BETA: tl.constexpr,
    LOG_SCALE_MIN: tl.constexpr,
    COMPILED: tl.constexpr,
):
    """reference.dmol_log_scales as (the floored log-scale, d unfloored log-scale / d raw, whether it is on
    the floor, whether below): torch.maximum's gradient is that slope, halved on the floor, 0 below. NaN stays
    NaN (tl.maximum may drop it).

    exp: the raw channel is the log-scale. softplus: log(softplus(beta raw) / beta), with y = exp(-|t|) for
    t = beta raw, as shift + log(arg): t >= 0 gives shift 0 and arg = softplus(t) = t + y log1p_ratio(y);
    t < 0 gives shift t and arg = log1p_ratio(y) in [ln 2, 1], which never underflows. The derivative of
    log softplus(t), sigmoid(t) / softplus(t), is 1 / ((1 + y) arg) in both cases."""
    if SOFTPLUS:
        t = BETA * raw
        y = tl.exp2(-tl.abs(t) * LOG2E)
        ratio = log1p_ratio(y, COMPILED)
        negative = t < 0.0
        arg = tl.where(negative, ratio, t + y * ratio)
        unfloored = (tl.where(negative, t, 0.0) + fast_log2(arg, COMPILED) * LN2) - LOG_BETA
        slope = BETA * reciprocal((1.0 + y) * arg, COMPILED)
    else:
        unfloored = raw
        slope = 1.0  # unused
    below = unfloored < LOG_SCALE_MIN
    return tl.where(below, LOG_SCALE_MIN, unfloored), slope, unfloored == LOG_SCALE_MIN, below


@triton.jit
def channel_bin(
    x,
    mean,
    raw_log_scale,
    left,
    right,
    HALF: tl.constexpr,
    LOG_BINS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BETA: tl.constexpr,
    LOG_BETA: tl.constexpr,
    LOG_SCALE_MIN: tl.constexpr,
    COMPILED: tl.constexpr,
):
    """One colour channel under one logistic: its bin probability as exp2(offset) * arg, d log P / d mean and
    d log P / d raw log-scale (the compiler drops them where only the probability is used), and whether the
    log-scale (log_scale's) is below its floor.

    The contract's four cases (docs/kernel-contract.md) in one form: with e = exp(-|v|), r = 1 / (1 + e),
    sigmoid(v) is r or e r and log sigmoid(v) = min(v, 0) + log r, so
      left edge  (x < -0.999): offset min(plus, 0),  arg r_plus
      right edge (x >  0.999): offset min(-min, 0),  arg r_min
      bulk (cdf_delta > 1e-5): offset 0,             arg cdf_delta = sigmoid(plus) - sigmoid(min)
      tiny bin:                offset -|mid| - log_scale - log_bins,  arg r_mid**2
    (offsets in bits). cdf_delta cancels in the right tail exactly as the reference's does. The derivatives take
    the form d/dmean = -inv_s (wp - wm) and d/dlog_scale = -(plus_in wp - min_in wm + tiny) with wp, wm the
    weights of the two bin edges (sigmoid' / cdf_delta in the bulk) and tiny 1 in the tiny-bin case. In the bulk
    sigmoid' is cdf (1 - cdf), from the rounded cdf as autograd forms it: where both edges sit far in the right
    tail, the rounding of 1 - cdf then cancels against that of cdf_delta instead of adding to it (e r**2, exact
    as it is, put the means' gradients there orders of magnitude further from float64 than the reference's:
    tests/test_dmol_nll_far_tail.py).
    """
    ls, slope, on_floor, below = log_scale(raw_log_scale, SOFTPLUS, BETA, LOG_BETA, LOG_SCALE_MIN, COMPILED)
    ls2 = ls * LOG2E
    inv_s = tl.exp2(-ls2)
    scale2 = inv_s * LOG2E
    centered = x - mean
    plus2 = scale2 * (centered + HALF)  # plus_in, min_in, mid_in in bits
    min2 = scale2 * (centered - HALF)
    mid2 = scale2 * centered
    e_plus = tl.exp2(-tl.abs(plus2))
    e_min = tl.exp2(-tl.abs(min2))
    e_mid = tl.exp2(-tl.abs(mid2))
    r_plus = reciprocal(1.0 + e_plus, COMPILED)
    r_min = reciprocal(1.0 + e_min, COMPILED)
    r_mid = reciprocal(1.0 + e_mid, COMPILED)
    plus_pos = plus2 >= 0.0
    min_pos = min2 >= 0.0
    cdf_plus = tl.where(plus_pos, r_plus, e_plus * r_plus)
    cdf_min = tl.where(min_pos, r_min, e_min * r_min)
    cdf_delta = cdf_plus - cdf_min
    bulk = cdf_delta > 1e-5
    arg = tl.where(left, r_plus, tl.where(right, r_min, tl.where(bulk, cdf_delta, r_mid * r_mid)))
    offset = tl.where(
        left,
        tl.minimum(plus2, 0.0),
        tl.where(right, tl.minimum(-min2, 0.0), tl.where(bulk, 0.0, -tl.abs(mid2) - ls2 - LOG_BINS * LOG2E)),
    )

    inv_delta = reciprocal(tl.where(bulk, cdf_delta, 1.0), COMPILED)
    # tiny bin: d/dmid of the log-density is 1 - 2 sigmoid(mid_in), split evenly between the two edges
    half_slope = 0.5 * tl.where(mid2 >= 0.0, e_mid - 1.0, 1.0 - e_mid) * r_mid
    w_plus = tl.where(
        left,
        tl.where(plus_pos, e_plus * r_plus, r_plus),  # 1 - sigmoid(plus_in)
        tl.where(right, 0.0, tl.where(bulk, cdf_plus * (1.0 - cdf_plus) * inv_delta, half_slope)),
    )
    w_min = tl.where(
        left, 0.0, tl.where(right, cdf_min, tl.where(bulk, cdf_min * (1.0 - cdf_min) * inv_delta, -half_slope))
    )
    tiny = tl.where(left | right | bulk, 0.0, 1.0)
    d_mean = inv_s * (w_min - w_plus)
    d_log_scale = -((plus2 * w_plus - min2 * w_min) * LN2 + tiny)
    # torch.maximum's gradient: halved on the floor (zeroing below it is left to the caller, after the product
    # with the upstream gradient, so that a NaN upstream still gives 0 there)
    d_raw_log_scale = tl.where(on_floor, 0.5 * d_log_scale, d_log_scale)
    if SOFTPLUS:
        d_raw_log_scale = d_raw_log_scale * slope
    return offset, arg, d_mean, d_raw_log_scale, below


@triton.jit
def pixel_offsets(pixels, W, stride_h, stride_w, MERGED_HW: tl.constexpr):
    """Offsets of pixels (h * W + w) given the h and w strides; merged layouts hold the pixel stride in stride_w."""
    if MERGED_HW:
        return pixels * stride_w
    else:
        return (pixels // W) * stride_h + (pixels % W) * stride_w


@triton.jit
def load_channel(rows, channel, stride_c, mask):
    """One channel of this program's pixels as float32; rows = per-pixel pointers to channel 0 (see `shift`).

    The channel's offset is added to the pointers, not to int32 pixel offsets, so that with a constexpr channel
    stride (dmol_nll's, or a stride of 1) it folds into the load's immediate address offset: no address
    arithmetic per load. mask None: a load of whole blocks, without one."""
    if mask is None:
        return tl.load(rows + channel * stride_c).to(tl.float32)
    else:
        return tl.load(rows + channel * stride_c, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def shift(rows, channels, stride_c):
    """rows moved by `channels` channels."""
    return rows + channels * stride_c


@triton.jit
def store_channel(rows, channel, stride_c, value, mask):
    """Store one channel of this program's pixels in the element type of rows' pointers."""
    tl.store(rows + channel * stride_c, value.to(rows.dtype.element_ty), mask=mask)


def scale_constexprs(scale: int, beta: float, log_scale_min: float) -> dict:
    """The constexprs of log_scale from the entry points' scale options (scale indexes reference.SCALES): a model
    keeps one set, so they compile into the kernels as VDVAE's floor of -7 always did."""
    return {
        "SOFTPLUS": SCALES[scale] == "softplus",
        "BETA": beta,
        "LOG_BETA": math.log(beta),
        "LOG_SCALE_MIN": log_scale_min,
    }


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


def block_pixels(pixels: int) -> int:
    """Pixels per program: one per lane times PIXELS_PER_THREAD, fewer for small images (at least 32)."""
    return max(32, min(32 * NUM_WARPS * PIXELS_PER_THREAD, triton.next_power_of_2(pixels)))
