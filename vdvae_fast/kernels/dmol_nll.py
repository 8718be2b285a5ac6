"""Discretized mixture of logistics NLL (VDVAE / PixelCNN++): one-pass forward and a fused backward.

A program owns BLOCK_P pixels of one image and holds all M mixtures of each pixel in one row of a
[BLOCK_P, M_PAD] register tile, so every logit is read from global memory exactly once per pass.
The backward recomputes the forward from logits and x (nothing per mixture is saved) and writes
grad_logits in the same pass. logits, x and grad_logits are addressed through their own strides
(contiguous, channels_last or any other), never copied. Per-image sums are written as one partial
per program and summed by torch in a fixed order: deterministic, no atomics.
"""

import torch
import triton
import triton.language as tl

from .dmol_math import (
    NUM_WARPS,
    bin_constants,
    channel_log_prob,
    load_group,
    pixel_offsets,
    pixel_strides,
    tanh,
    tile_shape,
)


@triton.jit
def _pixel_tile(
    logits_ptr,
    x_ptr,
    HW,
    W,
    l_sb,
    l_sc,
    l_sh,
    l_sw,
    x_sb,
    x_sc,
    x_sh,
    x_sw,
    NUM_MIX: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    MERGED_HW: tl.constexpr,
):
    """This program's pixels (of image program_id(1)): their mask, the mask of real mixtures, the pointers of
    the [BLOCK_P, M_PAD] logits tile of channel group 0 and the three targets as [BLOCK_P, 1] float32."""
    b = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mix = tl.arange(0, M_PAD)
    pixel_mask = pixels < HW
    x_ptrs = x_ptr + b * x_sb + pixel_offsets(pixels, W, x_sh, x_sw, MERGED_HW)
    x0 = tl.load(x_ptrs, mask=pixel_mask, other=0.0).to(tl.float32)[:, None]
    x1 = tl.load(x_ptrs + x_sc, mask=pixel_mask, other=0.0).to(tl.float32)[:, None]
    x2 = tl.load(x_ptrs + 2 * x_sc, mask=pixel_mask, other=0.0).to(tl.float32)[:, None]
    l_ptrs = logits_ptr + b * l_sb + pixel_offsets(pixels, W, l_sh, l_sw, MERGED_HW)[:, None] + mix[None, :] * l_sc
    return pixels, pixel_mask, (mix < NUM_MIX)[None, :], l_ptrs, x0, x1, x2


@triton.jit
def _load_logits(l_ptrs, l_sc, mask, NUM_MIX: tl.constexpr):
    """All ten [BLOCK_P, M_PAD] channel groups as float32, in channel order: the mixture logits, then per
    colour c (block at group 1 + 3c) the means, raw log-scales and raw coefficients."""
    return (
        load_group(l_ptrs, 0, l_sc, mask, NUM_MIX),
        load_group(l_ptrs, 1, l_sc, mask, NUM_MIX),
        load_group(l_ptrs, 2, l_sc, mask, NUM_MIX),
        load_group(l_ptrs, 3, l_sc, mask, NUM_MIX),
        load_group(l_ptrs, 4, l_sc, mask, NUM_MIX),
        load_group(l_ptrs, 5, l_sc, mask, NUM_MIX),
        load_group(l_ptrs, 6, l_sc, mask, NUM_MIX),
        load_group(l_ptrs, 7, l_sc, mask, NUM_MIX),
        load_group(l_ptrs, 8, l_sc, mask, NUM_MIX),
        load_group(l_ptrs, 9, l_sc, mask, NUM_MIX),
    )


@triton.jit
def _softmax_parts(values, mix_valid):
    """(row max, exp(values - max), row sum of the exps) over mixtures; padded mixtures count as -inf.

    An all -inf row keeps max 0, so its sum is 0 (a log-likelihood of -inf) rather than NaN; NaN stays NaN
    through the sum whether or not tl.max drops it.
    """
    values = tl.where(mix_valid, values, -float("inf"))
    row_max = tl.max(values, axis=1)
    row_max = tl.where(row_max == -float("inf"), 0.0, row_max)
    exps = tl.exp(values - row_max[:, None])
    return row_max, exps, tl.sum(exps, axis=1)


