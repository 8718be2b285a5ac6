"""``python -m vdvae_fast`` / the ``vdvae-fast`` console script: one entry point that runs each program."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vdvae_fast import __main__ as dispatch
from vdvae_fast.hparams import preset
from vdvae_fast.model import VAE

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_without_a_command_it_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "vdvae_fast"], capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr
    assert all(f"  {name}" in result.stdout for name in ("train", "sample", "latents", "analyze", "hparams", "bench"))


def test_an_unknown_command_exits_2_naming_the_commands(capsys):
    assert dispatch.main(["trian"]) == 2
    assert capsys.readouterr().err == (
        "vdvae-fast: error: unknown command 'trian'; choose one of train, sample, latents, analyze, hparams, bench\n"
    )


def test_train_gets_the_flags_and_returns_the_programs_status(tmp_path, capsys):
    status = dispatch.main(["train", "--hps", "tiny", "--save_dir", str(tmp_path), "--ema_rate", "2"])
    assert status == 2 and "--ema_rate must be a number in [0, 1), got 2.0" in capsys.readouterr().err


def test_sample_writes_the_grid(tmp_path, capsys):
    torch.manual_seed(0)
    official = tmp_path / "tiny-model-ema.th"
    torch.save(VAE(preset("tiny")).state_dict(), official)
    out = tmp_path / "grid.png"
    argv = ["sample", "--restore_ema_path", str(official), "--hps", "tiny", "--n", "2", "--out", str(out)]
    assert dispatch.main([*argv, "--backend", "reference"]) == 0 and out.exists()
    assert dispatch.main([*argv, "--n", "-1"]) == 2
    assert capsys.readouterr().err == "sample: error: --n must be at least 1, got -1\n"


def test_hparams_prints_the_reference_table(capsys):
    assert dispatch.main(["hparams"]) == 0
    out = capsys.readouterr().out
    assert "| `--grad_clip` | `200.0` | a finite number above 0 |" in out


def test_the_console_script_points_at_this_entry_point():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["vdvae-fast"].split(":")
    assert getattr(importlib.import_module(module), function) is dispatch.main
