"""python -m vdvae_fast.sample on our checkpoints and official files, and the grid helpers the trainer uses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vdvae_fast import checkpoint, ops, sample
from vdvae_fast.hparams import preset
from vdvae_fast.model import VAE

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    H = preset("tiny")
    H.backend = "reference"
    return VAE(H)


def our_checkpoint(path: Path, model: VAE) -> Path:
    """The fields of a trainer checkpoint that sampling reads, the rest as a fresh run has them."""
    optimizer = torch.optim.AdamW(model.parameters())
    state = {
        "format": checkpoint.FORMAT,
        "version": checkpoint.VERSION,
        "model": model.state_dict(),
        "ema": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {},
        "step": 0,
        "epoch": 0,
        "batch_in_epoch": 0,
        "rng": [checkpoint.capture_rng_state(torch.device("cpu"))],
        "hparams": dict(model.H),
    }
    return checkpoint.save_checkpoint(state, path)


def test_cli_on_an_official_file_writes_a_png_of_the_right_size(tmp_path):
    official = tmp_path / "tiny-model-ema.th"
    torch.save(tiny_model().state_dict(), official)
    out = tmp_path / "grid" / "samples.png"
    result = subprocess.run(
        [sys.executable, "-m", "vdvae_fast.sample", "--restore_ema_path", str(official), "--hps", "tiny",
         "--n", "16", "--temperature", "0.9", "--out", str(out), "--backend", "reference"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == (4 * 64 + 3 * 4, 4 * 64 + 3 * 4)  # 16 samples of 8x8 upscaled 8x, 4x4, 4-pixel gaps


def test_cli_on_our_checkpoint_takes_its_hyperparameters(tmp_path, capsys):
    path = our_checkpoint(tmp_path / "latest.pt", tiny_model())
    out = tmp_path / "s.png"
    status = sample.main(["--restore_ema_path", str(tmp_path), "--n", "6", "--out", str(out), "--seed", "1"])
    assert status == 0 and "6 samples" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (3 * 64 + 2 * 4, 2 * 64 + 4)  # 6 samples: 3 columns, 2 rows
        first = np.asarray(image)
    sample.main(["--restore_ema_path", str(path), "--n", "6", "--out", str(out), "--seed", "1", "--n_batch", "4"])
    with Image.open(out) as image:
        assert np.asarray(image).shape == first.shape


def test_cli_errors_name_the_problem(tmp_path, capsys):
    """User errors exit with 2, the status of a bad flag (and of the training program's user errors)."""
    official = tmp_path / "x-model-ema.th"
    torch.save(tiny_model().state_dict(), official)
    assert sample.main(["--restore_ema_path", str(official), "--out", str(tmp_path / "a.png")]) == 2
    assert "--hps" in capsys.readouterr().err
    assert sample.main(["--restore_ema_path", str(official), "--hps", "demo", "--out", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert "x-model-ema.th" in err and "shape" in err
    assert sample.main(["--restore_ema_path", str(tmp_path / "none.pt"), "--hps", "tiny"]) == 2
    assert "none.pt" in capsys.readouterr().err


def test_cli_refuses_an_unknown_backend_and_lists_the_backends(tmp_path, capsys):
    official = tmp_path / "tiny-model-ema.th"
    torch.save(tiny_model().state_dict(), official)
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--restore_ema_path", str(official), "--hps", "tiny", "--backend", "fast"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--backend" in err and "'fast'" in err and all(name in err for name in ops.BACKENDS)
    assert not (tmp_path / "samples.png").exists()


def test_cli_backend_applies_to_the_model(tmp_path, monkeypatch):
    """--backend is the model's backend from construction on, whatever the checkpoint's hparams say."""
    path = our_checkpoint(tmp_path / "latest.pt", tiny_model())
    built = []
    monkeypatch.setattr(sample, "VAE", lambda H, **kwargs: built.append(VAE(H, **kwargs)) or built[-1])
    status = sample.main(["--restore_ema_path", str(path), "--n", "2", "--out", str(tmp_path / "s.png"),
                          "--backend", "original"])  # fmt: skip
    assert status == 0 and built[0].backend == "original" and built[0].H.backend == "reference"


def cell(grid: np.ndarray, row: int, column: int, size: int = 64, gap: int = 4) -> np.ndarray:
    """The image at (row, column) of a grid of size-pixel cells `gap` pixels apart."""
    y, x = row * (size + gap), column * (size + gap)
    return grid[y : y + size, x : x + size]


def test_stack_rows_is_vdvaes_layout_upscaled_with_gaps():
    rows = [np.full((3, 2, 2, 3), value, np.uint8) for value in (10, 20)]
    rows[0][1] = 99  # second image of the first row
    rows[1][2, 0, 1] = 7  # one pixel of the last image of the second row: upscaled to a 32x32 block
    grid = sample.stack_rows(rows)
    assert grid.shape == (2 * 64 + 4, 3 * 64 + 2 * 4, 3)  # 2-pixel images upscaled 32x to 64, 4-pixel gaps
    assert (cell(grid, 0, 1) == 99).all() and (cell(grid, 0, 0) == 10).all() and (cell(grid, 0, 2) == 10).all()
    last = cell(grid, 1, 2)
    assert (last[:32, 32:] == 7).all() and (last[32:] == 20).all() and (last[:32, :32] == 20).all()
    assert (grid[64:68] == 255).all() and (grid[:, 64:68] == 255).all() and (grid[:, 132:136] == 255).all()
    with pytest.raises(ValueError, match="same image count"):
        sample.stack_rows([rows[0], rows[1][:2]])


def test_large_images_are_not_upscaled_but_still_spaced():
    grid = sample.stack_rows([np.full((2, 100, 80, 3), 5, np.uint8)])
    assert grid.shape == (100, 2 * 80 + 4, 3) and (grid[:, 80:84] == 255).all() and (grid[:, 84:] == 5).all()


def test_tile_fills_rows_and_pads_with_black():
    images = np.stack([np.full((2, 2, 3), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = sample.tile(images, columns=2)
    assert grid.shape == (3 * 64 + 2 * 4, 2 * 64 + 4, 3)
    assert (cell(grid, 0, 1) == 20).all() and (cell(grid, 2, 0) == 50).all() and (cell(grid, 2, 1) == 0).all()
    with pytest.raises(ValueError, match="columns must be at least 1, got -2"):
        sample.tile(images, columns=-2)


def test_cli_writes_into_the_checkpoints_run_folder_unless_told_otherwise(tmp_path, monkeypatch, capsys):
    run_folder = tmp_path / "saved_models" / "demo"
    run_folder.mkdir(parents=True)
    path = our_checkpoint(run_folder / "iter-10.pt", tiny_model())
    our_checkpoint(run_folder / "latest.pt", tiny_model())
    monkeypatch.chdir(tmp_path)
    assert sample.main(["--restore_ema_path", str(path), "--n", "2", "--temperature", "0.5"]) == 0
    assert (run_folder / "samples-iter-10-t0.5-seed0.png").exists()
    assert sample.main(["--restore_ema_path", str(run_folder), "--n", "2", "--seed", "3"]) == 0
    assert (run_folder / "samples-latest-t1-seed3.png").exists()
    assert not list(tmp_path.glob("*.png"))  # nothing in the working directory
    assert "samples-latest-t1-seed3.png" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "inf"], "--temperature must be a finite number at least 0, got inf"),
        (["--temperature", "nan"], "--temperature must be a finite number at least 0, got nan"),
        (["--temperature", "-0.5"], "--temperature must be a finite number at least 0, got -0.5"),
        (["--n_batch", "-1"], "--n_batch must be at least 1, got -1"),
        (["--columns", "-2"], "--columns must be at least 1, got -2"),
        (["--n", "0"], "--n must be at least 1, got 0"),
        (["--seed", "-1"], "--seed must be at least 0, got -1"),
        (["--device", "bogus"], "--device must be auto, cpu, cuda or cuda:N (N a GPU index), got 'bogus'"),
    ],
)
def test_cli_refuses_bad_values_before_writing_anything(tmp_path, capsys, flags, message):
    path = our_checkpoint(tmp_path / "latest.pt", tiny_model())
    out = tmp_path / "out.png"
    assert sample.main(["--restore_ema_path", str(path), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"sample: error: {message}\n" and not out.exists()


def test_cli_refuses_an_output_that_is_a_directory_or_cannot_be_written(tmp_path, capsys):
    path = our_checkpoint(tmp_path / "latest.pt", tiny_model())
    assert sample.main(["--restore_ema_path", str(path), "--out", str(tmp_path)]) == 2
    assert "is a directory: give the path of the .png file to write" in capsys.readouterr().err
    unwritable = Path("/sys/samples.png")  # sysfs refuses new files, even to root
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux's /sys")
    assert sample.main(["--restore_ema_path", str(path), "--out", str(unwritable)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sample: error: --out '/sys/samples.png': cannot write in '/sys'") and err.count("\n") == 1


def test_training_grid_rows():
    """Originals, num_variables_visualize reconstructions, num_temperatures_visualize sample rows."""
    model = tiny_model()
    H = model.H.copy()
    H.update(num_variables_visualize=2, num_temperatures_visualize=4)
    originals = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    x = (originals.float() - 116.2) / 69.4
    rows = sample.reconstruction_rows(model, originals, x, H)
    assert len(rows) == 1 + 2 + 4
    assert all(r.shape == (3, 8, 8, 3) and r.dtype == np.uint8 for r in rows)
    assert np.array_equal(rows[0], originals.numpy())


def test_cli_takes_a_temperature_per_layer_or_a_schedule(tmp_path, capsys):
    """tiny has 7 stochastic layers. Temperature 0 everywhere, written three ways, draws the same grid (the prior
    means, then the DMoL draw of the same seed); a schedule names its file after itself."""
    path = our_checkpoint(tmp_path / "latest.pt", tiny_model())
    grids = []
    for temperature in ("0", "0,0,0,0,0,0,0", "linear:0:0"):
        out = tmp_path / f"{len(grids)}.png"
        assert sample.main(["--restore_ema_path", str(path), "--n", "4", "--out", str(out),
                            "--temperature", temperature]) == 0  # fmt: skip
        with Image.open(out) as image:
            grids.append(np.asarray(image))
    assert np.array_equal(grids[0], grids[1]) and np.array_equal(grids[0], grids[2])
    assert sample.main(["--restore_ema_path", str(tmp_path), "--n", "2", "--temperature", "linear:1.0:0.6"]) == 0
    assert (tmp_path / "samples-latest-tlinear1-0.6-seed0.png").exists()
    assert "at temperature linear:1.0:0.6" in capsys.readouterr().out
    assert sample.main(["--restore_ema_path", str(path), "--out", str(tmp_path / "x.png"),
                        "--temperature", "1,0.5"]) == 2  # fmt: skip
    assert "--temperature lists 2 values but the model has 7 stochastic layers" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
