"""z = mu + t * sigma * eps with eps regenerated from (seed, logical index), never stored; sigma = exp(logsigma)
or softplus_beta(logsigma) as the scale code says (gaussian_math.scale_and_log)."""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..reference import SOFTPLUS_BETA
from .gaussian_math import (
    BLOCK,
    NUM_WARPS,
    block_offsets,
    layout_args,
    needs_int64,
    scale_and_log,
    scale_slope,
    softplus_betas,
)
from .philox import block_normals, channels_last_groups, philox_key


@triton.jit
def _z(mu_ptr, logsigma_ptr, z_ptr, offsets, mask, eps, temperature, beta, log_beta, SCALE: tl.constexpr):
    """Store z = mu + t * sigma * eps at these offsets."""
    mu = tl.load(mu_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    logsigma = tl.load(logsigma_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sigma, _ = scale_and_log(logsigma, beta, log_beta, SCALE)
    z = mu + temperature * sigma * eps
    tl.store(z_ptr + offsets, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_logsigma(
    grad_z_ptr, logsigma_ptr, grad_logsigma_ptr, offsets, mask, eps, temperature, beta, SCALE: tl.constexpr
):
    """Store grad_logsigma = grad_z * t * eps * d sigma / d logsigma at these offsets."""
    grad_z = tl.load(grad_z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    logsigma = tl.load(logsigma_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad_logsigma = grad_z * eps * temperature * scale_slope(logsigma, beta, SCALE)
    tl.store(grad_logsigma_ptr + offsets, grad_logsigma.to(grad_logsigma_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _sample_gaussian_forward_kernel(
    mu_ptr,
    logsigma_ptr,
    z_ptr,
    temperature,
    seed,
    numel,
    C,
    H,
    W,
    beta,
    log_beta,
    SCALE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK: tl.constexpr,
    INT64: tl.constexpr,
):
    offsets, mask, block_start = block_offsets(numel, BLOCK, INT64)
    k0, k1 = philox_key(seed)
    if CHANNELS_LAST and GROUPED:  # one Philox call per four w-neighbours, stored one lane at a time
        first, eps0, eps1, eps2, eps3 = channels_last_groups(k0, k1, 0, block_start, C, H, W, BLOCK // 4, True)
        inside = first < numel
        _z(mu_ptr, logsigma_ptr, z_ptr, first, inside, eps0, temperature, beta, log_beta, SCALE)
        _z(mu_ptr, logsigma_ptr, z_ptr, first + C, inside, eps1, temperature, beta, log_beta, SCALE)
        _z(mu_ptr, logsigma_ptr, z_ptr, first + 2 * C, inside, eps2, temperature, beta, log_beta, SCALE)
        _z(mu_ptr, logsigma_ptr, z_ptr, first + 3 * C, inside, eps3, temperature, beta, log_beta, SCALE)
    else:
        eps = block_normals(k0, k1, 0, block_start, C, H, W, CHANNELS_LAST, GROUPED, BLOCK)
        _z(mu_ptr, logsigma_ptr, z_ptr, offsets, mask, eps, temperature, beta, log_beta, SCALE)


@triton.jit(do_not_specialize=["seed"])
def _sample_gaussian_backward_kernel(
    grad_z_ptr,
    logsigma_ptr,
    grad_logsigma_ptr,
    temperature,
    seed,
    numel,
    C,
    H,
    W,
    beta,
    log_beta,
    SCALE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK: tl.constexpr,
    INT64: tl.constexpr,
):
    offsets, mask, block_start = block_offsets(numel, BLOCK, INT64)
    k0, k1 = philox_key(seed)
    pointers = (grad_z_ptr, logsigma_ptr, grad_logsigma_ptr)
    if CHANNELS_LAST and GROUPED:  # as the forward
        first, eps0, eps1, eps2, eps3 = channels_last_groups(k0, k1, 0, block_start, C, H, W, BLOCK // 4, True)
        inside = first < numel
        _grad_logsigma(*pointers, first, inside, eps0, temperature, beta, SCALE)
        _grad_logsigma(*pointers, first + C, inside, eps1, temperature, beta, SCALE)
        _grad_logsigma(*pointers, first + 2 * C, inside, eps2, temperature, beta, SCALE)
        _grad_logsigma(*pointers, first + 3 * C, inside, eps3, temperature, beta, SCALE)
    else:
        eps = block_normals(k0, k1, 0, block_start, C, H, W, CHANNELS_LAST, GROUPED, BLOCK)
        _grad_logsigma(*pointers, offsets, mask, eps, temperature, beta, SCALE)


def _launch(kernel, tensors: tuple, mu: torch.Tensor, temperature: float, seed: int, scale: int, beta: float) -> None:
    """One program per BLOCK elements of mu's layout; `tensors` are the kernel's leading pointers."""
    beta, log_beta = softplus_betas(scale, beta)
    numel = mu.numel()
    channels, height, width, channels_last = layout_args(mu)
    wrap_triton(kernel)[(triton.cdiv(numel, BLOCK),)](
        *tensors,
        float(temperature),
        seed,
        numel,
        channels,
        height,
        width,
        beta,
        log_beta,
        SCALE=scale,
        CHANNELS_LAST=channels_last,
        GROUPED=not channels_last or width % 4 == 0,
        BLOCK=BLOCK,
        INT64=needs_int64(numel),
        num_warps=NUM_WARPS,
    )


def sample_gaussian_forward(
    mu: torch.Tensor,
    logsigma: torch.Tensor,
    temperature: float,
    seed: int,
    scale: int = 0,
    beta: float = SOFTPLUS_BETA,
) -> torch.Tensor:
    """z in mu's dtype and layout; scale indexes reference.SCALES."""
    z = torch.empty_like(mu)
    _launch(_sample_gaussian_forward_kernel, (mu, logsigma, z), mu, temperature, seed, scale, beta)
    return z


def sample_gaussian_backward(
    grad_z: torch.Tensor,
    mu: torch.Tensor,
    logsigma: torch.Tensor,
    temperature: float,
    seed: int,
    scale: int = 0,
    beta: float = SOFTPLUS_BETA,
) -> torch.Tensor:
    """grad_logsigma = grad_z * t * eps * d sigma / d logsigma; mu's gradient is grad_z itself, which the
    autograd formula passes through (ops._sample_gaussian_grad)."""
    grad_logsigma = torch.empty_like(logsigma)
    _launch(_sample_gaussian_backward_kernel, (grad_z, logsigma, grad_logsigma), mu, temperature, seed, scale, beta)
    return grad_logsigma
