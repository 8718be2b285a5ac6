"""The `original` backend: openai/vdvae's eager formulas with torch's own sampler, the benchmarks' baseline.

Its deterministic ops must equal the reference exactly; its noise must have the right law (closed-form
moments of the normal and the logistic, softmax mixture frequencies) and follow torch.manual_seed.
"""

from __future__ import annotations

import math

import pytest
import torch

from vdvae_fast import ops, reference

GEN = torch.Generator().manual_seed(0)


def _gaussians(shape=(4, 8, 16, 16), scale=0.5) -> list[torch.Tensor]:
    return [(torch.randn(shape, generator=GEN) * scale).requires_grad_(True) for _ in range(4)]


def test_deterministic_ops_and_their_gradients_equal_the_reference() -> None:
    params = _gaussians()
    got = ops.gaussian_kl(*params, backend="original")
    want = ops.gaussian_kl(*params, backend="reference")
    assert torch.equal(got, want)
    logits = torch.randn(2, 30, 5, 5, generator=GEN, requires_grad=True)
    x = torch.rand(2, 3, 5, 5, generator=GEN) * 2 - 1
    nll = ops.dmol_nll(logits, x, backend="original")
    (grad,) = torch.autograd.grad(nll.sum(), logits)
    ref_nll = ops.dmol_nll(logits, x, backend="reference")
    (ref_grad,) = torch.autograd.grad(ref_nll.sum(), logits)
    assert torch.equal(nll, ref_nll)
    assert torch.equal(grad, ref_grad)


def test_sample_and_kl_draws_standard_normal_noise_with_the_reference_kl() -> None:
    mu_q, logsigma_q, mu_p, logsigma_p = _gaussians(shape=(8, 16, 32, 32))
    z, kl = ops.sample_and_kl(mu_q, logsigma_q, mu_p, logsigma_p, backend="original")
    _, ref_kl = ops.sample_and_kl(mu_q, logsigma_q, mu_p, logsigma_p, seed=1, backend="reference")
    torch.testing.assert_close(kl, ref_kl, rtol=0, atol=0)
    eps = ((z - mu_q) / logsigma_q.exp()).detach().double()
    n = eps.numel()
    # Sample moments of N(0, 1): mean ± 5/sqrt(n), variance ± 5·sqrt(2/n), fourth moment 3 ± 5·sqrt(96/n).
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    assert abs(eps.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs(eps.pow(4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    grads = torch.autograd.grad(z.sum() + kl.sum(), [mu_q, logsigma_q])
    ref_kl_grads = torch.autograd.grad(ref_kl.sum(), [mu_q, logsigma_q])
    torch.testing.assert_close(grads[0], 1 + ref_kl_grads[0])  # ∂z/∂μ = 1
    torch.testing.assert_close(grads[1], (z - mu_q).detach() + ref_kl_grads[1])  # ∂z/∂logσ = σε


def test_sample_gaussian_scales_the_noise_by_the_temperature() -> None:
    mu, logsigma = _gaussians(shape=(4, 16, 32, 32))[:2]
    z = ops.sample_gaussian(mu, logsigma, temperature=0.3, backend="original")
    eps = ((z - mu) / logsigma.exp()).detach().double()
    assert abs(eps.std().item() - 0.3) < 0.3 * 5 / math.sqrt(2 * eps.numel())


def test_noise_follows_torch_manual_seed_and_rejects_an_explicit_seed() -> None:
    mu, logsigma = (t.detach() for t in _gaussians(shape=(2, 3, 4, 4))[:2])
    logits = torch.randn(2, 20, 4, 4, generator=GEN)
    torch.manual_seed(3)
    first = ops.sample_gaussian(mu, logsigma, backend="original"), ops.dmol_sample(logits, backend="original")
    torch.manual_seed(3)
    again = ops.sample_gaussian(mu, logsigma, backend="original"), ops.dmol_sample(logits, backend="original")
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    with pytest.raises(ValueError, match="original backend .* takes no seed"):
        ops.sample_and_kl(mu, logsigma, mu, logsigma, seed=1, backend="original")
    with pytest.raises(ValueError, match="takes no seed"):
        ops.dmol_sample(logits, seed=1, backend="original")


def test_dmol_sample_picks_mixtures_by_softmax_and_draws_logistics() -> None:
    """Two components far apart in the red channel: the share of draws near each is its softmax weight, and
    each component's draws have the logistic's mean and variance s²π²/3 (no clamping at these parameters)."""
    batch, side, num_mix = 4, 64, 2
    logits = torch.zeros(batch, 10 * num_mix, side, side)
    logits[:, 0], logits[:, 1] = 0.0, math.log(3.0)  # weights 1/4 and 3/4
    # Per colour c, channels M + 3Mc onwards hold M means, M log-scales, M coupling coefficients.
    logits[:, num_mix + 0], logits[:, num_mix + 1] = -0.5, 0.5  # red means; green and blue stay at 0
    log_scale = math.log(0.02)
    for colour in range(3):
        start = num_mix + 3 * num_mix * colour + num_mix
        logits[:, start : start + num_mix] = log_scale
    torch.manual_seed(0)
    red = ops.dmol_sample(logits, backend="original")[:, 0].double().flatten()
    n = red.numel()
    share = (red > 0).double().mean().item()
    assert abs(share - 0.75) < 5 * math.sqrt(0.75 * 0.25 / n)
    variance = math.exp(2 * log_scale) * math.pi**2 / 3
    for mean, part in ((-0.5, red[red < 0]), (0.5, red[red > 0])):
        assert abs(part.mean().item() - mean) < 5 * math.sqrt(variance / part.numel())
        assert abs(part.var().item() / variance - 1) < 5 * math.sqrt(3.2 / part.numel())  # logistic kurtosis 4.2


def test_original_noise_comes_from_torch_not_philox() -> None:
    mu, logsigma = torch.zeros(1, 64), torch.zeros(1, 64)
    torch.manual_seed(5)
    z = ops.sample_gaussian(mu, logsigma, backend="original")
    torch.manual_seed(5)
    assert torch.equal(z, torch.randn(1, 64))
    assert not torch.equal(z, reference.sample_gaussian(mu, logsigma, seed=0))
