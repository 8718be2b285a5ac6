"""The eager reference against closed forms: it is the oracle of every other test, so it is checked first."""

from __future__ import annotations

import math

import pytest
import torch

from vdvae_fast import philox, reference


def _logistic_cdf(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _single_logistic_logits(mu: list[float], log_s: list[float], coeff_raw: list[float], hw: int = 1) -> torch.Tensor:
    """(1, 10, 1, hw) logits of one mixture component with per-channel mean, log-scale and raw coupling."""
    channels = [0.0]  # the mixture logit
    for c in range(3):
        channels += [mu[c], log_s[c], coeff_raw[c]]
    return torch.tensor(channels, dtype=torch.float64).reshape(1, 10, 1, 1).expand(1, 10, 1, hw).contiguous()


@pytest.mark.parametrize("num_bits", [8, 5])
def test_single_logistic_interior_bin_is_the_exact_cdf_difference(num_bits: int) -> None:
    levels = 2**num_bits - 1
    half = 1.0 / levels
    mu, log_s = [0.1, -0.2, 0.3], [-2.0, -1.5, -3.0]
    pixel = [int(levels * 0.55), int(levels * 0.3), int(levels * 0.62)]
    x = torch.tensor([2.0 * k / levels - 1.0 for k in pixel], dtype=torch.float64).reshape(1, 3, 1, 1)
    nll = reference.dmol_nll(_single_logistic_logits(mu, log_s, [0.0, 0.0, 0.0]), x, num_bits=num_bits)
    expected = 0.0
    for c in range(3):
        s = math.exp(log_s[c])
        xc = float(x[0, c, 0, 0])
        expected -= math.log(_logistic_cdf((xc + half - mu[c]) / s) - _logistic_cdf((xc - half - mu[c]) / s))
    assert nll.item() == pytest.approx(expected / 3, rel=1e-12)


@pytest.mark.parametrize("num_bits", [8, 5])
def test_edge_pixels_take_the_tail_mass(num_bits: int) -> None:
    half = 1.0 / (2**num_bits - 1)
    mu, log_s = [0.9, -0.8, 0.0], [-1.0, -1.2, -0.5]
    x = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    nll = reference.dmol_nll(_single_logistic_logits(mu, log_s, [0.0, 0.0, 0.0]), x, num_bits=num_bits)
    p = [
        1.0 - _logistic_cdf((1.0 - half - mu[0]) / math.exp(log_s[0])),  # pixel 255 (or 31): right tail
        _logistic_cdf((-1.0 + half - mu[1]) / math.exp(log_s[1])),  # pixel 0: left tail
        1.0 - _logistic_cdf((1.0 - half - mu[2]) / math.exp(log_s[2])),
    ]
    assert nll.item() == pytest.approx(-sum(math.log(v) for v in p) / 3, rel=1e-12)


def test_coupling_shifts_the_green_and_blue_means() -> None:
    mu, log_s, raw = [0.0, 0.1, -0.1], [-2.0, -2.0, -2.0], [0.7, -0.4, 1.3]
    x = torch.tensor([0.2, -0.3, 0.5], dtype=torch.float64).reshape(1, 3, 1, 1)
    c = [math.tanh(r) for r in raw]
    means = [mu[0], mu[1] + c[0] * 0.2, mu[2] + c[1] * 0.2 + c[2] * -0.3]
    half = 1.0 / 255
    expected = 0.0
    for ch in range(3):
        s = math.exp(log_s[ch])
        xc = float(x[0, ch, 0, 0])
        expected -= math.log(_logistic_cdf((xc + half - means[ch]) / s) - _logistic_cdf((xc - half - means[ch]) / s))
    nll = reference.dmol_nll(_single_logistic_logits(mu, log_s, raw), x)
    assert nll.item() == pytest.approx(expected / 3, rel=1e-12)


def test_mixture_weights_are_a_softmax_over_joint_rgb_components() -> None:
    torch.manual_seed(0)
    num_mix = 2
    logits = torch.randn(1, 10 * num_mix, 1, 1, dtype=torch.float64)
    xv = [0.1, 0.2, -0.4]
    x = torch.tensor(xv, dtype=torch.float64).reshape(1, 3, 1, 1)

    def param(c: int, which: int, k: int) -> float:  # which: 0 mean, 1 log-scale, 2 raw coupling
        return float(logits[0, num_mix + 3 * num_mix * c + which * num_mix + k, 0, 0])

    weights = torch.softmax(logits[0, :num_mix, 0, 0], 0)
    total = 0.0
    for k in range(num_mix):
        coupling = [math.tanh(param(c, 2, k)) for c in range(3)]
        means = [
            param(0, 0, k),
            param(1, 0, k) + coupling[0] * xv[0],
            param(2, 0, k) + coupling[1] * xv[0] + coupling[2] * xv[1],
        ]
        component = 1.0
        for c in range(3):
            s = math.exp(max(param(c, 1, k), -7.0))
            component *= _logistic_cdf((xv[c] + 1 / 255 - means[c]) / s) - _logistic_cdf(
                (xv[c] - 1 / 255 - means[c]) / s
            )
        total += float(weights[k]) * component
    assert reference.dmol_nll(logits, x).item() == pytest.approx(-math.log(total) / 3, rel=1e-10)


def test_log_scales_are_floored_at_minus_seven() -> None:
    mu, x = [0.0, 0.0, 0.0], torch.zeros(1, 3, 1, 1, dtype=torch.float64)
    at_floor = reference.dmol_nll(_single_logistic_logits(mu, [-7.0] * 3, [0.0] * 3), x)
    far_below = reference.dmol_nll(_single_logistic_logits(mu, [-40.0] * 3, [0.0] * 3), x)
    assert far_below.item() == at_floor.item()


def test_reference_dmol_nll_gradcheck_float64() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 30, 3, 2, dtype=torch.float64, requires_grad=True)
    x = (torch.randint(0, 256, (2, 3, 3, 2)).double() / 127.5 - 1.0).clamp(-1, 1)
    assert torch.autograd.gradcheck(lambda t: reference.dmol_nll(t, x), (logits,))


