"""The eager oracle: VDVAE's released formulas in plain PyTorch, one function per op of vdvae_fast.ops.

Every fused kernel is tested against these functions. They follow openai/vdvae's
`discretized_mix_logistic_loss`, `sample_from_discretized_mix_logistic`,
`gaussian_analytical_kl` and `draw_gaussian_diag_samples` (PixelCNN++'s DMoL), with two
deliberate differences: tensors are NCHW as the model's output conv produces them, and
randomness comes from the counter-based generator of vdvae_fast.philox so that every
backend draws the same numbers for the same seed.

The deterministic ops (dmol_nll, gaussian_kl) take no backend. The random ones take backend="reference"
(Philox) or backend="original": the noise from torch's own generator, as openai/vdvae draws it, which is
the baseline that benchmarks measure against, since eager Philox costs far more than torch's sampler.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import philox

LOG_SCALE_MIN = -7.0
# How a raw network output becomes a standard deviation: VDVAE's exp, or Efficient-VDVAE's gradient smoothing,
# sigma = softplus_beta(raw) = log(1 + exp(beta * raw)) / beta, whose gradient stays bounded for large raw values.
SCALES = ("exp", "softplus")
SOFTPLUS_BETA = math.log(2.0)  # softplus_beta(0) = 1, as exp(0)
# How the posterior's two outputs combine with the prior: VDVAE's direct (mu_q, sigma_q); NVAE's residual normal
# (mu_q = mu_p + delta_mu, sigma_q = sigma_p * delta_sigma); the Ladder VAE's precision weighting of the bottom-up
# Gaussian with the prior (its eq. 21).
POSTERIORS = ("direct", "residual", "precision_weighted")
# What sample_and_kl returns per image: the analytic KL(q||p), or log q(z) - log p(z) at the drawn z (the
# single-sample estimate that importance weighting needs).
KL_ESTIMATORS = ("analytic", "sampled")
# Below this beta * raw, log softplus(t) = t within e^t/2 <= 1.1e-9: the stable branch of log sigma.
SOFTPLUS_LOG_LINEAR_BELOW = -20.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the math: float64 stays float64 (for gradcheck), everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bin_constants(num_bits: int) -> tuple[float, float]:
    """(half the width of one bin, log of half the number of bins) of targets scaled to [-1, 1]:
    (1/255, log 127.5) for 8 bits, (1/31, log 15.5) for 5 bits. The interior-bin fallback density
    divides by the bin width, i.e. subtracts the second number."""
    levels = 2**num_bits - 1
    return 1.0 / levels, math.log(levels / 2)


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether a 4-D tensor is laid out channels_last and not also contiguous, the one test of layout that
    every backend uses (a tensor that is both, as with C = 1 or H = W = 1, counts as contiguous)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """torch.channels_last for a channels_last tensor (see is_channels_last), else torch.contiguous_format."""
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def _split_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 10M, H, W) logits -> mixture logits (B,H,W,M) and means, raw log-scales, raw coeffs (B,H,W,3,M)."""
    batch, channels, height, width = logits.shape
    num_mix = channels // 10
    nhwc = logits.permute(0, 2, 3, 1)
    mixture_logits = nhwc[..., :num_mix]
    params = nhwc[..., num_mix:].reshape(batch, height, width, 3, 3 * num_mix)
    return (
        mixture_logits,
        params[..., :num_mix],
        params[..., num_mix : 2 * num_mix],
        params[..., 2 * num_mix :],
    )


def dmol_log_scales(
    raw: torch.Tensor, *, scale: str = "exp", beta: float = SOFTPLUS_BETA, log_scale_min: float = LOG_SCALE_MIN
) -> torch.Tensor:
    """The DMoL log-scales from the raw log-scale channels, floored at log_scale_min (-inf: no floor).

    scale="exp" is VDVAE's: the raw channel is the log-scale, max(raw, log_scale_min). scale="softplus" is
    Efficient-VDVAE's gradient smoothing: the scale is softplus_beta(raw) = log(1 + exp(beta raw)) / beta, whose
    gradient in raw stays below 1 where exp's grows with the scale. Efficient-VDVAE floors the scale itself,
    max(softplus_beta(raw), exp(log_scale_min)); the same floor is applied here in the log domain,
    max(log softplus_beta(raw), log_scale_min), so that a floor as low as its -250 (exp(-250) underflows in
    float32) and no floor at all stay exact: log softplus(t) is t itself for t < -20, computed without the
    underflowing softplus. torch.maximum's gradient: 1 above the floor, 1/2 on it, 0 below; NaN propagates.
    """
    log_scales = raw if scale == "exp" else log_softplus_beta(raw, beta)
    return torch.maximum(log_scales, torch.full_like(log_scales, log_scale_min))


