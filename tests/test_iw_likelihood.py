"""VAE.iw_log_likelihood, the importance-weighted estimate of log p(x), against its oracles: the exact log p(x)
of a two-latent model integrated on a grid, the ELBO it must never fall below on average (and equals in
expectation with one sample), and its growth with the number of samples. Statistical checks compare means of
independent repeats with a margin of four standard errors (a false failure about once in 30,000 runs). The
training program's evaluation records carry the estimate (--iw_samples) and the per-layer KL."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vdvae_fast import ops, train
from vdvae_fast.data import ArrayImages, make_loader, preprocessing_for
from vdvae_fast.hparams import preset
from vdvae_fast.model import VAE
from vdvae_fast.runtime import Runtime
from vdvae_fast.training import evaluate

CPU_RUNTIME = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

MARGIN_SE = 4.0  # standard errors of a mean that a statistical check allows
GRID_HALF_WIDTH = 7.0  # standard deviations of the prior a quadrature grid spans on each side
GRID_POINTS = 201


def _two_latent_vae() -> VAE:
    """Two stochastic layers of one scalar latent each on 1x1 RGB images, float64, with weights drawn at random
    (so the second prior depends on z1, and the posterior is neither the prior nor the true posterior)."""
    H = preset("tiny")
    H.update(image_size=1, enc_blocks="1x1", dec_blocks="1x2", zdim=1, width=8, num_mixtures=2, no_bias_above=1)
    torch.manual_seed(0)
    vae = VAE(H, backend="reference").double()
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.normal_(0.0, 0.35)
    return vae


def _pixels(*rgb: tuple[int, int, int]) -> torch.Tensor:
    """1x1 images from 8-bit values, as (B, 1, 1, 3) targets in [-1, 1] (float64)."""
    return (torch.tensor(rgb, dtype=torch.float64) / 127.5 - 1.0).view(-1, 1, 1, 3)


@torch.no_grad()
def _exact_log_likelihood(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log of the double integral of p(x | z1, z2) p(z2 | z1) p(z1), nats per image, by the trapezoid
    rule on a grid of standardized coordinates: z1 = mu1 + sigma1 u, z2 = mu2(z1) + sigma2(z1) v, so the
    integrand is p(x | z) phi(u) phi(v) (p(x | z) <= 1 for the discrete DMoL, so the grid's ends cut off less
    than 1e-11 of it)."""
    decoder = vae.decoder
    first, second = decoder.dec_blocks
    u = torch.linspace(-GRID_HALF_WIDTH, GRID_HALF_WIDTH, GRID_POINTS, dtype=torch.float64)
    log_weight = torch.distributions.Normal(0.0, 1.0).log_prob(u) + math.log(u[1] - u[0])
    n = GRID_POINTS
    bias = decoder.bias_xs[0]
    mu1, raw_sigma1, _ = first._prior(bias)
    z1 = mu1 + raw_sigma1.exp() * u.view(n, 1, 1, 1)
    state = first.forward_uncond(bias.expand(n, -1, -1, -1), None, None, z1, "reference")
    mu2, raw_sigma2, _ = second._prior(state)
    z2 = mu2[:, None] + raw_sigma2.exp()[:, None] * u.view(1, n, 1, 1, 1)  # [i, j]: z1 = z1[i], v = u[j]
    z1 = z1[:, None].expand_as(z2)
    px_z = decoder.forward_uncond(n * n, latents=[z1.reshape(-1, 1, 1, 1), z2.reshape(-1, 1, 1, 1)])
    log_grid_weight = (log_weight[:, None] + log_weight[None, :]).reshape(-1)
    out = []
    for image in x:
        target = image.permute(2, 0, 1).expand(n * n, -1, -1, -1)
        log_px_z = -decoder.out_net.nll(px_z, target, "reference").double() * image.numel()
        out.append(torch.logsumexp(log_px_z + log_grid_weight, dim=0))
    return torch.stack(out)


