"""Using a trained model: the latent file, encode/decode/reconstruct/interpolate, per-layer temperatures, and
openai/vdvae's method names as downstream code (Brain-Diffuser) calls them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vdvae_fast import latents as lat
from vdvae_fast import ops
from vdvae_fast.data import preprocess
from vdvae_fast.hparams import ARCHITECTURE_KEYS, preset
from vdvae_fast.model import VAE, DecBlock
from vdvae_fast.sample import parse_temperature

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")

# tiny has 7 stochastic layers; Brain-Diffuser keeps 31, so its round trip runs on tiny widened to 32 layers
BRAIN_DIFFUSER_LAYERS = 31
DEEP_TINY_BLOCKS = "1x1,4m1,4x9,8m4,8x20"  # 1 + 1 + 9 + 1 + 20 = 32 layers at tiny's width and zdim


def tiny_model(seed: int = 0, **changes) -> VAE:
    """tiny with random weights made non-trivial: the prior's last convs start at zero in a fresh model."""
    torch.manual_seed(seed)
    H = preset("tiny")
    H.update({"backend": "reference", **changes})
    vae = VAE(H).eval()
    with torch.no_grad():
        for block in vae.decoder.dec_blocks:
            block.prior.c4.weight.normal_(0, 0.1)
    return vae


def tiny_images(n: int = 3, seed: int = 0, size: int = 8) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3)).astype(np.uint8)


def official_file(path: Path, vae: VAE) -> Path:
    torch.save(vae.state_dict(), path)
    return path


# ----------------------------------------------------------------------------------------------------
# Per-layer temperatures
# ----------------------------------------------------------------------------------------------------


def test_temperature_forms():
    assert parse_temperature("0.9").for_layers(7) == 0.9
    assert parse_temperature("1, 0.9,0.8").for_layers(3) == [1.0, 0.9, 0.8]
    schedule = parse_temperature("linear:1.0:0.6").for_layers(5)
    assert len(schedule) == 5
    assert schedule[0] == 1.0 and schedule[-1] == pytest.approx(0.6) and schedule[2] == pytest.approx(0.8)
    assert parse_temperature("linear:0.2:1").for_layers(3) == pytest.approx([0.2, 0.6, 1.0])
    assert parse_temperature("linear:0.7:0.3").for_layers(1) == [0.7]
    labels = [parse_temperature(text).label() for text in ("0.90", "linear:1.0:0.6", "1,2")]
    assert labels == ["0.9", "linear1-0.6", "per-layer"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("inf", "--temperature must be a finite number at least 0, got inf"),
        ("-0.5", "--temperature must be a finite number at least 0, got -0.5"),
        ("1,nan", "--temperature must be a finite number at least 0 (value 2 of '1,nan'), got nan"),
        ("warm", "--temperature 'warm' is not a number, comma-separated numbers"),
        ("1,,2", "--temperature '1,,2' is not a number"),
        ("cosine:1:0", "unknown schedule 'cosine'; schedules: linear"),
        ("linear:1", "the linear schedule takes START:END, e.g. linear:1.0:0.6"),
        ("linear:1:-1", "--temperature must be a finite number at least 0 (value 2 of 'linear:1:-1'), got -1.0"),
    ],
)
def test_bad_temperatures_say_what_is_valid(text, message):
    with pytest.raises(ValueError) as info:
        parse_temperature(text)
    assert message in str(info.value)


def test_a_list_of_the_wrong_length_names_the_layer_count():
    with pytest.raises(ValueError, match="lists 2 values but the model has 7 stochastic layers: give one value, 7 "):
        parse_temperature("1,0.5").for_layers(7)