def test_gaussian_kl_matches_torch_distributions() -> None:
    torch.manual_seed(2)
    mu_q, ls_q, mu_p, ls_p = (torch.randn(4, 5, dtype=torch.float64) for _ in range(4))
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu_q, ls_q.exp()), torch.distributions.Normal(mu_p, ls_p.exp())
    )
    torch.testing.assert_close(reference.gaussian_kl(mu_q, ls_q, mu_p, ls_p), expected, rtol=1e-12, atol=1e-12)


def test_sample_and_kl_sums_kl_over_all_but_the_batch() -> None:
    mu_q, ls_q, mu_p, ls_p = (torch.randn(3, 2, 4, 4, dtype=torch.float64) for _ in range(4))
    z, kl = reference.sample_and_kl(mu_q, ls_q, mu_p, ls_p, seed=7)
    torch.testing.assert_close(kl, reference.gaussian_kl(mu_q, ls_q, mu_p, ls_p).sum((1, 2, 3)))
    assert z.shape == mu_q.shape and z.dtype == mu_q.dtype


def test_normal_draws_have_unit_moments_and_depend_only_on_seed() -> None:
    eps = philox.normal(11, torch.Size([400_000]), torch.device("cpu")).double()
    assert abs(eps.mean().item()) < 4.0 / math.sqrt(eps.numel())
    assert abs(eps.var().item() - 1.0) < 4.0 * math.sqrt(2.0 / eps.numel())
    assert torch.equal(eps.float(), philox.normal(11, torch.Size([400_000]), torch.device("cpu")))
    assert not torch.equal(eps.float(), philox.normal(12, torch.Size([400_000]), torch.device("cpu")))


def test_sample_gaussian_moments_match_mu_and_sigma() -> None:
    n = 200_000
    mu = torch.full((n,), 0.7)
    logsigma = torch.full((n,), math.log(0.3))
    z = reference.sample_gaussian(mu, logsigma, temperature=0.5, seed=3).double()
    assert abs(z.mean().item() - 0.7) < 4.0 * 0.15 / math.sqrt(n)
    assert z.std().item() == pytest.approx(0.15, rel=0.01)