def dmol_nll(
    logits: torch.Tensor,
    x: torch.Tensor,
    *,
    num_bits: int = 8,
    scale: str = "exp",
    beta: float = SOFTPLUS_BETA,
    log_scale_min: float = LOG_SCALE_MIN,
) -> torch.Tensor:
    """−log p(x) under the discretized mixture of logistics, nats per dimension, one value per image.

    scale, beta and log_scale_min turn the raw log-scale channels into log-scales (dmol_log_scales)."""
    logits = logits.to(compute_dtype(logits.dtype))
    mixture_logits, means, raw_log_scales, raw_coeffs = _split_logits(logits)
    xs = x.to(logits.dtype).permute(0, 2, 3, 1).unsqueeze(-1)  # (B, H, W, 3, 1)
    log_scales = dmol_log_scales(raw_log_scales, scale=scale, beta=beta, log_scale_min=log_scale_min)
    coeffs = torch.tanh(raw_coeffs)
    m1 = means[:, :, :, 1, :] + coeffs[:, :, :, 0, :] * xs[:, :, :, 0, :]
    m2 = means[:, :, :, 2, :] + coeffs[:, :, :, 1, :] * xs[:, :, :, 0, :] + coeffs[:, :, :, 2, :] * xs[:, :, :, 1, :]
    means = torch.stack([means[:, :, :, 0, :], m1, m2], dim=3)
    centered = xs - means
    inv_stdv = torch.exp(-log_scales)
    half, log_bins = bin_constants(num_bits)
    plus_in = inv_stdv * (centered + half)
    min_in = inv_stdv * (centered - half)
    cdf_plus = torch.sigmoid(plus_in)
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # left edge: log σ(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)  # right edge
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    log_probs = torch.where(
        xs < -0.999,
        log_cdf_plus,
        torch.where(
            xs > 0.999,
            log_one_minus_cdf_min,
            torch.where(
                cdf_delta > 1e-5,
                torch.log(torch.maximum(cdf_delta, torch.full_like(cdf_delta, 1e-12))),
                log_pdf_mid - log_bins,
            ),
        ),
    )
    log_probs = log_probs.sum(dim=3) + torch.log_softmax(mixture_logits, dim=-1)
    per_pixel = torch.logsumexp(log_probs, dim=-1)
    return -per_pixel.sum(dim=(1, 2)) / (x.shape[1] * x.shape[2] * x.shape[3])


def dmol_sample(
    logits: torch.Tensor,
    *,
    scale: str = "exp",
    beta: float = SOFTPLUS_BETA,
    log_scale_min: float = LOG_SCALE_MIN,
    seed: int | torch.Tensor | None = None,
    backend: str = "reference",
) -> torch.Tensor:
    """A (B, 3, H, W) float32 image in [−1, 1], in logits' memory format: Gumbel-max mixture pick, logistic
    draw with the chosen mixture's log-scale (dmol_log_scales), RGB coupling, clamp."""
    memory_format = memory_format_of(logits)
    logits = logits.float()
    mixture_logits, means, raw_log_scales, raw_coeffs = _split_logits(logits)
    num_mix = mixture_logits.shape[-1]
    uniforms = _open_uniforms(seed, mixture_logits.shape[:3], num_mix + 3, logits.device, backend)
    gumbel_u, u = uniforms[..., :num_mix], uniforms[..., num_mix:]
    choice = torch.argmax(mixture_logits - torch.log(-torch.log(gumbel_u)), dim=-1)
    select = F.one_hot(choice, num_classes=num_mix).to(logits.dtype).unsqueeze(3)  # (B, H, W, 1, M)
    mean = (means * select).sum(-1)
    log_scale = dmol_log_scales((raw_log_scales * select).sum(-1), scale=scale, beta=beta, log_scale_min=log_scale_min)
    coeff = (torch.tanh(raw_coeffs) * select).sum(-1)
    draw = mean + torch.exp(log_scale) * (torch.log(u) - torch.log(1.0 - u))
    x0 = draw[..., 0].clamp(-1.0, 1.0)
    x1 = (draw[..., 1] + coeff[..., 0] * x0).clamp(-1.0, 1.0)
    x2 = (draw[..., 2] + coeff[..., 1] * x0 + coeff[..., 2] * x1).clamp(-1.0, 1.0)
    return torch.stack([x0, x1, x2], dim=1).contiguous(memory_format=memory_format)


