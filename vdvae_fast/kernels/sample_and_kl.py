"""One stochastic layer in one kernel each way: z = mu_q + sigma_q * eps and the per-image KL(q||p) sum.

The inputs are read under the parametrization the codes name (gaussian_math.posterior_and_prior); the KL is
the analytic one or, with kl_estimator "sampled", log q(z) - log p(z) at the drawn z.

Programs are laid out (block, image): the batch index is outermost in memory for contiguous and
channels_last tensors alike, so an image is one contiguous range and each program's KL partial
belongs to a single image. Partials are summed by torch in a fixed order (deterministic, no atomics);
when an image fits one block the kernel's partial already is the result.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..reference import SOFTPLUS_BETA
from .gaussian_math import (
    BLOCK,
    NUM_WARPS,
    SAMPLED,
    fast_div,
    gaussian_kl,
    input_vjp,
    layout_args,
    posterior_and_prior,
    softplus_betas,
)
from .philox import block_normals, channels_last_groups, philox_key


@triton.jit
def _kl_and_derivatives(gap, eps, sigma_q, log_sigma_q, sigma_p, log_sigma_p, KL_ESTIMATOR: tl.constexpr):
    """The estimator's per-element KL and its derivatives in (gap = mu_q - mu_p, log sigma_q, log sigma_p) with
    eps held fixed. Sampled: log q(z) - log p(z) at z = mu_q + sigma_q * eps (the constants cancel), whose
    z - mu_p = gap + sigma_q * eps moves with log sigma_q by sigma_q * eps."""
    if KL_ESTIMATOR == SAMPLED:
        inv_sigma_p = fast_div(1.0, sigma_p)
        u = (gap + sigma_q * eps) * inv_sigma_p
        kl = log_sigma_p - log_sigma_q + 0.5 * u * u - 0.5 * eps * eps
        d_gap = u * inv_sigma_p
        d_log_sigma_q = d_gap * sigma_q * eps - 1.0
        d_log_sigma_p = 1.0 - u * u
    else:
        kl, d_gap, d_log_sigma_q, d_log_sigma_p = gaussian_kl(gap, log_sigma_q, log_sigma_p)
    return kl, d_gap, d_log_sigma_q, d_log_sigma_p


@triton.jit
def _z_and_kl(
    mu_q_ptr, logsigma_q_ptr, mu_p_ptr, logsigma_p_ptr, z_ptr, offsets, mask, eps, beta, log_beta,
    SCALE: tl.constexpr, POSTERIOR: tl.constexpr, KL_ESTIMATOR: tl.constexpr,
):  # fmt: skip
    """Store z at these offsets (from the image's first); return their KL, 0 where masked."""
    a = tl.load(mu_q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(logsigma_q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mu_p = tl.load(mu_p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    raw_p = tl.load(logsigma_p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mu_q, gap, sigma_q, log_sigma_q, sigma_p, log_sigma_p = posterior_and_prior(
        a, b, mu_p, raw_p, beta, log_beta, SCALE, POSTERIOR
    )
    z = mu_q + sigma_q * eps
    tl.store(z_ptr + offsets, z.to(z_ptr.dtype.element_ty), mask=mask)
    kl, _, _, _ = _kl_and_derivatives(gap, eps, sigma_q, log_sigma_q, sigma_p, log_sigma_p, KL_ESTIMATOR)
    return tl.where(mask, kl, 0.0)


@triton.jit
def _input_gradients(
    grad_z_ptr, mu_q_ptr, logsigma_q_ptr, mu_p_ptr, logsigma_p_ptr, grad_mu_q_ptr, grad_logsigma_q_ptr,
    grad_mu_p_ptr, grad_logsigma_p_ptr, grad_kl, offsets, mask, eps, beta, log_beta,
    SCALE: tl.constexpr, POSTERIOR: tl.constexpr, KL_ESTIMATOR: tl.constexpr,
):  # fmt: skip
    """Store the four inputs' gradients at these offsets (from the image's first)."""
    grad_z = tl.load(grad_z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(mu_q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(logsigma_q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mu_p = tl.load(mu_p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    raw_p = tl.load(logsigma_p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    _, gap, sigma_q, log_sigma_q, sigma_p, log_sigma_p = posterior_and_prior(
        a, b, mu_p, raw_p, beta, log_beta, SCALE, POSTERIOR
    )
    _, d_gap, d_log_sigma_q, d_log_sigma_p = _kl_and_derivatives(
        gap, eps, sigma_q, log_sigma_q, sigma_p, log_sigma_p, KL_ESTIMATOR
    )
    grad_a, grad_b, grad_mu_p, grad_raw_p = input_vjp(
        grad_kl * d_gap,
        grad_kl * d_log_sigma_q,
        grad_kl * d_log_sigma_p,
        grad_z,
        grad_z * eps * sigma_q,
        a, b, mu_p, raw_p, beta, log_beta, SCALE, POSTERIOR,
    )  # fmt: skip
    out_dtype = grad_mu_q_ptr.dtype.element_ty
    tl.store(grad_mu_q_ptr + offsets, grad_a.to(out_dtype), mask=mask)
    tl.store(grad_logsigma_q_ptr + offsets, grad_b.to(out_dtype), mask=mask)
    tl.store(grad_mu_p_ptr + offsets, grad_mu_p.to(out_dtype), mask=mask)
    tl.store(grad_logsigma_p_ptr + offsets, grad_raw_p.to(out_dtype), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _sample_and_kl_forward_kernel(
    mu_q_ptr,
    logsigma_q_ptr,
    mu_p_ptr,
    logsigma_p_ptr,
    z_ptr,
    partial_ptr,
    seed,
    per_image,
    C,
    H,
    W,
    beta,
    log_beta,
    SCALE: tl.constexpr,
    POSTERIOR: tl.constexpr,
    KL_ESTIMATOR: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    image_base = tl.program_id(1).to(tl.int64) * per_image
    block_start = tl.program_id(0) * BLOCK
    k0, k1 = philox_key(seed)
    # the image's tensors: offsets below are counted from its first element
    pointers = (mu_q_ptr + image_base, logsigma_q_ptr + image_base, mu_p_ptr + image_base,
                logsigma_p_ptr + image_base, z_ptr + image_base)  # fmt: skip
    codes = (SCALE, POSTERIOR, KL_ESTIMATOR)
    if CHANNELS_LAST and GROUPED:  # one Philox call per four w-neighbours, loaded and stored one lane at a time
        first, eps0, eps1, eps2, eps3 = channels_last_groups(
            k0, k1, image_base, block_start, C, H, W, BLOCK // 4, False
        )
        inside = first < per_image
        kl = _z_and_kl(*pointers, first, inside, eps0, beta, log_beta, *codes)
        kl += _z_and_kl(*pointers, first + C, inside, eps1, beta, log_beta, *codes)
        kl += _z_and_kl(*pointers, first + 2 * C, inside, eps2, beta, log_beta, *codes)
        kl += _z_and_kl(*pointers, first + 3 * C, inside, eps3, beta, log_beta, *codes)
    else:
        offsets = block_start + tl.arange(0, BLOCK)
        eps = block_normals(k0, k1, image_base, block_start, C, H, W, CHANNELS_LAST, GROUPED, BLOCK)
        kl = _z_and_kl(*pointers, offsets, offsets < per_image, eps, beta, log_beta, *codes)
    tl.store(partial_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), tl.sum(kl, axis=0))


@triton.jit(do_not_specialize=["seed"])
def _sample_and_kl_backward_kernel(
    grad_z_ptr,
    grad_kl_ptr,
    mu_q_ptr,
    logsigma_q_ptr,
    mu_p_ptr,
    logsigma_p_ptr,
    grad_mu_q_ptr,
    grad_logsigma_q_ptr,
    grad_mu_p_ptr,
    grad_logsigma_p_ptr,
    seed,
    per_image,
    C,
    H,
    W,
    beta,
    log_beta,
    SCALE: tl.constexpr,
    POSTERIOR: tl.constexpr,
    KL_ESTIMATOR: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    image_base = tl.program_id(1).to(tl.int64) * per_image
    block_start = tl.program_id(0) * BLOCK
    k0, k1 = philox_key(seed)
    grad_kl = tl.load(grad_kl_ptr + tl.program_id(1)).to(tl.float32)
    # the image's tensors: offsets below are counted from its first element
    pointers = (grad_z_ptr + image_base, mu_q_ptr + image_base, logsigma_q_ptr + image_base,
                mu_p_ptr + image_base, logsigma_p_ptr + image_base, grad_mu_q_ptr + image_base,
                grad_logsigma_q_ptr + image_base, grad_mu_p_ptr + image_base,
                grad_logsigma_p_ptr + image_base)  # fmt: skip
    codes = (SCALE, POSTERIOR, KL_ESTIMATOR)
    if CHANNELS_LAST and GROUPED:  # as the forward
        first, eps0, eps1, eps2, eps3 = channels_last_groups(
            k0, k1, image_base, block_start, C, H, W, BLOCK // 4, False
        )
        inside = first < per_image
        _input_gradients(*pointers, grad_kl, first, inside, eps0, beta, log_beta, *codes)
        _input_gradients(*pointers, grad_kl, first + C, inside, eps1, beta, log_beta, *codes)
        _input_gradients(*pointers, grad_kl, first + 2 * C, inside, eps2, beta, log_beta, *codes)
        _input_gradients(*pointers, grad_kl, first + 3 * C, inside, eps3, beta, log_beta, *codes)
    else:
        offsets = block_start + tl.arange(0, BLOCK)
        eps = block_normals(k0, k1, image_base, block_start, C, H, W, CHANNELS_LAST, GROUPED, BLOCK)
        _input_gradients(*pointers, grad_kl, offsets, offsets < per_image, eps, beta, log_beta, *codes)


def _grid(mu_q: torch.Tensor) -> tuple[int, int, int]:
    """(elements per image, block size, programs per image)."""
    per_image = mu_q.numel() // mu_q.shape[0] if mu_q.shape[0] else 0
    block = max(16, min(BLOCK, triton.next_power_of_2(max(per_image, 1))))
    return per_image, block, triton.cdiv(per_image, block)


def _grouped(per_image: int, width: int, channels_last: bool) -> bool:
    """Whether four elements can share a Philox call: each image's groups of four lie in memory order (contiguous
    images of a multiple of 4 elements) or four w-neighbours apart by C (channels_last with W % 4 == 0)."""
    return width % 4 == 0 if channels_last else per_image % 4 == 0


def sample_and_kl_forward(
    mu_q: torch.Tensor,
    logsigma_q: torch.Tensor,
    mu_p: torch.Tensor,
    logsigma_p: torch.Tensor,
    seed: int,
    scale: int = 0,
    beta: float = SOFTPLUS_BETA,
    posterior: int = 0,
    kl_estimator: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z in mu_q's dtype and layout, KL summed over all dims but the first, float32 (B,)). scale, posterior
    and kl_estimator index reference.SCALES, POSTERIORS and KL_ESTIMATORS."""
    beta, log_beta = softplus_betas(scale, beta, posterior, kl_estimator)
    batch = mu_q.shape[0]
    per_image, block, programs = _grid(mu_q)
    z = torch.empty_like(mu_q)
    if programs == 0:
        return z, torch.zeros(batch, dtype=torch.float32, device=mu_q.device)
    partials = torch.empty((batch, programs), dtype=torch.float32, device=mu_q.device)
    channels, height, width, channels_last = layout_args(mu_q)
    wrap_triton(_sample_and_kl_forward_kernel)[(programs, batch)](
        mu_q,
        logsigma_q,
        mu_p,
        logsigma_p,
        z,
        partials,
        seed,
        per_image,
        channels,
        height,
        width,
        beta,
        log_beta,
        SCALE=scale,
        POSTERIOR=posterior,
        KL_ESTIMATOR=kl_estimator,
        CHANNELS_LAST=channels_last,
        GROUPED=_grouped(per_image, width, channels_last),
        BLOCK=block,
        num_warps=NUM_WARPS,
    )
    return z, partials.view(batch) if programs == 1 else partials.sum(dim=1)


def sample_and_kl_backward(
    grad_z: torch.Tensor,
    grad_kl: torch.Tensor,
    mu_q: torch.Tensor,
    logsigma_q: torch.Tensor,
    mu_p: torch.Tensor,
    logsigma_p: torch.Tensor,
    seed: int,
    scale: int = 0,
    beta: float = SOFTPLUS_BETA,
    posterior: int = 0,
    kl_estimator: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients in the four inputs from grad_z (z's dtype/layout) and grad_kl (float32 (B,)), eps held fixed."""
    beta, log_beta = softplus_betas(scale, beta, posterior, kl_estimator)
    batch = mu_q.shape[0]
    per_image, block, programs = _grid(mu_q)
    grads = tuple(torch.empty_like(t) for t in (mu_q, logsigma_q, mu_p, logsigma_p))
    if programs == 0:
        return grads
    channels, height, width, channels_last = layout_args(mu_q)
    wrap_triton(_sample_and_kl_backward_kernel)[(programs, batch)](
        grad_z,
        grad_kl,
        mu_q,
        logsigma_q,
        mu_p,
        logsigma_p,
        *grads,
        seed,
        per_image,
        channels,
        height,
        width,
        beta,
        log_beta,
        SCALE=scale,
        POSTERIOR=posterior,
        KL_ESTIMATOR=kl_estimator,
        CHANNELS_LAST=channels_last,
        GROUPED=_grouped(per_image, width, channels_last),
        BLOCK=block,
        num_warps=NUM_WARPS,
    )
    return grads