def _log_mean_exp(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.logsumexp(values, dim=dim) - math.log(values.shape[dim])


def test_the_quadrature_is_converged():
    """The oracle itself: halving the grid spacing changes log p(x) by less than 1e-6 nats."""
    global GRID_POINTS
    vae, x = _two_latent_vae(), _pixels((150, 60, 220), (10, 140, 170))
    coarse = _exact_log_likelihood(vae, x)
    GRID_POINTS, saved = 2 * GRID_POINTS - 1, GRID_POINTS
    try:
        fine = _exact_log_likelihood(vae, x)
    finally:
        GRID_POINTS = saved
    torch.testing.assert_close(coarse, fine, atol=1e-6, rtol=0)


def _repeated(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """Each image `repeats` times, as one batch: row r * B + b is image b (independent draws in one call)."""
    return x.repeat(repeats, 1, 1, 1)


def test_iw_estimate_equals_the_exact_log_likelihood_of_a_model_small_enough_to_integrate():
    vae, x = _two_latent_vae(), _pixels((150, 60, 220), (10, 140, 170), (128, 128, 128))
    exact = _exact_log_likelihood(vae, x)
    torch.manual_seed(1)
    repeats = 64
    batch = _repeated(x, repeats)
    estimates = vae.iw_log_likelihood(batch, batch, 400, samples_per_pass=400).view(repeats, len(x))
    estimate = _log_mean_exp(estimates)  # the estimate with all 25,600 samples
    standard_error = estimates.std(dim=0) / math.sqrt(repeats)
    elbo = torch.stack([-vae(image[None], image[None])["elbo"].detach() * 3 for image in x])
    assert (standard_error < 0.02).all(), standard_error  # precise enough to tell the bound from log p(x)
    assert ((exact - elbo) > 0.5).all(), (exact, elbo)  # the ELBO is far from log p(x): the test tells them apart
    assert ((estimate - exact).abs() < MARGIN_SE * standard_error + 1e-3).all(), (estimate, exact, standard_error)


def test_one_sample_is_the_elbo_in_expectation():
    """With n_samples = 1 the estimate is log p(x|z) - (log q(z) - log p(z)) at one z: its mean is the ELBO, per
    image, in nats per image (this checks the units: the DMoL's nats per dimension times the dimensions, the
    layers' sums per image)."""
    vae, x = _two_latent_vae(), _pixels((150, 60, 220), (10, 140, 170))
    torch.manual_seed(2)
    for image in x:
        batch = _repeated(image[None], 4000)
        draws = vae.iw_log_likelihood(batch, batch, 1)
        elbo = torch.stack([-vae(chunk, chunk)["elbo"].detach() * 3 for chunk in batch.chunk(16)])
        error = math.hypot(draws.std() / math.sqrt(len(draws)), elbo.std() / math.sqrt(len(elbo)))
        assert abs(draws.mean() - elbo.mean()) < MARGIN_SE * error, (draws.mean(), elbo.mean(), error)


@pytest.fixture(scope="module")
def tiny_vae_and_batch():
    """The tiny preset at initialization on random 8x8 images."""
    H = preset("tiny")
    H.update(backend="reference")
    torch.manual_seed(0)
    vae = VAE(H).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 8, 3, generator=gen)
    x_target = torch.randint(0, 256, (4, 8, 8, 3), generator=gen).float() / 127.5 - 1.0
    return vae, x, x_target


def test_never_looser_than_the_elbo_on_average_and_tighter_as_samples_grow(tiny_vae_and_batch):
    vae, x, x_target = tiny_vae_and_batch
    dims, repeats = x[0].numel(), 64
    batch, target = _repeated(x, repeats), _repeated(x_target, repeats)
    torch.manual_seed(3)
    # per repeat, the mean over the four images, nats per image: ELBOs (one sample each) and IW estimates
    chunks = zip(batch.chunk(16), target.chunk(16), strict=True)
    elbo = torch.stack([-vae(*chunk)["elbo"].detach() * dims for chunk in chunks])
    elbo_mean, elbo_error = elbo.mean().item(), elbo.std().item() / math.sqrt(len(elbo))
    means, errors = [], []
    for k in (1, 4, 16):
        estimates = vae.iw_log_likelihood(batch, target, k, samples_per_pass=4).view(repeats, len(x)).mean(dim=1)
        means.append(estimates.mean().item())
        errors.append(estimates.std().item() / math.sqrt(repeats))
    # one sample: the ELBO's expectation; more samples: above it and rising, beyond the noise
    assert abs(means[0] - elbo_mean) < MARGIN_SE * math.hypot(errors[0], elbo_error), (means, elbo_mean)
    assert means[-1] - elbo_mean > MARGIN_SE * math.hypot(errors[-1], elbo_error), (means, elbo_mean)
    for fewer, more, error_fewer, error_more in zip(means, means[1:], errors, errors[1:], strict=False):
        assert more - fewer > MARGIN_SE * math.hypot(error_fewer, error_more), (means, errors)


def test_samples_per_pass_only_changes_how_the_samples_are_batched(tiny_vae_and_batch):
    """Passes of one sample each draw the same noise, seed for seed, as separate single-sample estimates: the
    running logsumexp over passes is their log-mean-exp."""
    vae, x, x_target = tiny_vae_and_batch
    torch.manual_seed(4)
    whole = vae.iw_log_likelihood(x, x_target, 3, samples_per_pass=1)
    torch.manual_seed(4)
    single = torch.stack([vae.iw_log_likelihood(x, x_target, 1) for _ in range(3)])
    torch.testing.assert_close(whole, _log_mean_exp(single), rtol=0, atol=1e-9)


def test_the_decoder_sees_at_most_samples_per_pass_copies_of_the_batch(tiny_vae_and_batch):
    """Memory is bounded by samples_per_pass, not n_samples: 10 samples in passes of 3 are 4 decoder passes."""
    vae, x, x_target = tiny_vae_and_batch
    seen = []
    hook = vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0][1].shape[0]))
    try:
        vae.iw_log_likelihood(x, x_target, 10, samples_per_pass=3)
    finally:
        hook.remove()
    assert seen == [3 * len(x), 3 * len(x), 3 * len(x), len(x)]