def scale_and_log(
    raw: torch.Tensor, scale: str = "exp", beta: float = SOFTPLUS_BETA
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, log sigma) of a raw network output under `scale` (see SCALES). log softplus is taken linearly
    below SOFTPLUS_LOG_LINEAR_BELOW so that a very negative raw value gives a finite log sigma."""
    if scale == "exp":
        return raw.exp(), raw
    return F.softplus(beta * raw) / beta, log_softplus_beta(raw, beta)


def log_softplus_beta(raw: torch.Tensor, beta: float) -> torch.Tensor:
    """log softplus_beta(raw) = log(log(1 + exp(beta raw)) / beta), finite for any finite raw: t = beta raw
    itself below SOFTPLUS_LOG_LINEAR_BELOW, where softplus(t) = exp(t) within a relative e^t/2 but underflows."""
    t = beta * raw
    linear = t < SOFTPLUS_LOG_LINEAR_BELOW
    # the untaken branch must not see t far below the threshold: log(0) would give a NaN gradient
    curved = torch.log(F.softplus(torch.where(linear, torch.zeros_like(t), t)))
    return torch.where(linear, t, curved) - math.log(beta)


def posterior_and_prior(
    a: torch.Tensor,
    b: torch.Tensor,
    mu_p: torch.Tensor,
    raw_p: torch.Tensor,
    *,
    scale: str = "exp",
    beta: float = SOFTPLUS_BETA,
    posterior: str = "direct",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu_q, sigma_q, log sigma_q, mu_p, sigma_p, log sigma_p) in the compute dtype from the ops' four inputs.

    (a, b) is the posterior network's output: (mu_q, raw sigma_q) for "direct", (delta_mu, raw delta_sigma) for
    "residual", the bottom-up (mu, raw sigma) for "precision_weighted"."""
    dtype = compute_dtype(a.dtype)
    a, b, mu_p, raw_p = (t.to(dtype) for t in (a, b, mu_p, raw_p))
    sigma_p, log_sigma_p = scale_and_log(raw_p, scale, beta)
    sigma_b, log_sigma_b = scale_and_log(b, scale, beta)
    if posterior == "direct":
        return a, sigma_b, log_sigma_b, mu_p, sigma_p, log_sigma_p
    if posterior == "residual":
        return mu_p + a, sigma_p * sigma_b, log_sigma_p + log_sigma_b, mu_p, sigma_p, log_sigma_p
    # precision weighting: 1/sigma_q^2 = 1/sigma_b^2 + 1/sigma_p^2, mu_q the precision-weighted mean
    var_b, var_p = sigma_b**2, sigma_p**2
    total = var_b + var_p
    mu_q = (a * var_p + mu_p * var_b) / total
    log_sigma_q = log_sigma_b + log_sigma_p - 0.5 * total.log()
    return mu_q, log_sigma_q.exp(), log_sigma_q, mu_p, sigma_p, log_sigma_p


def gaussian_kl(
    mu_q: torch.Tensor,
    logsigma_q: torch.Tensor,
    mu_p: torch.Tensor,
    logsigma_p: torch.Tensor,
    *,
    scale: str = "exp",
    beta: float = SOFTPLUS_BETA,
    posterior: str = "direct",
) -> torch.Tensor:
    """KL(q‖p) between diagonal Gaussians, elementwise, float32 (float64 for float64 inputs). With the defaults the
    inputs are (mu_q, log sigma_q, mu_p, log sigma_p); see posterior_and_prior for the other parametrizations."""
    mu_q, sigma_q, log_sigma_q, mu_p, sigma_p, log_sigma_p = posterior_and_prior(
        mu_q, logsigma_q, mu_p, logsigma_p, scale=scale, beta=beta, posterior=posterior
    )
    return -0.5 + log_sigma_p - log_sigma_q + 0.5 * (sigma_q**2 + (mu_q - mu_p) ** 2) / sigma_p**2


