"""Math and launch helpers shared by the Gaussian kernels (gaussian_kl, sample_gaussian, sample_and_kl).

The parametrizations of reference.posterior_and_prior are compile-time codes (indices into reference.SCALES,
POSTERIORS, KL_ESTIMATORS), so each combination is its own specialization and VDVAE's default (exp, direct,
analytic) compiles to the arithmetic it always had. The chain rule is written once, in three steps: the
canonical Gaussians (mu_q, gap = mu_q - mu_p, sigma_q, log sigma_q, sigma_p, log sigma_p) from the four inputs
(posterior_and_prior), a KL's derivatives in (gap, log sigma_q, log sigma_p) (gaussian_kl here, the sampled
estimate in sample_and_kl.py), and the vector-Jacobian product back to the inputs (input_vjp).
"""

import math

import torch
import triton
import triton.language as tl

from .. import reference

# Elements per program of the elementwise Gaussian kernels: 8 per thread at 4 warps, two 16-byte fp32 loads.
BLOCK = 1024
NUM_WARPS = 4

SOFTPLUS = tl.constexpr(reference.SCALES.index("softplus"))
RESIDUAL = tl.constexpr(reference.POSTERIORS.index("residual"))
PRECISION_WEIGHTED = tl.constexpr(reference.POSTERIORS.index("precision_weighted"))
SAMPLED = tl.constexpr(reference.KL_ESTIMATORS.index("sampled"))
LOG_LINEAR_BELOW = tl.constexpr(reference.SOFTPLUS_LOG_LINEAR_BELOW)
SOFTPLUS_LINEAR_ABOVE = tl.constexpr(20.0)  # torch's F.softplus threshold: softplus(t) = t above it


@triton.jit
def gaussian_kl(gap, logsigma_q, logsigma_p):
    """KL(q||p) of diagonal Gaussians whose means differ by gap = mu_q - mu_p, and its derivatives in (gap,
    logsigma_q, logsigma_p).

    reference.gaussian_kl's formula, with exp(2 logsigma) for exp(logsigma)^2 and a product by 1 / var_p.
    """
    var_q = tl.exp(2.0 * logsigma_q)
    inv_var_p = tl.exp(-2.0 * logsigma_p)
    ratio = (var_q + gap * gap) * inv_var_p
    kl = -0.5 + logsigma_p - logsigma_q + 0.5 * ratio
    return kl, gap * inv_var_p, var_q * inv_var_p - 1.0, 1.0 - ratio


@triton.jit
def fast_div(a, b):
    """a / b within 2 ulp (div.full.f32): an IEEE division's exact-rounding path costs tens of instructions."""
    return tl.fdiv(a, b, ieee_rounding=False)


@triton.jit
def _softplus(raw, beta):
    """(t, softplus(t), sigmoid(t)) of t = beta * raw; softplus as torch's (t itself above 20), its log1p exact
    to a few ulp where 1 + exp(-|t|) rounds (Goldberg's correction), so tiny scales keep their value."""
    t = beta * raw
    x = tl.exp(-tl.abs(t))
    u = 1.0 + x
    log1p_x = tl.where(u == 1.0, x, tl.log(u) * fast_div(x, u - 1.0))
    softplus = tl.where(t > SOFTPLUS_LINEAR_ABOVE, t, tl.maximum(t, 0.0) + log1p_x)
    sigmoid = fast_div(tl.where(t >= 0.0, 1.0, x), u)
    return t, softplus, sigmoid


@triton.jit
def scale_and_log(raw, beta, log_beta, SCALE: tl.constexpr):
    """(sigma, log sigma) of a raw network output (reference.scale_and_log): exp, or softplus_beta with
    log sigma linear in t = beta * raw below LOG_LINEAR_BELOW (finite for any finite raw)."""
    if SCALE == SOFTPLUS:
        t, softplus, _ = _softplus(raw, beta)
        sigma = fast_div(softplus, beta)
        log_sigma = tl.where(t < LOG_LINEAR_BELOW, t, tl.log(softplus)) - log_beta
    else:
        sigma = tl.exp(raw)
        log_sigma = raw
    return sigma, log_sigma


