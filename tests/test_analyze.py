"""vdvae_fast.analyze: the numbers add up against independent measurements (the model's evaluation, the KL of
every latent dimension from its posterior and prior), the pruning masks keep the right dimensions, the command
line writes complete JSON and a plot, and bad input gets a clear error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vdvae_fast import analyze, train
from vdvae_fast.data import ArrayImages, make_loader, preprocessing_for
from vdvae_fast.hparams import preset
from vdvae_fast.model import VAE
from vdvae_fast.runtime import Runtime
from vdvae_fast.training import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")
CPU_RUNTIME = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def model_and_split():
    """The tiny preset with its weights perturbed so that posteriors differ from priors by varied amounts (at
    initialization almost every latent is inactive), and 10 random 8x8 images."""
    H = preset("tiny")
    H.update(backend="reference")
    torch.manual_seed(0)
    model = VAE(H).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    images = np.random.RandomState(0).randint(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    return model, ArrayImages(images)


@pytest.fixture(scope="module")
def result(model_and_split):
    model, split = model_and_split
    return analyze.analyze(model, split, preprocessing_for("builtin"), n_batch=4, seed=7)


def test_the_unpruned_elbo_and_the_summed_layer_rates_are_the_models_evaluation(model_and_split, result):
    """Same images, same batches, same seed: training.evaluate's ELBO, rate and distortion, to float rounding."""
    model, split = model_and_split
    loader = make_loader(split, 4, shuffle=False, even_shards=False)
    evaluation = evaluate(model, loader, preprocessing_for("builtin"), CPU_RUNTIME, "fp32", seed=7)
    assert math.isclose(result["rate_bpd"], evaluation["rate"] / LN2, rel_tol=1e-5)
    assert math.isclose(sum(layer["rate_bpd"] for layer in result["layers"]), evaluation["rate"] / LN2, rel_tol=1e-5)
    assert math.isclose(result["distortion_bpd"], evaluation["distortion"] / LN2, rel_tol=1e-6)
    assert math.isclose(result["elbo_bpd"], evaluation["elbo_bpd"], rel_tol=1e-6)
    layer_rates = np.array(evaluation["kl_per_layer"]) / LN2
    np.testing.assert_allclose([layer["rate_bpd"] for layer in result["layers"]], layer_rates, rtol=1e-5, atol=1e-9)
    (full,) = [point for point in result["pruning"] if point["percent"] == 100]
    assert full["elbo_bpd"] == result["elbo_bpd"] and full["kept_dims"] == result["latent_dims"]


def test_rates_per_resolution_add_up_the_layers_at_that_resolution(model_and_split, result):
    model = model_and_split[0]
    resolutions = [block.base for block in model.decoder.dec_blocks]
    for res in set(resolutions):
        expected = sum(layer["rate_bpd"] for layer in result["layers"] if layer["resolution"] == res)
        assert math.isclose(result["rate_per_resolution_bpd"][str(res)], expected, rel_tol=1e-12)
    assert math.isclose(sum(result["rate_per_resolution_bpd"].values()), result["rate_bpd"], rel_tol=1e-9)


def _average_kl_per_dimension(model: VAE, split: ArrayImages, seed: int) -> list[torch.Tensor]:
    """The oracle: posteriors and priors from forward_get_latents under evaluation's seeding, the KL of two
    Gaussians written out in float64, averaged over the images."""
    totals = None
    torch.manual_seed(seed + analyze.EVAL_SEED_OFFSET)
    for start in range(0, len(split), 4):
        x, _ = preprocessing_for("builtin")(torch.stack([split[i] for i in range(start, min(start + 4, len(split)))]))
        layers = model.forward_get_latents(x)
        kls = []
        for layer in layers:
            mu_q, sigma_q, mu_p, sigma_p = (layer[k].double() for k in ("mu_q", "sigma_q", "mu_p", "sigma_p"))
            kl = torch.log(sigma_p / sigma_q) + (sigma_q**2 + (mu_q - mu_p) ** 2) / (2 * sigma_p**2) - 0.5
            kls.append(kl.sum(0))
        totals = kls if totals is None else [a + b for a, b in zip(totals, kls, strict=True)]
    return [total / len(split) for total in totals]


def test_active_units_count_the_dimensions_whose_average_kl_exceeds_the_threshold(model_and_split, result):
    model, split = model_and_split
    average = _average_kl_per_dimension(model, split, seed=7)
    counts = [int((kl > analyze.ACTIVE_KL_NATS).sum()) for kl in average]
    assert [layer["active_units"] for layer in result["layers"]] == counts
    assert [layer["latent_dims"] for layer in result["layers"]] == [kl.numel() for kl in average]
    assert 0 < result["active_units"] == sum(counts) < result["latent_dims"]  # the fixture has both kinds


def test_keep_masks_choose_the_highest_average_kl_dimensions():
    average = [torch.tensor([[0.5, 0.1]]), torch.tensor([[0.9], [0.0], [0.3]]), torch.tensor([0.2, 0.05])]
    masks = analyze.keep_masks(average, 50.0)  # ceil(3.5) = 4 of 7: 0.9, 0.5, 0.3, 0.2
    assert masks[0].tolist() == [[[True, False]]]
    assert masks[1].tolist() == [[[True], [False], [True]]]
    assert masks[2].tolist() == [[True, False]]
    assert analyze.keep_masks(average, 100.0) == [None, None, None]  # everything kept: nothing pruned
    assert sum(int(m.sum()) for m in analyze.keep_masks(average, 1.0) if m is not None) == 1  # at least one
    for bad in (0.0, 150.0, math.nan):
        with pytest.raises(ValueError, match=r"percent must be a number in \(0, 100\]"):
            analyze.keep_masks(average, bad)