def _noise(like: torch.Tensor, seed: int | torch.Tensor | None, backend: str, dtype: torch.dtype) -> torch.Tensor:
    """Standard normals of like's shape: Philox (reference) or torch's generator (original)."""
    if _torch_noise(backend):
        return torch.randn(like.shape, device=like.device, dtype=dtype)
    return philox.normal(_seed_or_draw(seed), like.shape, like.device).to(dtype)


def sample_gaussian(
    mu: torch.Tensor,
    logsigma: torch.Tensor,
    *,
    temperature: float = 1.0,
    scale: str = "exp",
    beta: float = SOFTPLUS_BETA,
    seed: int | torch.Tensor | None = None,
    backend: str = "reference",
) -> torch.Tensor:
    """z = μ + t·σ·ε in the input dtype, σ = exp(logσ) (or softplus_β), ε from the shared counter-based generator."""
    dtype = compute_dtype(mu.dtype)
    eps = _noise(mu, seed, backend, dtype)
    sigma, _ = scale_and_log(logsigma.to(dtype), scale, beta)
    z = mu.to(dtype) + temperature * sigma * eps
    return z.to(mu.dtype)


def sample_and_kl(
    mu_q: torch.Tensor,
    logsigma_q: torch.Tensor,
    mu_p: torch.Tensor,
    logsigma_p: torch.Tensor,
    *,
    scale: str = "exp",
    beta: float = SOFTPLUS_BETA,
    posterior: str = "direct",
    kl_estimator: str = "analytic",
    seed: int | torch.Tensor | None = None,
    backend: str = "reference",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior sample z = μq + σq·ε (input dtype) and, summed over all but the batch dimension (float32,
    shape (B,)), KL(q‖p) ("analytic") or log q(z) − log p(z) at that z ("sampled")."""
    dtype = mu_q.dtype
    mu_q, sigma_q, log_sigma_q, mu_p, sigma_p, log_sigma_p = posterior_and_prior(
        mu_q, logsigma_q, mu_p, logsigma_p, scale=scale, beta=beta, posterior=posterior
    )
    eps = _noise(mu_q, seed, backend, mu_q.dtype)
    z = mu_q + sigma_q * eps
    if kl_estimator == "analytic":
        kl = -0.5 + log_sigma_p - log_sigma_q + 0.5 * (sigma_q**2 + (mu_q - mu_p) ** 2) / sigma_p**2
    else:
        kl = log_sigma_p - log_sigma_q + 0.5 * ((z - mu_p) / sigma_p) ** 2 - 0.5 * eps**2
    return z.to(dtype), kl.reshape(kl.shape[0], math.prod(kl.shape[1:])).sum(1)  # B = 0: no -1


def _torch_noise(backend: str) -> bool:
    """Whether the noise comes from torch's generator (original) rather than Philox (reference)."""
    if backend not in ("reference", "original"):
        raise ValueError(f"the eager ops draw noise for backend 'reference' or 'original', got {backend!r}")
    return backend == "original"


def _seed_or_draw(seed: int | torch.Tensor | None) -> int | torch.Tensor:
    return philox.draw_seed() if seed is None else seed


def _open_uniforms(
    seed: int | torch.Tensor | None, pixels: torch.Size, streams: int, device: torch.device, backend: str
) -> torch.Tensor:
    """Uniforms in [1e-5, 1 − 1e-5] of shape (*pixels, streams): stream j is word j % 4 of Philox counter
    (pixel, j // 4), or torch's."""
    if _torch_noise(backend):
        return torch.empty((*pixels, streams), device=device).uniform_(1.0e-5, 1.0 - 1.0e-5)
    seed = _seed_or_draw(seed)
    pixel = torch.arange(pixels.numel(), device=device).reshape(pixels)
    return philox.open_uniforms(seed, pixel, streams)
