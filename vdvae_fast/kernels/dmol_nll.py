"""Discretized mixture of logistics NLL (VDVAE / PixelCNN++): forward and fused backward, one pixel per lane.

A program owns BLOCK_P pixels of one image; each lane walks its pixel's M mixtures in a loop (M is a
constexpr: no padding, no reduction across lanes), keeping a running log-sum-exp. Lanes sit across pixels,
so every channel load is coalesced (contiguous: consecutive addresses, vectorized; channels_last: one pixel
stride apart, each element read exactly once). Channel strides are constexprs, so a channel's offset is an
immediate of its load or store. The backward recomputes from logits and x (nothing per mixture is saved) in
one pass over the mixtures: each mixture's responsibility needs the pixel's log-likelihood, known only after
the last mixture, so that pass writes each mixture's unscaled gradients and joint log-probability into
grad_logits and a short second loop re-reads them (the same thread's writes) to scale them. Half-precision
gradients cannot hold unscaled values exactly: there a first loop sums the joints and a second recomputes
each mixture to write its final gradients. logits, x and grad_logits are addressed through their own
strides, never copied. Per-image sums are one partial per program, summed by torch in a fixed order:
deterministic, no atomics.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

from ..reference import bin_constants
from .dmol_math import (
    LN2,
    LOG2E,
    NUM_WARPS,
    block_pixels,
    channel_bin,
    fast_log2,
    load_channel,
    pixel_offsets,
    pixel_strides,
    scale_constexprs,
    shift,
    store_channel,
    tanh_parts,
)


@triton.jit
def _pixel_block(
    logits_ptr, x_ptr, HW, W, l_sb, l_sh, l_sw, x_sb, x_sc, x_sh, x_sw, BLOCK_P: tl.constexpr, MERGED_HW: tl.constexpr
):
    """This program's pixels (of image program_id(1)), their logits' rows (see load_channel), and their x rows."""
    b = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    x_rows = x_ptr + b * x_sb + pixel_offsets(pixels, W, x_sh, x_sw, MERGED_HW)
    l_rows = logits_ptr + b * l_sb + pixel_offsets(pixels, W, l_sh, l_sw, MERGED_HW)
    return pixels, l_rows, x_rows


@triton.jit
def _targets(x_rows, x_sc, mask):
    """The three colour targets as float32."""
    return load_channel(x_rows, 0, x_sc, mask), load_channel(x_rows, 1, x_sc, mask), load_channel(x_rows, 2, x_sc, mask)


@triton.jit
def _mixture(
    l_rows,
    l_sc,
    mask,
    k,
    x0,
    x1,
    x2,
    NUM_MIX: tl.constexpr,
    HALF: tl.constexpr,
    LOG_BINS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BETA: tl.constexpr,
    LOG_BETA: tl.constexpr,
    LOG_SCALE_MIN: tl.constexpr,
    COMPILED: tl.constexpr,
):
    """Mixture k of each pixel: its logit in bits, its log2-probability split as exponent + log2(product), and
    what its gradients need (the compiler keeps only what the caller uses). SOFTPLUS, BETA, LOG_BETA and
    LOG_SCALE_MIN make the log-scales (dmol_math.log_scale).

    Channel order: [0, M) mixture logits; colour c's block starts at M + 3Mc: M means, M raw log-scales,
    M raw coefficients.
    """
    l_rows = shift(l_rows, k, l_sc)
    pi = load_channel(l_rows, 0, l_sc, mask)
    raw_c0 = load_channel(l_rows, 3 * NUM_MIX, l_sc, mask)
    raw_c1 = load_channel(l_rows, 6 * NUM_MIX, l_sc, mask)
    raw_c2 = load_channel(l_rows, 9 * NUM_MIX, l_sc, mask)
    coeff0, dcoeff0 = tanh_parts(raw_c0, COMPILED)
    coeff1, dcoeff1 = tanh_parts(raw_c1, COMPILED)
    coeff2, dcoeff2 = tanh_parts(raw_c2, COMPILED)
    raw_ls0 = load_channel(l_rows, 2 * NUM_MIX, l_sc, mask)
    raw_ls1 = load_channel(l_rows, 5 * NUM_MIX, l_sc, mask)
    raw_ls2 = load_channel(l_rows, 8 * NUM_MIX, l_sc, mask)
    off0, arg0, d_mean0, d_ls0, below0 = channel_bin(
        x0,
        load_channel(l_rows, NUM_MIX, l_sc, mask),
        raw_ls0,
        x0 < -0.999,
        x0 > 0.999,
        HALF,
        LOG_BINS,
        SOFTPLUS,
        BETA,
        LOG_BETA,
        LOG_SCALE_MIN,
        COMPILED,
    )
    off1, arg1, d_mean1, d_ls1, below1 = channel_bin(
        x1,
        load_channel(l_rows, 4 * NUM_MIX, l_sc, mask) + coeff0 * x0,
        raw_ls1,
        x1 < -0.999,
        x1 > 0.999,
        HALF,
        LOG_BINS,
        SOFTPLUS,
        BETA,
        LOG_BETA,
        LOG_SCALE_MIN,
        COMPILED,
    )
    off2, arg2, d_mean2, d_ls2, below2 = channel_bin(
        x2,
        load_channel(l_rows, 7 * NUM_MIX, l_sc, mask) + coeff1 * x0 + coeff2 * x1,
        raw_ls2,
        x2 < -0.999,
        x2 > 0.999,
        HALF,
        LOG_BINS,
        SOFTPLUS,
        BETA,
        LOG_BETA,
        LOG_SCALE_MIN,
        COMPILED,
    )
    pi2 = pi * LOG2E
    # log2 P(pixel, k) + log2 softmax weight numerator = exponent + log2(product)
    exponent = pi2 + off0 + off1 + off2
    product = arg0 * arg1 * arg2
    clamped = (below0, below1, below2)  # log-scales below the floor
    return (
        pi2,
        exponent,
        product,
        (d_mean0, d_mean1, d_mean2),
        (d_ls0, d_ls1, d_ls2),
        clamped,
        (dcoeff0, dcoeff1, dcoeff2),
    )


@triton.jit
def _accumulate(running_max, running_sum, value, weight):
    """One step of a log2-sum-exp2 of value + log2(weight), with one exp2: (max, sum of weight * 2**(v - max)).

    Equal values (also two -inf) add without a difference, which would be NaN for -inf; NaN propagates."""
    diff = tl.where(value == running_max, 0.0, -tl.abs(value - running_max))
    scale = tl.exp2(diff)
    larger = value > running_max
    running_sum = tl.where(larger, running_sum * scale + weight, running_sum + weight * scale)
    return tl.where(larger, value, running_max), running_sum


@triton.jit
def _empty_sum(like):
    """The (max, sum) of a log2-sum-exp2 over nothing, shaped as `like`: (-inf, 0); the first _accumulate
    then gives (value, weight)."""
    return tl.full(like.shape, float("-inf"), tl.float32), tl.zeros(like.shape, tl.float32)


@triton.jit
def _log_likelihoods(
    l_rows,
    l_sc,
    mask,
    x0,
    x1,
    x2,
    NUM_MIX: tl.constexpr,
    HALF: tl.constexpr,
    LOG_BINS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BETA: tl.constexpr,
    LOG_BETA: tl.constexpr,
    LOG_SCALE_MIN: tl.constexpr,
    COMPILED: tl.constexpr,
):
    """Per pixel, in bits, log2-sum-exp2 of the mixture logits and of the joint log-probabilities, each as
    (max, sum of 2**(value - max)): kept apart, so that a large logit does not round away the sum's bits.
    """
    pi_max, pi_sum = _empty_sum(x0)
    joint_max, joint_sum = _empty_sum(x0)
    for k in range(NUM_MIX):
        pi2, exponent, product, _, _, _, _ = _mixture(
            l_rows,
            l_sc,
            mask,
            k,
            x0,
            x1,
            x2,
            NUM_MIX,
            HALF,
            LOG_BINS,
            SOFTPLUS,
            BETA,
            LOG_BETA,
            LOG_SCALE_MIN,
            COMPILED,
        )
        pi_max, pi_sum = _accumulate(pi_max, pi_sum, pi2, 1.0)
        joint_max, joint_sum = _accumulate(joint_max, joint_sum, exponent, product)
    return pi_max, pi_sum, joint_max, joint_sum


@triton.jit
def _dmol_nll_forward_kernel(
    logits_ptr,
    x_ptr,
    partial_ptr,
    HW,
    W,
    l_sb,
    l_sh,
    l_sw,
    x_sb,
    x_sh,
    x_sw,
    inv_count,
    L_SC: tl.constexpr,
    X_SC: tl.constexpr,
    NUM_MIX: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HALF: tl.constexpr,
    LOG_BINS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BETA: tl.constexpr,
    LOG_BETA: tl.constexpr,
    LOG_SCALE_MIN: tl.constexpr,
    MERGED_HW: tl.constexpr,
    WHOLE_BLOCKS: tl.constexpr,
    COMPILED: tl.constexpr,
):
    pixels, l_rows, x_rows = _pixel_block(
        logits_ptr, x_ptr, HW, W, l_sb, l_sh, l_sw, x_sb, X_SC, x_sh, x_sw, BLOCK_P, MERGED_HW
    )
    # whole blocks need no mask: a masked load or store costs a branch or a zeroing move
    if WHOLE_BLOCKS:
        mask = None
    else:
        mask = pixels < HW
    x0, x1, x2 = _targets(x_rows, X_SC, mask)
    pi_max, pi_sum, joint_max, joint_sum = _log_likelihoods(
        l_rows, L_SC, mask, x0, x1, x2, NUM_MIX, HALF, LOG_BINS, SOFTPLUS, BETA, LOG_BETA, LOG_SCALE_MIN, COMPILED
    )
    # -logsumexp_k(log_prob_k + log_softmax(pi)_k) = logsumexp(pi) - logsumexp(log_prob + pi), with one log
    nll = ((pi_max - joint_max) + fast_log2(pi_sum / joint_sum, COMPILED)) * LN2
    if WHOLE_BLOCKS:
        partial = tl.sum(nll, axis=0) * inv_count
    else:
        partial = tl.sum(tl.where(mask, nll, 0.0), axis=0) * inv_count
    tl.store(partial_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), partial)


@triton.jit
def _store_mixture(g_rows, g_sc, k, mask, first, scale, d_mean, d_ls, clamped, dcoeff, x0, x1, NUM_MIX: tl.constexpr):
    """Mixture k's ten gradient channels: `first` into its logit's channel, and scale times its nine
    d log P(x | k) / d parameter (log-scales below their floor zeroed after the product, so that a NaN scale
    still gives 0 there)."""
    d_mean0, d_mean1, d_mean2 = d_mean
    d_ls0, d_ls1, d_ls2 = d_ls
    clamped0, clamped1, clamped2 = clamped
    dcoeff0, dcoeff1, dcoeff2 = dcoeff
    grad_mean1 = scale * d_mean1
    grad_mean2 = scale * d_mean2
    g_rows_k = shift(g_rows, k, g_sc)
    store_channel(g_rows_k, 0, g_sc, first, mask)
    store_channel(g_rows_k, NUM_MIX, g_sc, scale * d_mean0, mask)
    store_channel(g_rows_k, 2 * NUM_MIX, g_sc, tl.where(clamped0, 0.0, scale * d_ls0), mask)
    store_channel(g_rows_k, 3 * NUM_MIX, g_sc, grad_mean1 * x0 * dcoeff0, mask)
    store_channel(g_rows_k, 4 * NUM_MIX, g_sc, grad_mean1, mask)
    store_channel(g_rows_k, 5 * NUM_MIX, g_sc, tl.where(clamped1, 0.0, scale * d_ls1), mask)
    store_channel(g_rows_k, 6 * NUM_MIX, g_sc, grad_mean2 * x0 * dcoeff1, mask)
    store_channel(g_rows_k, 7 * NUM_MIX, g_sc, grad_mean2, mask)
    store_channel(g_rows_k, 8 * NUM_MIX, g_sc, tl.where(clamped2, 0.0, scale * d_ls2), mask)
    store_channel(g_rows_k, 9 * NUM_MIX, g_sc, grad_mean2 * x1 * dcoeff2, mask)


@triton.jit
def _dmol_nll_backward_kernel(
    grad_nll_ptr,
    logits_ptr,
    x_ptr,
    grad_ptr,
    HW,
    W,
    l_sb,
    l_sh,
    l_sw,
    x_sb,
    x_sh,
    x_sw,
    g_sb,
    g_sh,
    g_sw,
    inv_count,
    L_SC: tl.constexpr,
    X_SC: tl.constexpr,
    G_SC: tl.constexpr,
    NUM_MIX: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HALF: tl.constexpr,
    LOG_BINS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BETA: tl.constexpr,
    LOG_BETA: tl.constexpr,
    LOG_SCALE_MIN: tl.constexpr,
    MERGED_HW: tl.constexpr,
    WHOLE_BLOCKS: tl.constexpr,
    ONE_PASS: tl.constexpr,
    COMPILED: tl.constexpr,
):
    """ONE_PASS (float32 gradients): a single pass over the mixtures writes each one's derivatives times -g and,
    in its logit's channel, its joint log2-probability, while summing the joints; a second loop re-reads
    these rows (written by the same thread) and scales them by the responsibilities. Half-precision gradients
    cannot hold the unscaled values exactly: a first loop sums the joints, a second computes and writes the
    final gradients."""
    pixels, l_rows, x_rows = _pixel_block(
        logits_ptr, x_ptr, HW, W, l_sb, l_sh, l_sw, x_sb, X_SC, x_sh, x_sw, BLOCK_P, MERGED_HW
    )
    # whole blocks need no mask: a masked load or store costs a branch or a zeroing move
    if WHOLE_BLOCKS:
        mask = None
    else:
        mask = pixels < HW
    x0, x1, x2 = _targets(x_rows, X_SC, mask)
    g = tl.load(grad_nll_ptr + tl.program_id(1)).to(tl.float32) * inv_count
    b = tl.program_id(1).to(tl.int64)
    g_rows = grad_ptr + b * g_sb + pixel_offsets(pixels, W, g_sh, g_sw, MERGED_HW)
    if ONE_PASS:
        pi_max, pi_sum = _empty_sum(x0)
        joint_max, joint_sum = _empty_sum(x0)
        for k in range(NUM_MIX):
            pi2, exponent, product, d_mean, d_ls, clamped, dcoeff = _mixture(
                l_rows,
                L_SC,
                mask,
                k,
                x0,
                x1,
                x2,
                NUM_MIX,
                HALF,
                LOG_BINS,
                SOFTPLUS,
                BETA,
                LOG_BETA,
                LOG_SCALE_MIN,
                COMPILED,
            )
            joint = exponent + fast_log2(product, COMPILED)
            pi_max, pi_sum = _accumulate(pi_max, pi_sum, pi2, 1.0)
            joint_max, joint_sum = _accumulate(joint_max, joint_sum, joint, 1.0)
            _store_mixture(g_rows, G_SC, k, mask, joint, -g, d_mean, d_ls, clamped, dcoeff, x0, x1, NUM_MIX)
        inv_pi_sum = 1.0 / pi_sum
        inv_joint_sum = 1.0 / joint_sum
        for k in range(NUM_MIX):
            g_rows_k = shift(g_rows, k, G_SC)
            # softmax over k of the joint log-probabilities
            responsibility = tl.exp2(load_channel(g_rows_k, 0, G_SC, mask) - joint_max) * inv_joint_sum
            pi2 = load_channel(shift(l_rows, k, L_SC), 0, L_SC, mask) * LOG2E
            store_channel(g_rows_k, 0, G_SC, g * (tl.exp2(pi2 - pi_max) * inv_pi_sum - responsibility), mask)
            for c in tl.static_range(1, 10):
                unscaled = load_channel(g_rows_k, c * NUM_MIX, G_SC, mask)
                scaled = unscaled * responsibility
                if c % 3 == 2:  # a log-scale below its floor keeps its 0 whatever the responsibility
                    scaled = tl.where(unscaled == 0.0, 0.0, scaled)
                store_channel(g_rows_k, c * NUM_MIX, G_SC, scaled, mask)
    else:
        pi_max, pi_sum, joint_max, joint_sum = _log_likelihoods(
            l_rows, L_SC, mask, x0, x1, x2, NUM_MIX, HALF, LOG_BINS, SOFTPLUS, BETA, LOG_BETA, LOG_SCALE_MIN, COMPILED
        )
        inv_pi_sum = 1.0 / pi_sum
        inv_joint_sum = 1.0 / joint_sum
        for k in range(NUM_MIX):
            pi2, exponent, product, d_mean, d_ls, clamped, dcoeff = _mixture(
                l_rows,
                L_SC,
                mask,
                k,
                x0,
                x1,
                x2,
                NUM_MIX,
                HALF,
                LOG_BINS,
                SOFTPLUS,
                BETA,
                LOG_BETA,
                LOG_SCALE_MIN,
                COMPILED,
            )
            responsibility = tl.exp2(exponent - joint_max) * product * inv_joint_sum
            grad_pi = g * (tl.exp2(pi2 - pi_max) * inv_pi_sum - responsibility)
            _store_mixture(
                g_rows, G_SC, k, mask, grad_pi, -g * responsibility, d_mean, d_ls, clamped, dcoeff, x0, x1, NUM_MIX
            )


def _launch_args(
    logits: torch.Tensor, x: torch.Tensor, options: tuple[int, int, float, float], *outputs: torch.Tensor
) -> tuple:
    """Grid, the scalar arguments after the pointers, and the constexprs, shared by both launches; options are
    the entry points' (num_bits, scale, beta, log_scale_min)."""
    num_bits, scale, beta, log_scale_min = options
    batch, channels, height, width = logits.shape
    block_p = block_pixels(height * width)
    strides = [pixel_strides(t) for t in (logits, x, *outputs)]
    half, log_bins = bin_constants(num_bits)
    args = [height * width, width, *(v for s in strides for v in (s[0], s[2], s[3])), 1.0 / (3 * height * width)]
    # channel strides are constexprs: each channel's offset folds into its load's or store's address immediate
    channel_strides = {name: s[1] for name, s in zip(("L_SC", "X_SC", "G_SC")[: len(strides)], strides, strict=True)}
    meta = {
        **channel_strides,
        "NUM_MIX": channels // 10,
        "BLOCK_P": block_p,
        "HALF": half,
        "LOG_BINS": log_bins,
        **scale_constexprs(scale, beta, log_scale_min),
        "MERGED_HW": all(s[4] for s in strides),
        "WHOLE_BLOCKS": height * width % block_p == 0,
        "COMPILED": isinstance(_dmol_nll_forward_kernel, JITFunction),
        "num_warps": NUM_WARPS,
    }
    return (triton.cdiv(height * width, block_p), batch), args, meta