def test_each_layer_samples_at_its_own_temperature(monkeypatch):
    vae = tiny_model()
    seen = []
    original = DecBlock.forward_uncond

    def recording(self, x, upper, t, z, backend):
        seen.append(t)
        return original(self, x, upper, t, z, backend)

    monkeypatch.setattr(DecBlock, "forward_uncond", recording)
    vae.forward_uncond_samples(2, t=parse_temperature("linear:1:0.4").for_layers(7))
    assert seen == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    seen.clear()
    z = [torch.zeros(2, 4, 1, 1)]
    vae.forward_samples_set_latents(2, z, t=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])


# ----------------------------------------------------------------------------------------------------
# The file format
# ----------------------------------------------------------------------------------------------------


def test_the_file_round_trips_through_plain_numpy(tmp_path):
    vae = tiny_model()
    torch.manual_seed(0)
    encoded = lat.encode(vae, tiny_images(3), names=["a.png", "b.png", "c.png"])
    path = lat.save_latents(encoded, tmp_path / "z.latents")  # any name: no .npz appended
    assert path == tmp_path / "z.latents" and path.exists()
    with np.load(path, allow_pickle=False) as f:
        blocks = vae.decoder.dec_blocks
        assert int(f["n_layers"]) == len(blocks) == 7 and str(f["preset"]) == "tiny"
        assert f["shapes"].tolist() == [[4, b.base, b.base] for b in blocks]
        hparams = json.loads(str(f["hparams"]))
        assert set(hparams) == set(ARCHITECTURE_KEYS) and hparams["dec_blocks"] == vae.H.dec_blocks
        assert f["names"].tolist() == ["a.png", "b.png", "c.png"]
        for i, block in enumerate(blocks):
            for name in ("z", "mu_q", "sigma_q"):
                array = f[f"{name}_{i:02d}"]
                assert array.dtype == np.float32 and array.shape == (3, 4, block.base, block.base)
                assert np.array_equal(array, getattr(encoded, name)[i])
            assert (f[f"sigma_q_{i:02d}"] > 0).all()
    loaded = lat.load_latents(path)
    assert loaded.preset == "tiny" and loaded.architecture == lat.architecture_of(vae.H)
    assert loaded.names == encoded.names and loaded.shapes == encoded.shapes
    assert all(np.array_equal(a, b) for a, b in zip(loaded.z, encoded.z, strict=True))


def test_a_file_written_with_numpy_alone_decodes_with_the_missing_layers_sampled(tmp_path):
    """Latents from elsewhere (e.g. regressed from brain activity) need only the metadata and the z of the
    first layers."""
    vae = tiny_model()
    hparams = json.dumps({key: vae.H[key] for key in ARCHITECTURE_KEYS})
    z = {f"z_{i:02d}": np.zeros((2, 4, r, r), np.float32) for i, r in enumerate((1, 4, 4))}
    np.savez(tmp_path / "mine.npz", format_version=1, preset="tiny", n_layers=3, hparams=hparams, **z)
    loaded = lat.load_latents(tmp_path / "mine.npz")
    assert loaded.n_layers == 3 and loaded.names == ["0", "1"] and loaded.mu_q == []
    lat.check_fits(loaded, vae)
    images = lat.decode(vae, loaded.z, t=0.0)
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8
    assert np.array_equal(images[0], images[1])  # same z, prior means below, the DMoL mean: same image


# ----------------------------------------------------------------------------------------------------
# Encode, decode, reconstruct, interpolate against the model's own posterior pass
# ----------------------------------------------------------------------------------------------------