@triton.jit
def _dmol_nll_forward_kernel(
    logits_ptr,
    x_ptr,
    partial_ptr,
    HW,
    W,
    l_sb,
    l_sc,
    l_sh,
    l_sw,
    x_sb,
    x_sc,
    x_sh,
    x_sw,
    inv_count,
    NUM_MIX: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HALF: tl.constexpr,
    LOG_BINS: tl.constexpr,
    MERGED_HW: tl.constexpr,
):
    _, pixel_mask, mix_valid, l_ptrs, x0, x1, x2 = _pixel_tile(
        logits_ptr, x_ptr, HW, W, l_sb, l_sc, l_sh, l_sw, x_sb, x_sc, x_sh, x_sw, NUM_MIX, M_PAD, BLOCK_P, MERGED_HW
    )
    pi, mu0, ls0, c0, mu1, ls1, c1, mu2, ls2, c2 = _load_logits(l_ptrs, l_sc, pixel_mask[:, None] & mix_valid, NUM_MIX)
    coeff0 = tanh(c0)
    coeff1 = tanh(c1)
    coeff2 = tanh(c2)
    lp0, _, _, _ = channel_log_prob(x0, mu0, ls0, HALF, LOG_BINS)
    lp1, _, _, _ = channel_log_prob(x1, mu1 + coeff0 * x0, ls1, HALF, LOG_BINS)
    lp2, _, _, _ = channel_log_prob(x2, mu2 + coeff1 * x0 + coeff2 * x1, ls2, HALF, LOG_BINS)
    # -logsumexp_k(log_prob_k + log_softmax(pi)_k) = logsumexp(pi) - logsumexp(log_prob + pi), with one log
    pi_max, _, pi_sum = _softmax_parts(pi, mix_valid)
    joint_max, _, joint_sum = _softmax_parts(lp0 + lp1 + lp2 + pi, mix_valid)
    nll = (pi_max - joint_max) + tl.log(pi_sum / joint_sum)
    partial = tl.sum(tl.where(pixel_mask, nll, 0.0), axis=0) * inv_count
    tl.store(partial_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), partial)


@triton.jit
def _dmol_nll_backward_kernel(
    grad_nll_ptr,
    logits_ptr,
    x_ptr,
    grad_ptr,
    HW,
    W,
    l_sb,
    l_sc,
    l_sh,
    l_sw,
    x_sb,
    x_sc,
    x_sh,
    x_sw,
    g_sb,
    g_sc,
    g_sh,
    g_sw,
    inv_count,
    NUM_MIX: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HALF: tl.constexpr,
    LOG_BINS: tl.constexpr,
    MERGED_HW: tl.constexpr,
):
    pixels, pixel_mask, mix_valid, l_ptrs, x0, x1, x2 = _pixel_tile(
        logits_ptr, x_ptr, HW, W, l_sb, l_sc, l_sh, l_sw, x_sb, x_sc, x_sh, x_sw, NUM_MIX, M_PAD, BLOCK_P, MERGED_HW
    )
    mask = pixel_mask[:, None] & mix_valid
    pi, mu0, ls0, c0, mu1, ls1, c1, mu2, ls2, c2 = _load_logits(l_ptrs, l_sc, mask, NUM_MIX)
    # the forward, keeping each colour's derivatives in registers
    coeff0 = tanh(c0)
    coeff1 = tanh(c1)
    coeff2 = tanh(c2)
    lp0, d_mean0, d_ls0, clamped0 = channel_log_prob(x0, mu0, ls0, HALF, LOG_BINS)
    lp1, d_mean1, d_ls1, clamped1 = channel_log_prob(x1, mu1 + coeff0 * x0, ls1, HALF, LOG_BINS)
    lp2, d_mean2, d_ls2, clamped2 = channel_log_prob(x2, mu2 + coeff1 * x0 + coeff2 * x1, ls2, HALF, LOG_BINS)
    _, pi_exps, pi_sum = _softmax_parts(pi, mix_valid)
    _, joint_exps, joint_sum = _softmax_parts(lp0 + lp1 + lp2 + pi, mix_valid)
    responsibility = joint_exps / joint_sum[:, None]

    g = tl.load(grad_nll_ptr + tl.program_id(1)).to(tl.float32) * inv_count
    grad_log_prob = -g * responsibility  # d nll / d log_prob_kc, the same for every colour c
    grad_mean1 = grad_log_prob * d_mean1
    grad_mean2 = grad_log_prob * d_mean2
    b = tl.program_id(1).to(tl.int64)
    g_ptrs = grad_ptr + b * g_sb + pixel_offsets(pixels, W, g_sh, g_sw, MERGED_HW)[:, None]
    g_ptrs += tl.arange(0, M_PAD)[None, :] * g_sc
    out_dtype = grad_ptr.dtype.element_ty
    group_stride = NUM_MIX * g_sc
    tl.store(g_ptrs, (g * (pi_exps / pi_sum[:, None] - responsibility)).to(out_dtype), mask=mask)
    tl.store(g_ptrs + 1 * group_stride, (grad_log_prob * d_mean0).to(out_dtype), mask=mask)
    tl.store(g_ptrs + 2 * group_stride, tl.where(clamped0, 0.0, grad_log_prob * d_ls0).to(out_dtype), mask=mask)
    tl.store(g_ptrs + 3 * group_stride, (grad_mean1 * x0 * (1.0 - coeff0 * coeff0)).to(out_dtype), mask=mask)
    tl.store(g_ptrs + 4 * group_stride, grad_mean1.to(out_dtype), mask=mask)
    tl.store(g_ptrs + 5 * group_stride, tl.where(clamped1, 0.0, grad_log_prob * d_ls1).to(out_dtype), mask=mask)
    tl.store(g_ptrs + 6 * group_stride, (grad_mean2 * x0 * (1.0 - coeff1 * coeff1)).to(out_dtype), mask=mask)
    tl.store(g_ptrs + 7 * group_stride, grad_mean2.to(out_dtype), mask=mask)
    tl.store(g_ptrs + 8 * group_stride, tl.where(clamped2, 0.0, grad_log_prob * d_ls2).to(out_dtype), mask=mask)
    tl.store(g_ptrs + 9 * group_stride, (grad_mean2 * x1 * (1.0 - coeff2 * coeff2)).to(out_dtype), mask=mask)