def test_philox_matches_the_published_known_answer() -> None:
    # Philox4x32-10 known-answer test from Salmon et al. (Random123): counter 0, key 0.
    words = philox.philox(0, torch.tensor([0]), 0)
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_dmol_sample_stays_in_range_and_follows_a_sharp_mixture() -> None:
    logits = torch.zeros(2, 30, 4, 4)
    logits[:, 1] = 100.0  # mixture 1 wins every Gumbel draw
    for c, mean in enumerate([0.5, -0.25, 0.0]):
        logits[:, 3 + 9 * c + 1] = mean
        logits[:, 3 + 9 * c + 3 + 1] = -7.0  # smallest scale: draws sit on the mean
    image = reference.dmol_sample(logits, seed=5)
    assert image.shape == (2, 3, 4, 4) and image.dtype == torch.float32
    torch.testing.assert_close(image[:, 0], torch.full((2, 4, 4), 0.5), atol=0.02, rtol=0)
    torch.testing.assert_close(image[:, 1], torch.full((2, 4, 4), -0.25), atol=0.02, rtol=0)


@pytest.mark.parametrize("num_bits, half, bins", [(8, 1 / 255, 127.5), (5, 1 / 31, 15.5)])
def test_bin_constants_are_the_half_bin_width_and_log_half_bin_count(num_bits: int, half: float, bins: float) -> None:
    got_half, got_log_bins = reference.bin_constants(num_bits)
    assert got_half == pytest.approx(half, rel=1e-15)
    assert got_log_bins == pytest.approx(math.log(bins), rel=1e-15)


def test_channels_last_is_told_apart_from_tensors_that_are_both_layouts() -> None:
    nchw = torch.zeros(2, 3, 4, 5)
    nhwc = nchw.contiguous(memory_format=torch.channels_last)
    assert not reference.is_channels_last(nchw) and reference.is_channels_last(nhwc)
    for both in (torch.zeros(2, 3, 1, 1), torch.zeros(2, 1, 4, 5)):  # contiguous and channels_last at once
        assert not reference.is_channels_last(both.contiguous(memory_format=torch.channels_last))
    assert not reference.is_channels_last(torch.zeros(2, 3, 4))
    assert not reference.is_channels_last(nhwc[:, :, :, :3])  # neither layout
    assert reference.memory_format_of(nhwc) == torch.channels_last
    assert reference.memory_format_of(nchw) == torch.contiguous_format


def test_deterministic_ops_take_no_backend() -> None:
    logits, x = torch.zeros(1, 10, 1, 1), torch.zeros(1, 3, 1, 1)
    params = [torch.zeros(2, 3)] * 4
    with pytest.raises(TypeError, match="backend"):
        reference.dmol_nll(logits, x, backend="cuda")
    with pytest.raises(TypeError, match="backend"):
        reference.gaussian_kl(*params, backend="cuda")


def test_random_ops_accept_only_the_two_eager_noise_sources() -> None:
    mu = torch.zeros(2, 3)
    for call in (
        lambda: reference.sample_gaussian(mu, mu, seed=1, backend="cuda"),
        lambda: reference.sample_and_kl(mu, mu, mu, mu, seed=1, backend="triton"),
        lambda: reference.dmol_sample(torch.zeros(1, 10, 2, 2), seed=1, backend="auto"),
    ):
        with pytest.raises(ValueError, match="'reference' or 'original'"):
            call()


def test_dmol_sample_returns_the_image_in_the_logits_layout() -> None:
    logits = torch.randn(2, 30, 3, 4, generator=torch.Generator().manual_seed(4))
    image = reference.dmol_sample(logits, seed=9)
    image_cl = reference.dmol_sample(logits.contiguous(memory_format=torch.channels_last), seed=9)
    assert image.is_contiguous() and reference.is_channels_last(image_cl)
    assert torch.equal(image, image_cl)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0,), (5,)])
def test_sample_and_kl_sums_per_image_for_empty_batches_and_vectors(shape: tuple) -> None:
    mu_q, ls_q, mu_p, ls_p = (torch.randn(shape, dtype=torch.float64) for _ in range(4))
    z, kl = reference.sample_and_kl(mu_q, ls_q, mu_p, ls_p, seed=2)
    assert z.shape == shape and kl.shape == shape[:1]
    per_image = [float(image.sum()) for image in reference.gaussian_kl(mu_q, ls_q, mu_p, ls_p)]
    torch.testing.assert_close(kl, torch.tensor(per_image, dtype=torch.float64))
