"""Elementwise KL(q||p) of diagonal Gaussians: one fused forward and one fused backward kernel.

All tensors share shape and strides and are dense (contiguous or channels_last), so the kernels walk
memory offsets directly; no logical index is needed because nothing here is random. The inputs are read
under the parametrization the codes name (gaussian_math.posterior_and_prior).
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..reference import SOFTPLUS_BETA
from .gaussian_math import (
    BLOCK,
    NUM_WARPS,
    block_offsets,
    gaussian_kl,
    input_vjp,
    needs_int64,
    posterior_and_prior,
    softplus_betas,
)


@triton.jit
def _gaussian_kl_forward_kernel(
    mu_q_ptr,
    logsigma_q_ptr,
    mu_p_ptr,
    logsigma_p_ptr,
    kl_ptr,
    numel,
    beta,
    log_beta,
    SCALE: tl.constexpr,
    POSTERIOR: tl.constexpr,
    BLOCK: tl.constexpr,
    INT64: tl.constexpr,
):
    offsets, mask, _ = block_offsets(numel, BLOCK, INT64)
    a = tl.load(mu_q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(logsigma_q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mu_p = tl.load(mu_p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    raw_p = tl.load(logsigma_p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    _, gap, _, log_sigma_q, _, log_sigma_p = posterior_and_prior(a, b, mu_p, raw_p, beta, log_beta, SCALE, POSTERIOR)
    kl, _, _, _ = gaussian_kl(gap, log_sigma_q, log_sigma_p)
    tl.store(kl_ptr + offsets, kl, mask=mask)


@triton.jit
def _gaussian_kl_backward_kernel(
    grad_kl_ptr,
    mu_q_ptr,
    logsigma_q_ptr,
    mu_p_ptr,
    logsigma_p_ptr,
    grad_mu_q_ptr,
    grad_logsigma_q_ptr,
    grad_mu_p_ptr,
    grad_logsigma_p_ptr,
    numel,
    beta,
    log_beta,
    SCALE: tl.constexpr,
    POSTERIOR: tl.constexpr,
    BLOCK: tl.constexpr,
    INT64: tl.constexpr,
):
    offsets, mask, _ = block_offsets(numel, BLOCK, INT64)
    grad = tl.load(grad_kl_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(mu_q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(logsigma_q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mu_p = tl.load(mu_p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    raw_p = tl.load(logsigma_p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    _, gap, _, log_sigma_q, _, log_sigma_p = posterior_and_prior(a, b, mu_p, raw_p, beta, log_beta, SCALE, POSTERIOR)
    _, d_gap, d_log_sigma_q, d_log_sigma_p = gaussian_kl(gap, log_sigma_q, log_sigma_p)
    grad_a, grad_b, grad_mu_p, grad_raw_p = input_vjp(
        grad * d_gap, grad * d_log_sigma_q, grad * d_log_sigma_p, None, None,
        a, b, mu_p, raw_p, beta, log_beta, SCALE, POSTERIOR,
    )  # fmt: skip
    out_dtype = grad_mu_q_ptr.dtype.element_ty
    tl.store(grad_mu_q_ptr + offsets, grad_a.to(out_dtype), mask=mask)
    tl.store(grad_logsigma_q_ptr + offsets, grad_b.to(out_dtype), mask=mask)
    tl.store(grad_mu_p_ptr + offsets, grad_mu_p.to(out_dtype), mask=mask)
    tl.store(grad_logsigma_p_ptr + offsets, grad_raw_p.to(out_dtype), mask=mask)


def gaussian_kl_forward(
    mu_q: torch.Tensor,
    logsigma_q: torch.Tensor,
    mu_p: torch.Tensor,
    logsigma_p: torch.Tensor,
    scale: int = 0,
    beta: float = SOFTPLUS_BETA,
    posterior: int = 0,
) -> torch.Tensor:
    """Elementwise KL, float32, in mu_q's layout. scale and posterior index reference.SCALES and POSTERIORS."""
    beta, log_beta = softplus_betas(scale, beta, posterior)
    kl = torch.empty_like(mu_q, dtype=torch.float32)
    numel = mu_q.numel()
    wrap_triton(_gaussian_kl_forward_kernel)[(triton.cdiv(numel, BLOCK),)](
        mu_q,
        logsigma_q,
        mu_p,
        logsigma_p,
        kl,
        numel,
        beta,
        log_beta,
        SCALE=scale,
        POSTERIOR=posterior,
        BLOCK=BLOCK,
        INT64=needs_int64(numel),
        num_warps=NUM_WARPS,
    )
    return kl


def gaussian_kl_backward(
    grad_kl: torch.Tensor,
    mu_q: torch.Tensor,
    logsigma_q: torch.Tensor,
    mu_p: torch.Tensor,
    logsigma_p: torch.Tensor,
    scale: int = 0,
    beta: float = SOFTPLUS_BETA,
    posterior: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum(grad_kl * kl) in the four inputs, each in the inputs' dtype and layout."""
    beta, log_beta = softplus_betas(scale, beta, posterior)
    grads = tuple(torch.empty_like(t) for t in (mu_q, logsigma_q, mu_p, logsigma_p))
    numel = mu_q.numel()
    wrap_triton(_gaussian_kl_backward_kernel)[(triton.cdiv(numel, BLOCK),)](
        grad_kl,
        mu_q,
        logsigma_q,
        mu_p,
        logsigma_p,
        *grads,
        numel,
        beta,
        log_beta,
        SCALE=scale,
        POSTERIOR=posterior,
        BLOCK=BLOCK,
        INT64=needs_int64(numel),
        num_warps=NUM_WARPS,
    )
    return grads
