"""Sampling an image from the DMoL: Gumbel-max mixture choice, logistic draw, RGB coupling, clamp.

One pixel per lane, unrolled loops over the M mixtures (no padding, no reduction across lanes): the first
picks the mixture (argmax of logit + Gumbel noise, torch's argmax semantics), the second gathers the
chosen mixture's parameters with a one-hot product like the reference, so NaN anywhere in a pixel's
parameters reaches its output. Randomness comes from the shared Philox stream (docs/kernel-contract.md):
stream j of a pixel is word j % 4 of counter (pixel, j // 4), one call for four streams, so the image
matches every other backend's for the same seed.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

from ..reference import memory_format_of
from .dmol_math import (
    LN2,
    LOG2E,
    NUM_WARPS,
    block_pixels,
    fast_log2,
    load_channel,
    log_scale,
    pixel_offsets,
    pixel_strides,
    scale_constexprs,
    shift,
    tanh_parts,
)
from .philox import open_uniforms, philox_key


@triton.jit
def _clamp_unit(v):
    """clamp(v, -1, 1) keeping NaN."""
    return tl.where(v < -1.0, -1.0, tl.where(v > 1.0, 1.0, v))


@triton.jit
def _gumbel_pick(best, choice, l_rows, l_sc, mask, u, k, COMPILED: tl.constexpr):
    """(best, choice) after mixture k of the argmax, as torch's: the first NaN if any, else the first maximum.

    The score is (logit_k - log(-log u_k)) / ln 2, the Gumbel-max score in bits (the argmax is the same); its
    inner log is Triton's accurate one: -log u is tiny for u near 1, where an absolute error would not be."""
    score = load_channel(l_rows, k, l_sc, mask) * LOG2E - fast_log2(tl.log2(u) * -LN2, COMPILED)
    take = (best == best) & ((score != score) | (score > best))
    return tl.where(take, score, best), tl.where(take, k, choice)


@triton.jit
def _logistic_draw(
    u,
    mean,
    raw_log_scale,
    SOFTPLUS: tl.constexpr,
    BETA: tl.constexpr,
    LOG_BETA: tl.constexpr,
    LOG_SCALE_MIN: tl.constexpr,
    COMPILED: tl.constexpr,
):
    """mean + scale * logit(u), the log-scale from dmol_math.log_scale."""
    logit = (fast_log2(u, COMPILED) - fast_log2(1.0 - u, COMPILED)) * LN2
    ls = log_scale(raw_log_scale, SOFTPLUS, BETA, LOG_BETA, LOG_SCALE_MIN, COMPILED)[0]
    return mean + tl.exp2(ls * LOG2E) * logit


