"""Checkpoint files: atomic writes that survive a kill, clear errors for damaged or foreign files, RNG states."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from vdvae_fast import checkpoint
from vdvae_fast.checkpoint import CheckpointError
from vdvae_fast.hparams import preset
from vdvae_fast.model import VAE

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, **changes) -> VAE:
    torch.manual_seed(seed)
    H = preset("tiny")
    H.update(changes)
    return VAE(H)


def training_state(model: VAE, step: int = 7) -> dict:
    """A checkpoint as the trainer writes it, for a model that never trained."""
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    return {
        "format": checkpoint.FORMAT,
        "version": checkpoint.VERSION,
        "model": model.state_dict(),
        "ema": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": None,
        "step": step,
        "epoch": 0,
        "batch_in_epoch": step,
        "skipped_updates": 0,
        "rng": [checkpoint.capture_rng_state(torch.device("cpu"))],
        "world_size": 1,
        "hparams": dict(model.H),
    }


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model()
    path = checkpoint.save_checkpoint(training_state(model), tmp_path / "latest.pt")
    state = checkpoint.load_checkpoint(tmp_path)  # a run directory means its latest.pt
    assert state["path"] == str(path) and state["step"] == 7 and state["hparams"]["width"] == 16
    other = tiny_model(seed=1)
    checkpoint.load_module_state(other, state["model"], state["path"], "model")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True))
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file became latest.pt


def test_a_process_killed_while_writing_leaves_the_previous_checkpoint(tmp_path):
    """The writer is stopped for good between writing the temporary file and renaming it (os.fsync blocks)."""
    path = tmp_path / "latest.pt"
    checkpoint.save_checkpoint({"format": "old", "value": torch.arange(3)}, path)
    script = textwrap.dedent(f"""
        import os, sys, time, torch
        from vdvae_fast import checkpoint
        def stuck(fd):
            print("writing", flush=True)
            time.sleep(600)
        os.fsync = stuck
        checkpoint.save_checkpoint({{"format": "new", "value": torch.zeros(1_000_000)}}, {str(path)!r})
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout.readline().strip() == "writing"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    (temporary,) = tmp_path.glob(".latest.pt.*.tmp")  # the new bytes, never renamed
    assert temporary.stat().st_size > 1_000_000
    old = torch.load(path, weights_only=True)
    assert old["format"] == "old" and torch.equal(old["value"], torch.arange(3))
    assert checkpoint.remove_stale_temporaries(tmp_path) == [temporary] and not temporary.exists()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    checkpoint.save_checkpoint({"value": 1}, path)

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint({"value": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"value": 1}
    assert not list(tmp_path.glob(".*.tmp"))


def test_truncated_checkpoint_names_the_file(tmp_path):
    path = checkpoint.save_checkpoint(training_state(tiny_model()), tmp_path / "iter-7.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"iter-7\.pt.*truncated or corrupt"):
        checkpoint.load_checkpoint(path)


def test_corrupt_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "latest.pt"
    path.write_bytes(b"PK\x03\x04" + np.random.RandomState(0).bytes(4096))  # a zip archive's start, then noise
    with pytest.raises(CheckpointError, match=r"latest\.pt.*truncated or corrupt"):
        checkpoint.load_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        checkpoint.load_checkpoint(tmp_path / "nothing.pt")


def test_mismatched_checkpoint_names_the_file_and_the_first_key_and_shapes(tmp_path):
    path = checkpoint.save_checkpoint(training_state(tiny_model(width=24)), tmp_path / "wide.pt")
    state = checkpoint.load_checkpoint(path)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_module_state(tiny_model(), state["model"], state["path"], "the model weights")
    message = str(err.value)
    assert "wide.pt" in message and "encoder.in_conv.weight" in message and "(24, 3, 3, 3)" in message

    fewer = {k: v for k, v in state["model"].items() if not k.startswith("decoder.out_net")}
    with pytest.raises(CheckpointError, match=r"wide\.pt.*missing.*decoder\.out_net"):
        checkpoint.load_module_state(tiny_model(width=24), fewer, state["path"], "the model weights")


def test_other_files_are_refused_with_a_hint(tmp_path):
    official = tmp_path / "cifar10-model-ema.th"
    torch.save(tiny_model().state_dict(), official)
    with pytest.raises(CheckpointError, match=r"not a vdvae_fast training checkpoint.*--restore_ema_path"):
        checkpoint.load_checkpoint(official)
    stale = training_state(tiny_model())
    del stale["optimizer"]
    checkpoint.save_checkpoint(stale, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="lacks the entries optimizer"):
        checkpoint.load_checkpoint(tmp_path / "old.pt")


def test_official_state_dicts_load_with_or_without_the_ddp_prefix(tmp_path):
    source = tiny_model(seed=2)
    path = tmp_path / "tiny-model-ema.th"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    target = tiny_model(seed=3)
    assert checkpoint.load_weights(target, path) is None  # None: not one of our checkpoints
    assert all(
        torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True)
    )

    ours = checkpoint.save_checkpoint(training_state(source), tmp_path / "latest.pt")
    weights, state = checkpoint.read_weights(ours, prefer_ema=True)
    assert state["step"] == 7 and set(weights) == set(source.state_dict())


def test_rng_states_round_trip():
    cpu = torch.device("cpu")
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    state = checkpoint.capture_rng_state(cpu)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    checkpoint.restore_rng_state(state, cpu)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


class Parts:
    """A run's parts as the trainer holds them (vdvae_fast.training.Learner has the same attributes)."""

    def __init__(self, seed: int, fp16: bool = False) -> None:
        self.model = tiny_model(seed)
        self.ema = tiny_model(seed + 100)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda i: min(1.0, (i + 1) / 10))
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**seed) if fp16 else None