def _launch_args(logits: torch.Tensor, x: torch.Tensor, num_bits: int, *outputs: torch.Tensor) -> tuple:
    """Grid, the scalar arguments after the pointers, and the constexprs, shared by both launches."""
    batch, channels, height, width = logits.shape
    num_mix = channels // 10
    block_p, m_pad = tile_shape(num_mix, height * width)
    strides = [pixel_strides(t) for t in (logits, x, *outputs)]
    half, log_bins = bin_constants(num_bits)
    args = [height * width, width, *(v for s in strides for v in s[:4]), 1.0 / (3 * height * width)]
    meta = {
        "NUM_MIX": num_mix,
        "M_PAD": m_pad,
        "BLOCK_P": block_p,
        "HALF": half,
        "LOG_BINS": log_bins,
        "MERGED_HW": all(s[4] for s in strides),
        "num_warps": NUM_WARPS,
    }
    return (triton.cdiv(height * width, block_p), batch), args, meta


def dmol_nll_forward(logits: torch.Tensor, x: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Per-image NLL in nats per dimension, float32 (B,)."""
    batch = logits.shape[0]
    if logits.numel() == 0:  # no pixels: 0 / 0 as in the reference
        return torch.full((batch,), float("nan"), dtype=torch.float32, device=logits.device)
    grid, args, meta = _launch_args(logits, x, num_bits)
    partials = torch.empty((batch, grid[0]), dtype=torch.float32, device=logits.device)
    torch.library.wrap_triton(_dmol_nll_forward_kernel)[grid](logits, x, partials, *args, **meta)
    return partials.view(batch) if grid[0] == 1 else partials.sum(dim=1)


def dmol_nll_backward(grad_nll: torch.Tensor, logits: torch.Tensor, x: torch.Tensor, num_bits: int) -> torch.Tensor:
    """grad_logits (logits' dtype and strides) of sum(grad_nll * nll)."""
    grad_logits = torch.empty_like(logits)
    if logits.numel() == 0:
        return grad_logits
    grid, args, meta = _launch_args(logits, x, num_bits, grad_logits)
    torch.library.wrap_triton(_dmol_nll_backward_kernel)[grid](grad_nll, logits, x, grad_logits, *args, **meta)
    return grad_logits