@triton.jit(do_not_specialize=["seed"])
def _dmol_sample_kernel(
    logits_ptr,
    out_ptr,
    seed,
    HW,
    W,
    l_sb,
    l_sc,
    l_sh,
    l_sw,
    o_sb,
    o_sc,
    o_sh,
    o_sw,
    NUM_MIX: tl.constexpr,
    BLOCK_P: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BETA: tl.constexpr,
    LOG_BETA: tl.constexpr,
    LOG_SCALE_MIN: tl.constexpr,
    MERGED_HW: tl.constexpr,
    COMPILED: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = pixels < HW
    l_rows = logits_ptr + b * l_sb + pixel_offsets(pixels, W, l_sh, l_sw, MERGED_HW)
    k0, k1 = philox_key(seed)
    counters = (b * HW + pixels).to(tl.uint32)  # pixel (b H + h) W + w

    # streams 0..M-1 are the Gumbel uniforms, M..M+2 the colours': the groups of four Gumbel streams in a loop,
    # not unrolled (code size and compile time do not grow with M), then the last one or two groups
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    choice = tl.zeros([BLOCK_P], tl.int32)
    for group in range(0, NUM_MIX // 4):
        u = open_uniforms(k0, k1, counters, group)
        for lane in tl.static_range(4):
            best, choice = _gumbel_pick(best, choice, l_rows, l_sc, mask, u[lane], 4 * group + lane, COMPILED)
    tail = open_uniforms(k0, k1, counters, NUM_MIX // 4)  # streams 4 (M // 4) .. 4 (M // 4) + 3
    if NUM_MIX % 4 >= 2:  # the colours' streams reach the next group
        tail = tail + open_uniforms(k0, k1, counters, NUM_MIX // 4 + 1)
    for lane in tl.static_range(NUM_MIX % 4):
        best, choice = _gumbel_pick(
            best, choice, l_rows, l_sc, mask, tail[lane], NUM_MIX - NUM_MIX % 4 + lane, COMPILED
        )

    # the chosen mixture's parameters, gathered: each lane reads its own mixture's nine channels
    rows = shift(l_rows, choice, l_sc)
    mean0 = load_channel(rows, NUM_MIX, l_sc, mask)
    raw_ls0 = load_channel(rows, 2 * NUM_MIX, l_sc, mask)
    coeff0 = tanh_parts(load_channel(rows, 3 * NUM_MIX, l_sc, mask), COMPILED)[0]
    mean1 = load_channel(rows, 4 * NUM_MIX, l_sc, mask)
    raw_ls1 = load_channel(rows, 5 * NUM_MIX, l_sc, mask)
    coeff1 = tanh_parts(load_channel(rows, 6 * NUM_MIX, l_sc, mask), COMPILED)[0]
    mean2 = load_channel(rows, 7 * NUM_MIX, l_sc, mask)
    raw_ls2 = load_channel(rows, 8 * NUM_MIX, l_sc, mask)
    coeff2 = tanh_parts(load_channel(rows, 9 * NUM_MIX, l_sc, mask), COMPILED)[0]

    x0 = _clamp_unit(
        _logistic_draw(tail[NUM_MIX % 4 + 0], mean0, raw_ls0, SOFTPLUS, BETA, LOG_BETA, LOG_SCALE_MIN, COMPILED)
    )
    x1 = _clamp_unit(
        _logistic_draw(tail[NUM_MIX % 4 + 1], mean1, raw_ls1, SOFTPLUS, BETA, LOG_BETA, LOG_SCALE_MIN, COMPILED)
        + coeff0 * x0
    )
    x2 = _clamp_unit(
        _logistic_draw(tail[NUM_MIX % 4 + 2], mean2, raw_ls2, SOFTPLUS, BETA, LOG_BETA, LOG_SCALE_MIN, COMPILED)
        + coeff1 * x0
        + coeff2 * x1
    )
    out_ptrs = out_ptr + b * o_sb + pixel_offsets(pixels, W, o_sh, o_sw, MERGED_HW)
    tl.store(out_ptrs, x0, mask=mask)
    tl.store(out_ptrs + o_sc, x1, mask=mask)
    tl.store(out_ptrs + 2 * o_sc, x2, mask=mask)


def dmol_sample(logits: torch.Tensor, scale: int, beta: float, log_scale_min: float, seed: int) -> torch.Tensor:
    """A (B, 3, H, W) float32 image in [-1, 1], channels_last when logits is; scale indexes reference.SCALES."""
    batch, channels, height, width = logits.shape
    memory_format = memory_format_of(logits)
    out = torch.empty((batch, 3, height, width), dtype=torch.float32, device=logits.device, memory_format=memory_format)
    if out.numel() == 0:
        return out
    block_p = block_pixels(height * width)
    l_strides, o_strides = pixel_strides(logits), pixel_strides(out)
    grid = (triton.cdiv(height * width, block_p), batch)
    wrap_triton(_dmol_sample_kernel)[grid](
        logits,
        out,
        seed,
        height * width,
        width,
        *l_strides[:4],
        *o_strides[:4],
        NUM_MIX=channels // 10,
        BLOCK_P=block_p,
        **scale_constexprs(scale, beta, log_scale_min),
        MERGED_HW=l_strides[4] and o_strides[4],
        COMPILED=isinstance(_dmol_sample_kernel, JITFunction),
        num_warps=NUM_WARPS,
    )
    return out