def test_make_and_restore_training_round_trip(tmp_path):
    source = Parts(seed=1, fp16=True)
    source.model(*[torch.zeros(2, 8, 8, 3)] * 2)["elbo"].backward()
    source.optimizer.step()
    source.scheduler.step()
    position = checkpoint.Position(step=12, epoch=1, batch_in_epoch=3, skipped_updates=2)
    rng = [checkpoint.capture_rng_state(torch.device("cpu"))] * 2
    state = checkpoint.make_checkpoint(source, position, rng, source.model.H)
    assert state["world_size"] == 2 and state["format"] == checkpoint.FORMAT
    checkpoint.save_checkpoint(state, tmp_path / "latest.pt")

    loaded = checkpoint.load_checkpoint(tmp_path)
    target = Parts(seed=2, fp16=True)
    assert checkpoint.restore_training(loaded, target) == position
    for a, b in ((source.model, target.model), (source.ema, target.ema)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert target.scheduler.get_last_lr() == source.scheduler.get_last_lr()
    assert target.scaler.get_scale() == source.scaler.get_scale() == 2.0
    assert checkpoint.saved_hparams(loaded) == source.model.H


def test_restore_training_names_the_file_when_the_optimizer_does_not_fit(tmp_path):
    source = Parts(seed=0)
    rng = [checkpoint.capture_rng_state(torch.device("cpu"))]
    state = checkpoint.make_checkpoint(source, checkpoint.Position(), rng, source.model.H)
    state["optimizer"]["param_groups"][0]["params"] = [0]  # one parameter where the model has many
    checkpoint.save_checkpoint(state, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"optimizer state in .*odd\.pt.* does not match"):
        checkpoint.restore_training(checkpoint.load_checkpoint(tmp_path / "odd.pt"), Parts(seed=0))


def test_saved_hparams_refuse_unknown_keys(tmp_path):
    state = training_state(tiny_model())
    state["hparams"]["widht"] = 3
    checkpoint.save_checkpoint(state, tmp_path / "typo.pt")
    with pytest.raises(CheckpointError, match=r"typo\.pt.*'widht'"):
        checkpoint.saved_hparams(checkpoint.load_checkpoint(tmp_path / "typo.pt"))