@triton.jit
def scale_slope(raw, beta, SCALE: tl.constexpr):
    """d sigma / d raw: exp(raw), or sigmoid(beta * raw) for softplus."""
    if SCALE == SOFTPLUS:
        _, _, slope = _softplus(raw, beta)
    else:
        slope = tl.exp(raw)
    return slope


@triton.jit
def _log_scale_vjp(grad_log_sigma, raw, beta, SCALE: tl.constexpr):
    """Gradient in raw from one in log sigma: d log sigma / d raw is 1 (exp), or beta * sigmoid(t) / softplus(t)
    (softplus; beta where log sigma is linear in t)."""
    if SCALE == SOFTPLUS:
        t, softplus, sigmoid = _softplus(raw, beta)
        grad = grad_log_sigma * tl.where(t < LOG_LINEAR_BELOW, beta, fast_div(beta * sigmoid, softplus))
    else:
        grad = grad_log_sigma
    return grad


@triton.jit
def _precision_weights(log_sigma_b, log_sigma_p):
    """(var_p, var_b) / (var_b + var_p): the weights of the bottom-up mean and of the prior mean in the
    precision-weighted mean, from the log scales (no variance is formed, so none over- or underflows)."""
    diff = log_sigma_b - log_sigma_p
    e = tl.exp(-2.0 * tl.abs(diff))
    larger = fast_div(1.0, 1.0 + e)
    smaller = e * larger
    b_wider = diff >= 0.0
    return tl.where(b_wider, smaller, larger), tl.where(b_wider, larger, smaller)


@triton.jit
def posterior_and_prior(a, b, mu_p, raw_p, beta, log_beta, SCALE: tl.constexpr, POSTERIOR: tl.constexpr):
    """(mu_q, gap, sigma_q, log sigma_q, sigma_p, log sigma_p) from the ops' inputs, gap = mu_q - mu_p computed
    without the cancellation of subtracting the two (reference.posterior_and_prior; mu_p is an input). (a, b)
    is (mu_q, raw sigma_q) for direct, (delta mu, raw delta sigma) for residual, the bottom-up (mu, raw sigma)
    for precision_weighted."""
    sigma_p, log_sigma_p = scale_and_log(raw_p, beta, log_beta, SCALE)
    sigma_b, log_sigma_b = scale_and_log(b, beta, log_beta, SCALE)
    if POSTERIOR == RESIDUAL:
        gap = a
        mu_q = mu_p + a
        sigma_q = sigma_p * sigma_b
        log_sigma_q = log_sigma_p + log_sigma_b
    elif POSTERIOR == PRECISION_WEIGHTED:
        weight_a, _ = _precision_weights(log_sigma_b, log_sigma_p)
        gap = (a - mu_p) * weight_a
        mu_q = mu_p + gap
        # log sigma_b + log sigma_p - log(var_b + var_p) / 2, factored around the smaller scale
        smaller = tl.where(log_sigma_b < log_sigma_p, log_sigma_b, log_sigma_p)
        log_sigma_q = smaller - 0.5 * tl.log(1.0 + tl.exp(-2.0 * tl.abs(log_sigma_b - log_sigma_p)))
        sigma_q = tl.exp(log_sigma_q)
    else:
        gap = a - mu_p
        mu_q = a
        sigma_q = sigma_b
        log_sigma_q = log_sigma_b
    return mu_q, gap, sigma_q, log_sigma_q, sigma_p, log_sigma_p


@triton.jit
def _plus_sample(kl_part, sample_part):
    """A gradient's KL part, plus the sample's part where there is one (None: gaussian_kl draws no sample)."""
    if sample_part is None:
        total = kl_part
    else:
        total = sample_part + kl_part
    return total