def dmol_nll_forward(
    logits: torch.Tensor, x: torch.Tensor, num_bits: int, scale: int, beta: float, log_scale_min: float
) -> torch.Tensor:
    """Per-image NLL in nats per dimension, float32 (B,); scale indexes reference.SCALES."""
    batch = logits.shape[0]
    if logits.numel() == 0:  # no pixels: 0 / 0 as in the reference
        return torch.full((batch,), float("nan"), dtype=torch.float32, device=logits.device)
    grid, args, meta = _launch_args(logits, x, (num_bits, scale, beta, log_scale_min))
    partials = torch.empty((batch, grid[0]), dtype=torch.float32, device=logits.device)
    wrap_triton(_dmol_nll_forward_kernel)[grid](logits, x, partials, *args, **meta)
    return partials.view(batch) if grid[0] == 1 else partials.sum(dim=1)


def dmol_nll_backward(
    grad_nll: torch.Tensor,
    logits: torch.Tensor,
    x: torch.Tensor,
    num_bits: int,
    scale: int,
    beta: float,
    log_scale_min: float,
) -> torch.Tensor:
    """grad_logits (logits' dtype and strides) of sum(grad_nll * nll)."""
    grad_logits = torch.empty_like(logits)
    if logits.numel() == 0:
        return grad_logits
    grid, args, meta = _launch_args(logits, x, (num_bits, scale, beta, log_scale_min), grad_logits)
    meta["ONE_PASS"] = grad_logits.dtype == torch.float32
    wrap_triton(_dmol_nll_backward_kernel)[grid](grad_nll, logits, x, grad_logits, *args, **meta)
    return grad_logits