@pytest.mark.skipif("cpu" not in ops.available_backends("cpu"), reason="the fused cpu backend is not built")
def test_the_fused_cpu_backend_gives_the_reference_estimate(tiny_vae_and_batch):
    """Both backends draw the same Philox noise, so with one seed they give the same estimate."""
    vae, x, x_target = tiny_vae_and_batch
    try:
        torch.manual_seed(5)
        fused = vae.iw_log_likelihood(x, x_target, 4, samples_per_pass=2, backend="cpu")
    except NotImplementedError as err:
        pytest.skip(f"the cpu kernels do not compute the sampled estimate yet: {err}")
    torch.manual_seed(5)
    eager = vae.iw_log_likelihood(x, x_target, 4, samples_per_pass=2, backend="reference")
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("argument, value", [("n_samples", 0), ("n_samples", 2.5), ("samples_per_pass", 0)])
def test_bad_sample_counts_are_refused(tiny_vae_and_batch, argument, value):
    vae, x, x_target = tiny_vae_and_batch
    counts = {"n_samples": 2, "samples_per_pass": 1, argument: value}
    with pytest.raises(ValueError, match=f"{argument} must be an integer at least 1, got {value!r}"):
        vae.iw_log_likelihood(x, x_target, **counts)


def test_images_of_the_wrong_size_are_refused(tiny_vae_and_batch):
    vae, x, x_target = tiny_vae_and_batch
    with pytest.raises(ValueError, match="takes 8x8 images"):
        vae.iw_log_likelihood(x[:, :4], x_target[:, :4], 2)


# --------------------------------------------------------------------------------------------
# The training program: --iw_samples and the per-layer KL in the evaluation records
# --------------------------------------------------------------------------------------------


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [record for record in lines if record.get("type") == kind]


