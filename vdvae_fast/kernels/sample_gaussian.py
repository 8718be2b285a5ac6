"""z = mu + t * exp(logsigma) * eps with eps regenerated from (seed, logical index), never stored."""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .gaussian_math import BLOCK, NUM_WARPS, block_offsets, layout_args, needs_int64
from .philox import logical_index, normal, philox_key


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
    CHANNELS_LAST: tl.constexpr,
    BLOCK: tl.constexpr,
    INT64: tl.constexpr,
):
    offsets, mask = block_offsets(numel, BLOCK, INT64)
    k0, k1 = philox_key(seed)
    eps = normal(k0, k1, logical_index(offsets, C, H, W, CHANNELS_LAST).to(tl.uint32))
    mu = tl.load(mu_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    logsigma = tl.load(logsigma_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    z = mu + temperature * tl.exp(logsigma) * eps
    tl.store(z_ptr + offsets, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _sample_gaussian_backward_kernel(
    grad_z_ptr,
    logsigma_ptr,
    grad_mu_ptr,
    grad_logsigma_ptr,
    temperature,
    seed,
    numel,
    C,
    H,
    W,
    CHANNELS_LAST: tl.constexpr,
    BLOCK: tl.constexpr,
    INT64: tl.constexpr,
):
    offsets, mask = block_offsets(numel, BLOCK, INT64)
    k0, k1 = philox_key(seed)
    eps = normal(k0, k1, logical_index(offsets, C, H, W, CHANNELS_LAST).to(tl.uint32))
    grad_z = tl.load(grad_z_ptr + offsets, mask=mask, other=0.0)
    logsigma = tl.load(logsigma_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad_logsigma = grad_z.to(tl.float32) * eps * temperature * tl.exp(logsigma)
    tl.store(grad_mu_ptr + offsets, grad_z, mask=mask)
    tl.store(grad_logsigma_ptr + offsets, grad_logsigma.to(grad_logsigma_ptr.dtype.element_ty), mask=mask)


def sample_gaussian_forward(mu: torch.Tensor, logsigma: torch.Tensor, temperature: float, seed: int) -> torch.Tensor:
    """z in mu's dtype and layout."""
    z = torch.empty_like(mu)
    numel = mu.numel()
    channels, height, width, channels_last = layout_args(mu)
    wrap_triton(_sample_gaussian_forward_kernel)[(triton.cdiv(numel, BLOCK),)](
        mu,
        logsigma,
        z,
        float(temperature),
        seed,
        numel,
        channels,
        height,
        width,
        CHANNELS_LAST=channels_last,
        BLOCK=BLOCK,
        INT64=needs_int64(numel),
        num_warps=NUM_WARPS,
    )
    return z


def sample_gaussian_backward(
    grad_z: torch.Tensor, mu: torch.Tensor, logsigma: torch.Tensor, temperature: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_mu, grad_logsigma): grad_mu is grad_z itself (copied), grad_logsigma = grad_z * t * sigma * eps."""
    grad_mu = torch.empty_like(mu)
    grad_logsigma = torch.empty_like(logsigma)
    numel = mu.numel()
    channels, height, width, channels_last = layout_args(mu)
    wrap_triton(_sample_gaussian_backward_kernel)[(triton.cdiv(numel, BLOCK),)](
        grad_z,
        logsigma,
        grad_mu,
        grad_logsigma,
        float(temperature),
        seed,
        numel,
        channels,
        height,
        width,
        CHANNELS_LAST=channels_last,
        BLOCK=BLOCK,
        INT64=needs_int64(numel),
        num_warps=NUM_WARPS,
    )
    return grad_mu, grad_logsigma
