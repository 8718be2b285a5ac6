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
        assert image.size == (4 * 8, 4 * 8)  # 16 samples of 8x8 in a 4x4 grid


def test_cli_on_our_checkpoint_takes_its_hyperparameters(tmp_path, capsys):
    path = our_checkpoint(tmp_path / "latest.pt", tiny_model())
    out = tmp_path / "s.png"
    status = sample.main(["--restore_ema_path", str(tmp_path), "--n", "6", "--out", str(out), "--seed", "1"])
    assert status == 0 and "6 samples" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (3 * 8, 2 * 8)  # 6 samples: 3 columns, 2 rows
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


def test_stack_rows_is_vdvaes_layout():
    rows = [np.full((3, 2, 2, 3), value, np.uint8) for value in (10, 20)]
    rows[0][1] = 99  # second image of the first row
    grid = sample.stack_rows(rows)
    assert grid.shape == (2 * 2, 3 * 2, 3)
    assert (grid[:2, 2:4] == 99).all() and (grid[:2, :2] == 10).all() and (grid[2:] == 20).all()
    with pytest.raises(ValueError, match="same image count"):
        sample.stack_rows([rows[0], rows[1][:2]])


def test_tile_fills_rows_and_pads_with_black():
    images = np.stack([np.full((2, 2, 3), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = sample.tile(images, columns=2)
    assert grid.shape == (3 * 2, 2 * 2, 3)
    assert (grid[:2, 2:] == 20).all() and (grid[4:, :2] == 50).all() and (grid[4:, 2:] == 0).all()


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