def _png_folder(root: Path, count: int = 12, size: int = 8) -> Path:
    rng = np.random.RandomState(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


def _tiny_run(tmp_path: Path, desc: str, *extra: str) -> dict:
    """The tiny preset on 12 random 8x8 PNGs (8 training images: 2 batches of 4; 4 validation images)."""
    argv = ["--hps", "tiny", "--dataset", "folder", "--image_size", "8", "--data_root", str(_png_folder(tmp_path / "pngs")),
            "--valid_holdout", "4", "--save_dir", str(tmp_path / "runs"), "--desc", desc, "--device", "cpu",
            "--backend", "reference", "--iters_per_images", "100000", "--iters_per_save", "100000", *extra]  # fmt: skip
    return train.run(train.parse_args(argv))


@pytest.mark.usefixtures("one_thread")
def test_each_evaluation_record_holds_the_per_layer_kl_and_the_iw_estimate(tmp_path):
    """The eval_loss records of log.jsonl carry kl_per_layer (nats/dim, one float per stochastic layer, summing
    to the rate) and, with --iw_samples, the importance-weighted -log p(x) in nats/dim and bits/dim."""
    _tiny_run(tmp_path, "iw", "--max_iters", "2", "--iw_samples", "3")
    (record,) = _records(tmp_path / "runs" / "iw", "eval_loss")
    n_layers = len(VAE(preset("tiny")).decoder.dec_blocks)
    assert isinstance(record["kl_per_layer"], list) and len(record["kl_per_layer"]) == n_layers
    assert all(isinstance(kl, float) and kl >= 0 for kl in record["kl_per_layer"])
    assert math.isclose(sum(record["kl_per_layer"]), record["rate"], rel_tol=1e-5)  # float32 sums
    assert record["iw_samples"] == 3 and record["iw_images"] == record["n_images"] == 4
    assert math.isclose(record["iw_bpd"], record["iw_nll"] / math.log(2), rel_tol=1e-12)
    assert math.isfinite(record["iw_nll"]) and record["iw_nll"] > 0


@pytest.mark.usefixtures("one_thread")
def test_iw_samples_zero_leaves_the_estimate_out_and_test_eval_reports_it(tmp_path):
    _tiny_run(tmp_path, "plain", "--max_iters", "1")
    (record,) = _records(tmp_path / "runs" / "plain", "eval_loss")
    assert "iw_nll" not in record and len(record["kl_per_layer"]) == len(VAE(preset("tiny")).decoder.dec_blocks)
    _tiny_run(tmp_path, "test", "--restore_ema_path", str(tmp_path / "runs" / "plain" / "latest.pt"), "--test_eval",
              "--iw_samples", "2")  # fmt: skip
    (record,) = _records(tmp_path / "runs" / "test", "test_loss")
    assert record["iw_samples"] == 2 and math.isfinite(record["iw_bpd"]) and len(record["kl_per_layer"]) > 0


def test_evaluate_refuses_a_negative_sample_count(tiny_vae_and_batch):
    vae = tiny_vae_and_batch[0]
    with pytest.raises(ValueError, match="iw_samples must be an integer at least 0"):
        evaluate(vae, [], preprocessing_for("builtin"), CPU_RUNTIME, "fp32", 0, iw_samples=-1)


@pytest.mark.usefixtures("one_thread")
def test_the_estimate_leaves_the_elbo_unchanged_and_repeats_exactly(tiny_vae_and_batch):
    """The importance weighting draws from its own seeds: the ELBO is the same with and without it, and two
    evaluations of the same weights agree exactly; on average over the images the estimate is above the ELBO."""
    vae = tiny_vae_and_batch[0]
    split = ArrayImages(np.random.RandomState(1).randint(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    loader = make_loader(split, 4, shuffle=False, even_shards=False)
    arguments = (loader, preprocessing_for("builtin"), CPU_RUNTIME, "fp32", 0)
    plain = evaluate(vae, *arguments)
    first, second = evaluate(vae, *arguments, iw_samples=16), evaluate(vae, *arguments, iw_samples=16)
    assert first == second
    assert {key: first[key] for key in plain} == plain
    assert first["iw_images"] == 12 and first["iw_nll"] < first["filtered_elbo"]