@triton.jit
def input_vjp(
    grad_gap,
    grad_log_sigma_q,
    grad_log_sigma_p,
    sample_grad_mu_q,
    sample_grad_log_sigma_q,
    a,
    b,
    mu_p,
    raw_p,
    beta,
    log_beta,
    SCALE: tl.constexpr,
    POSTERIOR: tl.constexpr,
):
    """Gradients in the inputs (a, b, mu_p, raw_p) from a KL's in (gap, log sigma_q, log sigma_p) and the sample's
    in (mu_q, log sigma_q) (None for no sample): the transpose of posterior_and_prior's Jacobian.

    Residual: the KL is a function of gap / sigma_p and sigma_q / sigma_p (both estimators are), so moving log
    sigma_p and log sigma_q together changes it by -gap * d/dgap: that exact form replaces the sum of the two
    derivatives, which cancel to float32 noise when sigma_q / sigma_p is large.
    """
    if POSTERIOR == RESIDUAL:
        grad_a = _plus_sample(grad_gap, sample_grad_mu_q)
        grad_log_sigma_b = _plus_sample(grad_log_sigma_q, sample_grad_log_sigma_q)
        grad_mu_p = _plus_sample(grad_gap * 0.0, sample_grad_mu_q)  # the KL does not depend on mu_p
        grad_log_sigma_p = _plus_sample(-(a * grad_gap), sample_grad_log_sigma_q)
    elif POSTERIOR == PRECISION_WEIGHTED:
        _, log_sigma_p = scale_and_log(raw_p, beta, log_beta, SCALE)
        _, log_sigma_b = scale_and_log(b, beta, log_beta, SCALE)
        weight_a, weight_p = _precision_weights(log_sigma_b, log_sigma_p)
        gap = (a - mu_p) * weight_a
        # mu_q = mu_p + gap, gap = (a - mu_p) * weight_a, d weight_a / d log sigma_p = -d / d log sigma_b =
        # 2 weight_a weight_p; log sigma_q = log sigma_b + log sigma_p - log(var_b + var_p) / 2 moves with log
        # sigma_b by weight_a, with log sigma_p by weight_p.
        grad_mu_q = _plus_sample(grad_gap, sample_grad_mu_q)
        grad_log_sigma_q = _plus_sample(grad_log_sigma_q, sample_grad_log_sigma_q)
        shift = 2.0 * gap * weight_p * grad_mu_q
        grad_a = grad_mu_q * weight_a
        grad_mu_p = -(grad_gap * weight_a)
        if sample_grad_mu_q is not None:
            grad_mu_p = sample_grad_mu_q * weight_p + grad_mu_p
        grad_log_sigma_b = grad_log_sigma_q * weight_a - shift
        grad_log_sigma_p = grad_log_sigma_p + grad_log_sigma_q * weight_p + shift
    else:
        grad_a = _plus_sample(grad_gap, sample_grad_mu_q)
        grad_log_sigma_b = _plus_sample(grad_log_sigma_q, sample_grad_log_sigma_q)
        grad_mu_p = -grad_gap
    grad_b = _log_scale_vjp(grad_log_sigma_b, b, beta, SCALE)
    grad_raw_p = _log_scale_vjp(grad_log_sigma_p, raw_p, beta, SCALE)
    return grad_a, grad_b, grad_mu_p, grad_raw_p


def softplus_betas(scale: int, beta: float, posterior: int = 0, kl_estimator: int = 0) -> tuple[float, float]:
    """(beta, log beta) for the kernels, after checking the parametrization codes (a code outside its tuple of
    reference would otherwise run another parametrization silently) and beta."""
    for name, code, names in (
        ("scale", scale, reference.SCALES),
        ("posterior", posterior, reference.POSTERIORS),
        ("kl_estimator", kl_estimator, reference.KL_ESTIMATORS),
    ):
        if code not in range(len(names)):
            raise ValueError(f"{name} code must be an index into {names} (0 to {len(names) - 1}), got {code!r}")
    if not (math.isfinite(beta) and beta > 0.0):
        raise ValueError(f"beta (the softplus sharpness) must be finite and > 0, got {beta!r}")
    return float(beta), math.log(beta)


@triton.jit
def block_offsets(numel, BLOCK: tl.constexpr, INT64: tl.constexpr):
    """Memory offsets of this program's elements, their mask and the first offset; int64 only for tensors past
    int32."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    block_start = pid * BLOCK
    offsets = block_start + tl.arange(0, BLOCK)
    return offsets, offsets < numel, block_start


def layout_args(t: torch.Tensor) -> tuple[int, int, int, bool]:
    """(C, H, W, channels_last) for the logical-index computation; contiguous tensors need no sizes."""
    if t.is_contiguous():
        return 1, 1, 1, False
    _, channels, height, width = t.shape
    return channels, height, width, True


def needs_int64(numel: int) -> bool:
    """Offsets past int32 need 64-bit index math (slower divisions), so it is used only when required."""
    return numel >= 2**31 - BLOCK
