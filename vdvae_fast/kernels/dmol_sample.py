"""Sampling an image from the DMoL: Gumbel-max mixture choice, logistic draw, RGB coupling, clamp.

Randomness comes from counters (pixel, stream) of the shared Philox stream (docs/kernel-contract.md), so
the image matches every other backend's for the same seed. The chosen mixture's parameters are picked
with a one-hot product like the reference, so NaN anywhere in a pixel's parameters reaches its output.
"""

import torch
import triton
import triton.language as tl

from .dmol_math import NUM_WARPS, load_group, log_scale, pixel_offsets, pixel_strides, tanh, tile_shape
from .philox import open_uniform, philox_key


@triton.jit
def _clamp_unit(v):
    """clamp(v, -1, 1) keeping NaN."""
    return tl.where(v < -1.0, -1.0, tl.where(v > 1.0, 1.0, v))


@triton.jit
def _pick(values, select):
    """The selected mixture's value of each pixel: a one-hot product, so NaN in any mixture propagates."""
    return tl.sum(values * select, axis=1)


@triton.jit
def _logistic_draw(k0, k1, counters, stream, mean, raw_log_scale):
    """mean + scale * logit(u) with u from counter (pixel, stream)."""
    u = open_uniform(k0, k1, counters, stream)
    return mean + tl.exp(log_scale(raw_log_scale)) * (tl.log(u) - tl.log(1.0 - u))


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
    M_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    MERGED_HW: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mix = tl.arange(0, M_PAD)
    pixel_mask = pixels < HW
    mix_valid = (mix < NUM_MIX)[None, :]
    mask = pixel_mask[:, None] & mix_valid
    l_ptrs = logits_ptr + b * l_sb + pixel_offsets(pixels, W, l_sh, l_sw, MERGED_HW)[:, None] + mix[None, :] * l_sc

    k0, k1 = philox_key(seed)
    counters = (b * HW + pixels).to(tl.uint32)  # pixel (b H + h) W + w
    gumbel_u = open_uniform(k0, k1, counters[:, None], mix.to(tl.uint32)[None, :])
    score = load_group(l_ptrs, 0, l_sc, mask, NUM_MIX) - tl.log(-tl.log(gumbel_u))
    score = tl.where(mix_valid, score, -float("inf"))
    # argmax as torch: the first NaN if any, else the first maximum
    first_nan = tl.min(tl.where(score != score, mix[None, :], M_PAD), axis=1)
    best = tl.max(score, axis=1)
    first_best = tl.min(tl.where((score == best[:, None]) & mix_valid, mix[None, :], M_PAD), axis=1)
    choice = tl.where(first_nan < M_PAD, first_nan, first_best)
    select = (mix[None, :] == choice[:, None]).to(tl.float32)

    draw0 = _logistic_draw(
        k0,
        k1,
        counters,
        NUM_MIX,
        _pick(load_group(l_ptrs, 1, l_sc, mask, NUM_MIX), select),
        _pick(load_group(l_ptrs, 2, l_sc, mask, NUM_MIX), select),
    )
    draw1 = _logistic_draw(
        k0,
        k1,
        counters,
        NUM_MIX + 1,
        _pick(load_group(l_ptrs, 4, l_sc, mask, NUM_MIX), select),
        _pick(load_group(l_ptrs, 5, l_sc, mask, NUM_MIX), select),
    )
    draw2 = _logistic_draw(
        k0,
        k1,
        counters,
        NUM_MIX + 2,
        _pick(load_group(l_ptrs, 7, l_sc, mask, NUM_MIX), select),
        _pick(load_group(l_ptrs, 8, l_sc, mask, NUM_MIX), select),
    )
    coeff0 = _pick(tanh(load_group(l_ptrs, 3, l_sc, mask, NUM_MIX)), select)
    coeff1 = _pick(tanh(load_group(l_ptrs, 6, l_sc, mask, NUM_MIX)), select)
    coeff2 = _pick(tanh(load_group(l_ptrs, 9, l_sc, mask, NUM_MIX)), select)
    x0 = _clamp_unit(draw0)
    x1 = _clamp_unit(draw1 + coeff0 * x0)
    x2 = _clamp_unit(draw2 + coeff1 * x0 + coeff2 * x1)

    out_ptrs = out_ptr + b * o_sb + pixel_offsets(pixels, W, o_sh, o_sw, MERGED_HW)
    tl.store(out_ptrs, x0, mask=pixel_mask)
    tl.store(out_ptrs + o_sc, x1, mask=pixel_mask)
    tl.store(out_ptrs + 2 * o_sc, x2, mask=pixel_mask)


def dmol_sample(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """A (B, 3, H, W) float32 image in [-1, 1], channels_last when logits is."""
    batch, channels, height, width = logits.shape
    channels_last = not logits.is_contiguous() and logits.is_contiguous(memory_format=torch.channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((batch, 3, height, width), dtype=torch.float32, device=logits.device, memory_format=memory_format)
    if out.numel() == 0:
        return out
    num_mix = channels // 10
    block_p, m_pad = tile_shape(num_mix, height * width)
    l_strides, o_strides = pixel_strides(logits), pixel_strides(out)
    grid = (triton.cdiv(height * width, block_p), batch)
    torch.library.wrap_triton(_dmol_sample_kernel)[grid](
        logits,
        out,
        seed,
        height * width,
        width,
        *l_strides[:4],
        *o_strides[:4],
        NUM_MIX=num_mix,
        M_PAD=m_pad,
        BLOCK_P=block_p,
        MERGED_HW=l_strides[4] and o_strides[4],
        num_warps=NUM_WARPS,
    )
    return out