def posterior_pass(vae: VAE, images: np.ndarray, seed: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """px_z and the per-layer stats of VAE.forward's own path (encoder, then Decoder.forward)."""
    x, _ = preprocess(images, vae.H)
    torch.manual_seed(seed)
    with torch.no_grad():
        return vae.decoder(vae.encoder(x), "reference", get_latents=True)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return ((image + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_encode_then_decode_with_every_layer_reproduces_the_reconstruction():
    vae = tiny_model()
    images = tiny_images(3)
    px_z, stats = posterior_pass(vae, images, seed=5)
    torch.manual_seed(5)
    encoded = lat.encode(vae, images)
    for layer, expected in zip(range(7), stats, strict=True):
        for name in ("z", "mu_q", "sigma_q"):
            np.testing.assert_array_equal(getattr(encoded, name)[layer], expected[name].numpy())
    # every layer given: the prior temperature is unused, decoding is deterministic up to the output layer
    logits = vae.decoder.out_net(px_z)
    for t in (0.0, 1.0):
        decoded_mean = lat.decode(vae, encoded.z, t=t, output="mean")
        np.testing.assert_array_equal(decoded_mean, to_uint8(lat.dmol_mean(logits)))
    # a draw from the DMoL with the same seed is the posterior pass's draw
    torch.manual_seed(11)
    decoded_draw = lat.decode(vae, encoded.z, t=0.0, output="sample")
    torch.manual_seed(11)
    expected_draw = vae.decoder.out_net.sample(px_z, "reference").numpy()
    np.testing.assert_array_equal(decoded_draw, expected_draw)


def test_dmol_mean_is_the_mean_of_the_dmol_draws():
    """Independent oracle: the average of many draws of ops.dmol_sample, scales small enough that no draw is
    clamped at +-1."""
    m, draws = 3, 20000
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 10 * m, 1, 1, generator=gen)
    for c in range(3):
        base = m + 3 * m * c
        logits[:, base : base + m] = torch.rand(1, m, 1, 1, generator=gen) * 0.6 - 0.3  # means in [-0.3, 0.3]
        logits[:, base + m : base + 2 * m] = -4.0  # scale e^-4: the logistic tails stay inside [-1, 1]
    samples = ops.dmol_sample(logits.expand(draws, -1, -1, -1).contiguous(), seed=1, backend="reference")
    assert samples.abs().max() < 1.0
    torch.testing.assert_close(lat.dmol_mean(logits)[0], samples.mean(0), atol=0.01, rtol=0)
    # one mixture with a hand-computed coupling: r = 0.2, g = 0.1 + tanh(0.5) r, b = -0.3 + tanh(1) r + tanh(-1) g
    one = torch.zeros(1, 10, 1, 1)
    one[0, [1, 4, 7], 0, 0] = torch.tensor([0.2, 0.1, -0.3])
    one[0, [3, 6, 9], 0, 0] = torch.tensor([0.5, 1.0, -1.0])
    r, g = 0.2, 0.1 + np.tanh(0.5) * 0.2
    b = -0.3 + np.tanh(1.0) * r + np.tanh(-1.0) * g
    torch.testing.assert_close(lat.dmol_mean(one).flatten(), torch.tensor([r, g, b], dtype=torch.float32))


def test_reconstruction_rows_keep_the_first_k_layers():
    vae = tiny_model()
    images = tiny_images(2)
    torch.manual_seed(2)
    rows = lat.reconstruction_rows(vae, images, [0, 3, 7], t=0.0)
    assert len(rows) == 4 and np.array_equal(rows[0], images)
    torch.manual_seed(2)
    encoded = lat.encode(vae, images)
    np.testing.assert_array_equal(rows[3], lat.decode(vae, encoded.z, t=0.0))  # k = all: the reconstruction
    np.testing.assert_array_equal(rows[2], lat.decode(vae, encoded.z[:3], t=0.0))
    # k = 0 at temperature 0: every z is a prior mean, the image does not depend on the input
    np.testing.assert_array_equal(rows[1][0], rows[1][1])
    assert not np.array_equal(rows[3][0], rows[3][1])
    assert lat.default_layer_counts(7) == [1, 2, 3, 5, 7] and lat.default_layer_counts(75)[-1] == 75


def test_interpolation_ends_are_the_two_reconstructions():
    vae = tiny_model()
    images = tiny_images(2, seed=4)
    torch.manual_seed(9)
    strip = lat.interpolate(vae, images, steps=5)
    torch.manual_seed(9)
    encoded = lat.encode(vae, images)
    ends = lat.decode(vae, encoded.z)
    assert strip.shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(strip[0], ends[0])
    np.testing.assert_array_equal(strip[-1], ends[1])
    assert not np.array_equal(strip[2], strip[0]) and not np.array_equal(strip[2], strip[-1])


def test_slerp_keeps_the_ends_and_the_norm():
    rng = np.random.RandomState(0)
    a, b = rng.randn(4, 2, 2).astype(np.float32), rng.randn(4, 2, 2).astype(np.float32)
    path = lat.slerp(a, b, [0.0, 0.25, 1.0])
    assert path.shape == (3, 4, 2, 2) and np.array_equal(path[0], a) and np.array_equal(path[-1], b)
    e1, e2 = np.array([3.0, 0.0]), np.array([0.0, 3.0])  # orthogonal, equal norms: a quarter circle
    np.testing.assert_allclose(lat.slerp(e1, e2, [0.5])[0], [3 / np.sqrt(2), 3 / np.sqrt(2)], rtol=1e-6)
    np.testing.assert_allclose(lat.slerp(e1, 2 * e1, [0.5])[0], [4.5, 0.0])  # parallel: linear


# ----------------------------------------------------------------------------------------------------
# openai/vdvae's method names, the way Brain-Diffuser calls them
# ----------------------------------------------------------------------------------------------------


def test_brain_diffuser_round_trip_of_the_first_31_layers(tmp_path):
    """Brain-Diffuser's vdvae scripts: encoder.forward on the NHWC input, decoder.forward(get_latents=True); z of
    the first 31 layers flattened and stacked per image (numpy), split
    back by each layer's size, decoded through Decoder.forward_manual_latents(n, latents, t=None), drawn through
    decoder.out_net.sample and written as PNGs upscaled to 512 with Pillow."""
    vae = tiny_model(dec_blocks=DEEP_TINY_BLOCKS)
    n_layers = len(vae.decoder.dec_blocks)
    assert n_layers == 32 > BRAIN_DIFFUSER_LAYERS
    x, _ = preprocess(tiny_images(2), vae.H)  # its data_input: (B, H, W, C)
    torch.manual_seed(0)
    with torch.no_grad():  # its feature extraction calls the encoder and decoder themselves
        activations = vae.encoder.forward(x)
        _, stats = vae.decoder.forward(activations, get_latents=True)
    torch.manual_seed(0)
    for ours, official_name in zip(stats, vae.forward_get_latents(x), strict=True):
        torch.testing.assert_close(ours["z"], official_name["z"], rtol=1e-6, atol=1e-6)
    assert [tuple(s["z"].shape) for s in stats] == [(2, 4, b.base, b.base) for b in vae.decoder.dec_blocks]
    assert all(s["kl"].shape == (2,) and s["sigma_q"].shape == s["z"].shape for s in stats)
    flat = np.hstack([stats[i]["z"].cpu().numpy().reshape(2, -1) for i in range(BRAIN_DIFFUSER_LAYERS)])
    sizes = [int(np.prod(stats[i]["z"].shape[1:])) for i in range(BRAIN_DIFFUSER_LAYERS)]
    bounds = np.cumsum([0, *sizes])
    latents = [
        torch.tensor(flat[:, bounds[i] : bounds[i + 1]].reshape(2, *stats[i]["z"].shape[1:])).float()
        for i in range(BRAIN_DIFFUSER_LAYERS)
    ]
    with torch.no_grad():
        px_z = vae.decoder.forward_manual_latents(len(latents[0]), latents, t=None)
        assert px_z.shape == (2, vae.H.width, 8, 8)
        # at t = 0 the 32nd layer takes its prior mean, which the posterior pass computed from the same 31 z
        at_zero = vae.decoder.forward_manual_latents(2, latents, t=0)
        completed = vae.decoder.forward_manual_latents(2, [*latents, stats[31]["mu_p"]])
        torch.testing.assert_close(at_zero, completed, rtol=1e-5, atol=1e-6)
        # all 32 layers given: exactly the posterior pass's features
        px_z_posterior, _ = posterior_pass(vae, tiny_images(2), seed=0)
        all_given = vae.decoder.forward_manual_latents(2, [s["z"] for s in stats])
        torch.testing.assert_close(all_given, px_z_posterior, rtol=1e-5, atol=1e-6)
        images = vae.decoder.out_net.sample(px_z)  # openai/vdvae's returns numpy: Image.fromarray needs .numpy()
    for j, image in enumerate(images):
        Image.fromarray(image.numpy()).resize((512, 512), resample=3).save(tmp_path / f"{j}.png")
    for j in range(2):
        with Image.open(tmp_path / f"{j}.png") as written:
            assert written.size == (512, 512) and written.mode == "RGB"
    # the VAE-level name: the same draw from the same seed
    torch.manual_seed(3)
    from_vae = vae.forward_samples_set_latents(2, latents, t=0)
    torch.manual_seed(3)
    with torch.no_grad():
        expected = vae.decoder.out_net.sample(vae.decoder.forward_manual_latents(2, latents, t=0), vae.backend)
    assert torch.equal(from_vae, expected)


def test_official_signatures_and_their_errors():
    vae = tiny_model()
    px_z = vae.decoder.forward_uncond(2, 0.5, None)  # openai/vdvae: forward_uncond(n, t=None, y=None)
    assert px_z.shape == (2, vae.H.width, 8, 8)
    with pytest.raises(ValueError, match="y .* is not used by VDVAE's unconditional decoder"):
        vae.decoder.forward_uncond(2, y=torch.zeros(2))
    with pytest.raises(ValueError, match=r"latent 1 is torch.float32 of shape \(2, 4, 1, 1\), but layer 1 of this "
                       r"decoder takes floating-point z of shape \(2, 4, 4, 4\)"):  # fmt: skip
        vae.decoder.forward_manual_latents(2, [torch.zeros(2, 4, 1, 1), torch.zeros(2, 4, 1, 1)])
    with pytest.raises(ValueError, match="got 8 latents for 7 stochastic layers"):
        vae.decoder.forward_manual_latents(2, [None] * 8)
    # numpy latents and None entries (sampled) are taken, as openai/vdvae's zip_longest takes None
    out = vae.decoder.forward_manual_latents(2, [np.zeros((2, 4, 1, 1), np.float32), None], t=0.0)
    assert out.shape == (2, vae.H.width, 8, 8)
    samples = vae.forward_uncond_samples(3, t=None)
    assert samples.shape == (3, 8, 8, 3) and samples.dtype == torch.uint8


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    return lat.main([*argv, "--backend", "reference"])


def test_cli_encode_decode_reconstruct_interpolate(tmp_path, capsys):
    weights = official_file(tmp_path / "tiny-model-ema.th", tiny_model())
    npy = tmp_path / "images.npy"
    np.save(npy, tiny_images(3))
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(tiny_images(2, seed=7)):
        Image.fromarray(image).save(folder / f"{i}.png")
    model = ["--restore_ema_path", str(weights), "--hps", "tiny"]
    z = tmp_path / "z.npz"
    assert run_cli("encode", *model, "--images", str(npy), str(folder), "--out", str(z), "--n_batch", "2") == 0
    assert "encoded 5 images (7 layers, preset tiny)" in capsys.readouterr().out
    assert lat.load_latents(z).names == ["images.npy[0]", "images.npy[1]", "images.npy[2]", "0.png", "1.png"]
    assert run_cli("decode", *model, "--latents", str(z), "--out", str(tmp_path / "each")) == 0
    written = sorted(p.name for p in (tmp_path / "each").iterdir())
    assert written == [f"{i:05d}.png" for i in range(5)]
    with Image.open(tmp_path / "each" / "00000.png") as first:
        assert first.size == (8, 8)
    assert run_cli("decode", *model, "--latents", str(z), "--out", str(tmp_path / "grid.png"), "--columns", "5") == 0
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (5 * 64 + 4 * 4, 64)
    out = tmp_path / "rows.png"
    argv = ("reconstruct", *model, "--images", str(npy), "--layers", "1,7", "--temperature", "linear:0:0.2")
    assert run_cli(*argv, "--out", str(out)) == 0
    with Image.open(out) as rows:
        assert rows.size == (3 * 64 + 2 * 4, 3 * 64 + 2 * 4)  # originals + 2 rows, 3 images
    out = tmp_path / "strip.png"
    assert (
        run_cli("interpolate", *model, "--images", str(npy), "--pair", "2", "0", "--steps", "4", "--out", str(out)) == 0
    )
    with Image.open(out) as strip:
        assert strip.size == (4 * 64 + 3 * 4, 64)


def test_the_console_command_reaches_the_latents_program(tmp_path):
    weights = official_file(tmp_path / "tiny-model-ema.th", tiny_model())
    np.save(tmp_path / "x.npy", tiny_images(1))
    result = subprocess.run(
        [sys.executable, "-m", "vdvae_fast", "latents", "encode", "--restore_ema_path", str(weights), "--hps", "tiny",
         "--images", str(tmp_path / "x.npy"), "--out", str(tmp_path / "z.npz")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert lat.load_latents(tmp_path / "z.npz").n_layers == 7


@pytest.fixture
def tiny_setup(tmp_path):
    weights = official_file(tmp_path / "tiny-model-ema.th", tiny_model())
    np.save(tmp_path / "x.npy", tiny_images(2))
    return tmp_path, ["--restore_ema_path", str(weights), "--hps", "tiny"]


def test_wrong_image_sizes_are_refused_with_the_size_the_model_takes(tiny_setup, capsys):
    tmp_path, model = tiny_setup
    np.save(tmp_path / "big.npy", tiny_images(2, size=9))
    assert run_cli("encode", *model, "--images", str(tmp_path / "big.npy"), "--out", str(tmp_path / "z.npz")) == 2
    assert "big.npy holds 9x9 images but this dataset needs 8x8 images" in capsys.readouterr().err
    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.fromarray(tiny_images(1, size=12)[0]).save(folder / "large.png")
    argv = ("encode", *model, "--images", str(folder), "--out", str(tmp_path / "z.npz"))
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert "large.png: 12x12 but this dataset needs 8x8 images" in err and "--resize" in err
    assert not (tmp_path / "z.npz").exists()
    assert run_cli(*argv, "--resize") == 0  # center-cropped and resized instead
    assert lat.load_latents(tmp_path / "z.npz").z[0].shape[0] == 1


def test_layer_counts_out_of_range_are_refused(tiny_setup, capsys):
    tmp_path, model = tiny_setup
    images = ("--images", str(tmp_path / "x.npy"))
    assert run_cli("reconstruct", *model, *images, "--layers", "1,8", "--out", str(tmp_path / "r.png")) == 2
    assert "layer count 8 is out of range: this model has 7 stochastic layers, so k" in capsys.readouterr().err
    assert run_cli("reconstruct", *model, *images, "--layers", "one", "--out", str(tmp_path / "r.png")) == 2
    assert "--layers 'one' is not a comma-separated list of layer counts" in capsys.readouterr().err
    assert run_cli("interpolate", *model, *images, "--pair", "0", "2", "--out", str(tmp_path / "i.png")) == 2
    assert "--pair 0 2: the images given number 2 (indices 0 to 1)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="layer count -1 is out of range"):
        lat.reconstruction_rows(tiny_model(), tiny_images(1), [-1])
    assert not list(tmp_path.glob("*.png"))


def test_latents_of_another_preset_are_refused(tiny_setup, capsys):
    tmp_path, model = tiny_setup
    assert run_cli("encode", *model, "--images", str(tmp_path / "x.npy"), "--out", str(tmp_path / "z.npz")) == 0
    torch.manual_seed(0)
    demo = official_file(tmp_path / "demo-model-ema.th", VAE(preset("demo")))
    argv = ("decode", "--restore_ema_path", str(demo), "--hps", "demo", "--latents", str(tmp_path / "z.npz"))
    assert run_cli(*argv, "--out", str(tmp_path / "d.png")) == 2
    err = capsys.readouterr().err
    assert f"the latents in {tmp_path / 'z.npz'} come from preset 'tiny' (enc_blocks=" in err
    assert "but this model is preset 'demo' (enc_blocks=" in err and "checkpoint that encoded them" in err
    assert not (tmp_path / "d.png").exists()


def test_missing_files_and_bad_values_are_named(tiny_setup, capsys):
    tmp_path, model = tiny_setup
    assert run_cli("encode", *model, "--images", str(tmp_path / "none"), "--out", str(tmp_path / "z.npz")) == 2
    assert f"'{tmp_path / 'none'}' does not exist: give a folder of PNG/JPEG images" in capsys.readouterr().err
    assert run_cli("decode", *model, "--latents", str(tmp_path / "z.npz"), "--out", str(tmp_path / "d.png")) == 2
    assert f"latent file '{tmp_path / 'z.npz'}' does not exist" in capsys.readouterr().err
    argv = ("--images", str(tmp_path / "x.npy"), "--out", str(tmp_path / "z.npz"))
    assert lat.main(["encode", "--restore_ema_path", str(tmp_path / "gone.th"), "--hps", "tiny", *argv]) == 2
    assert "gone.th" in capsys.readouterr().err
    np.save(tmp_path / "z.npy", np.zeros(3))
    assert run_cli("decode", *model, "--latents", str(tmp_path / "z.npy"), "--out", str(tmp_path / "d.png")) == 2
    assert "is not a latent .npz file" in capsys.readouterr().err
    assert run_cli("encode", *model, *argv) == 0
    bad_t = ("--temperature", "1,0.5", "--out", str(tmp_path / "d.png"))
    assert run_cli("decode", *model, "--latents", str(tmp_path / "z.npz"), *bad_t) == 2
    assert "--temperature lists 2 values but the model has 7 stochastic layers" in capsys.readouterr().err
    assert run_cli("interpolate", *model, "--images", str(tmp_path / "x.npy"), "--steps", "0", "--out", "i.png") == 2
    assert "--steps must be at least 2 (the two ends), got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="steps must be at least 2"):
        lat.interpolate(tiny_model(), tiny_images(2), steps=1)
    with pytest.raises(ValueError, match="output must be one of mean, sample, got 'median'"):
        lat.decode(tiny_model(), [np.zeros((1, 4, 1, 1), np.float32)], output="median")


def test_a_file_that_predates_a_switch_reads_as_its_default_and_another_value_is_refused(tmp_path):
    """Architecture keys added after a file was written held their defaults then (e.g. width_change)."""
    vae = tiny_model()
    older = {key: vae.H[key] for key in ARCHITECTURE_KEYS if key not in ("width_change", "skip_wiring")}
    z = {f"z_{i:02d}": np.zeros((1, 4, r, r), np.float32) for i, r in enumerate((1, 4))}
    np.savez(tmp_path / "old.npz", format_version=1, preset="tiny", n_layers=2, hparams=json.dumps(older), **z)
    lat.check_fits(lat.load_latents(tmp_path / "old.npz"), vae)
    with pytest.raises(ValueError, match=r"width_change='pad'\), but this model .*width_change='conv'"):
        lat.check_fits(lat.load_latents(tmp_path / "old.npz"), tiny_model(width_change="conv"))
