"""Elementwise KL(q||p) of diagonal Gaussians: one fused forward and one fused backward kernel.

All tensors share shape and strides and are dense (contiguous or channels_last), so the kernels walk
memory offsets directly; no logical index is needed because nothing here is random.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .gaussian_math import BLOCK, NUM_WARPS, block_offsets, gaussian_kl, needs_int64


@triton.jit
def _gaussian_kl_forward_kernel(
    mu_q_ptr, logsigma_q_ptr, mu_p_ptr, logsigma_p_ptr, kl_ptr, numel, BLOCK: tl.constexpr, INT64: tl.constexpr
):
    offsets, mask = block_offsets(numel, BLOCK, INT64)
    mu_q = tl.load(mu_q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    logsigma_q = tl.load(logsigma_q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mu_p = tl.load(mu_p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    logsigma_p = tl.load(logsigma_p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    kl, _, _, _ = gaussian_kl(mu_q, logsigma_q, mu_p, logsigma_p)
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
    BLOCK: tl.constexpr,
    INT64: tl.constexpr,
):
    offsets, mask = block_offsets(numel, BLOCK, INT64)
    grad = tl.load(grad_kl_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mu_q = tl.load(mu_q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    logsigma_q = tl.load(logsigma_q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mu_p = tl.load(mu_p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    logsigma_p = tl.load(logsigma_p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    _, d_mu_q, d_logsigma_q, d_logsigma_p = gaussian_kl(mu_q, logsigma_q, mu_p, logsigma_p)
    out_dtype = grad_mu_q_ptr.dtype.element_ty
    tl.store(grad_mu_q_ptr + offsets, (grad * d_mu_q).to(out_dtype), mask=mask)
    tl.store(grad_logsigma_q_ptr + offsets, (grad * d_logsigma_q).to(out_dtype), mask=mask)
    tl.store(grad_mu_p_ptr + offsets, (-(grad * d_mu_q)).to(out_dtype), mask=mask)
    tl.store(grad_logsigma_p_ptr + offsets, (grad * d_logsigma_p).to(out_dtype), mask=mask)


def gaussian_kl_forward(
    mu_q: torch.Tensor, logsigma_q: torch.Tensor, mu_p: torch.Tensor, logsigma_p: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL, float32, in mu_q's layout."""
    kl = torch.empty_like(mu_q, dtype=torch.float32)
    numel = mu_q.numel()
    wrap_triton(_gaussian_kl_forward_kernel)[(triton.cdiv(numel, BLOCK),)](
        mu_q, logsigma_q, mu_p, logsigma_p, kl, numel, BLOCK=BLOCK, INT64=needs_int64(numel), num_warps=NUM_WARPS
    )
    return kl


def gaussian_kl_backward(
    grad_kl: torch.Tensor, mu_q: torch.Tensor, logsigma_q: torch.Tensor, mu_p: torch.Tensor, logsigma_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum(grad_kl * kl) in the four parameters, each in the parameters' dtype and layout."""
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
        BLOCK=BLOCK,
        INT64=needs_int64(numel),
        num_warps=NUM_WARPS,
    )
    return grads