def test_pruning_keeps_the_stated_share_and_pruned_latents_add_no_rate(result):
    assert [point["percent"] for point in result["pruning"]] == list(analyze.PRUNE_PERCENTS)
    for point in result["pruning"]:
        assert point["kept_dims"] == min(
            result["latent_dims"], math.ceil(point["percent"] / 100 * result["latent_dims"])
        )
        assert point["rate_bpd"] <= result["rate_bpd"] * (1 + 1e-6)
        assert math.isclose(point["elbo_bpd"], point["rate_bpd"] + point["distortion_bpd"], rel_tol=1e-12)
    rates = [point["rate_bpd"] for point in result["pruning"]]
    assert rates == sorted(rates)  # keeping more of the highest-KL dimensions keeps more rate


def test_analyze_refuses_an_empty_split_and_a_bad_batch(model_and_split):
    model = model_and_split[0]
    empty = ArrayImages(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="the split has no images"):
        analyze.analyze(model, empty, preprocessing_for("builtin"))
    with pytest.raises(ValueError, match="n_batch must be at least 1, got 0"):
        analyze.analyze(model, model_and_split[1], preprocessing_for("builtin"), n_batch=0)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _png_folder(root: Path, count: int, size: int) -> Path:
    rng = np.random.RandomState(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A run of the tiny preset (one update) on 12 random 8x8 PNGs, 4 of them validation images."""
    tmp = tmp_path_factory.mktemp("analyze")
    argv = ["--hps", "tiny", "--dataset", "folder", "--image_size", "8", "--data_root", str(_png_folder(tmp / "pngs", 12, 8)),
            "--valid_holdout", "4", "--save_dir", str(tmp), "--desc", "run", "--device", "cpu", "--max_iters", "1",
            "--backend", "reference", "--iters_per_images", "100000"]  # fmt: skip
    train.run(train.parse_args(argv))
    return tmp / "run" / "latest.pt"


def test_the_command_prints_and_writes_complete_json_and_a_plot(checkpoint, capsys):
    assert analyze.main(["--restore_ema_path", str(checkpoint), "--n_batch", "3"]) == 0
    out = capsys.readouterr().out
    json_path = checkpoint.parent / "analysis-latest-valid.json"
    png_path = json_path.with_suffix(".png")
    assert f"wrote {json_path} and {png_path}" in out and "active" in out
    written = json.loads(json_path.read_text())
    n_layers = len(VAE(preset("tiny")).decoder.dec_blocks)
    assert set(written) == {
        "checkpoint", "dataset", "split", "n_images", "seed", "n_batch", "image_dims", "elbo_bpd", "distortion_bpd",
        "rate_bpd", "active_kl_nats", "latent_dims", "active_units", "layers", "rate_per_resolution_bpd", "pruning",
    }  # fmt: skip
    assert written["n_images"] == 4 and written["split"] == "valid" and len(written["layers"]) == n_layers
    assert set(written["layers"][0]) == {"index", "resolution", "rate_bpd", "latent_dims", "active_units",
                                         "active_fraction"}  # fmt: skip
    assert set(written["rate_per_resolution_bpd"]) == {"1", "4", "8"}
    assert [p["percent"] for p in written["pruning"]] == list(analyze.PRUNE_PERCENTS)
    assert set(written["pruning"][0]) == {"percent", "kept_dims", "elbo_bpd", "distortion_bpd", "rate_bpd"}
    assert all(math.isfinite(p["elbo_bpd"]) for p in written["pruning"])
    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1]
    assert png_path.stat().st_size < 200_000


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--split", "train"], "--split must be one of valid, test, got 'train'"),
        (["--max_images", "-1"], "--max_images must be at least 0, got -1"),
        (["--n_batch", "0"], "--n_batch must be at least 1, got 0"),
        (["--seed", "-2"], "--seed must be at least 0, got -2"),
        (["--out", "result.txt"], "must name a .json file"),
    ],
)
def test_bad_flags_are_refused_with_what_is_valid(checkpoint, capsys, flags, message):
    assert analyze.main(["--restore_ema_path", str(checkpoint), *flags]) == analyze.USAGE_ERROR
    assert message in capsys.readouterr().err


def test_missing_weights_and_weights_of_another_preset_are_refused(tmp_path, capsys):
    assert analyze.main(["--restore_ema_path", str(tmp_path / "none.pt")]) == analyze.USAGE_ERROR
    assert "none.pt" in capsys.readouterr().err
    official = tmp_path / "tiny-model-ema.th"
    torch.save(VAE(preset("tiny")).state_dict(), official)
    assert analyze.main(["--restore_ema_path", str(official)]) == analyze.USAGE_ERROR
    assert "name its preset with --hps" in capsys.readouterr().err
    assert analyze.main(["--restore_ema_path", str(official), "--hps", "cifar10"]) == analyze.USAGE_ERROR
    assert "tiny-model-ema.th" in capsys.readouterr().err
