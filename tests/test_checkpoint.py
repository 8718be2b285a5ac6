"""Checkpoint files: atomic writes that survive a kill, clear errors for damaged or foreign files, RNG states."""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import zipfile
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


# --------------------------------------------------------------------------------------------
# Checksums, non-finite weights, hand-edited fields, files of another kind
# --------------------------------------------------------------------------------------------


def _saved_checkpoint(tmp_path: Path, name: str = "latest.pt") -> Path:
    parts = Parts(seed=0)
    rng = [checkpoint.capture_rng_state(torch.device("cpu"))]
    state = checkpoint.make_checkpoint(parts, checkpoint.Position(step=3), rng, parts.model.H)
    return checkpoint.save_checkpoint(state, tmp_path / name)


def test_a_flipped_bit_in_a_tensor_is_found_and_named(tmp_path):
    """torch.save stores each tensor's bytes as a zip entry; one bit changed there loads without complaint
    from torch, and the checksum names the tensor."""
    path = _saved_checkpoint(tmp_path)
    assert checkpoint.load_checkpoint(path)["verified"] is True
    weight = checkpoint.load_checkpoint(path)["model"]["encoder.in_conv.weight"]
    with zipfile.ZipFile(path) as archive:  # the entry holding that tensor's bytes, and where its data start
        entry = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size == weight.nbytes)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[entry.header_offset + 26 : entry.header_offset + 30])
    start = entry.header_offset + 30 + name_length + extra_length
    data[start + 5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"latest\.pt.*damaged.*checksum"):
        checkpoint.load_checkpoint(path)


def test_a_checkpoint_without_checksums_still_loads_marked_unverified(tmp_path):
    path = checkpoint.save_checkpoint(training_state(tiny_model()), tmp_path / "old.pt")  # as written before
    state = checkpoint.load_checkpoint(path)
    assert state["verified"] is False and state["step"] == 7


def test_non_finite_weights_or_moments_are_refused_naming_the_tensor(tmp_path):
    parts = Parts(seed=0)
    with torch.no_grad():
        parts.ema.decoder.out_net.out_conv.weight[0, 0, 0, 0] = float("nan")
    rng = [checkpoint.capture_rng_state(torch.device("cpu"))]
    path = checkpoint.save_checkpoint(
        checkpoint.make_checkpoint(parts, checkpoint.Position(), rng, {}), tmp_path / "nan.pt"
    )
    with pytest.raises(CheckpointError, match=r"EMA weights in .*nan\.pt.*decoder\.out_net\.out_conv\.weight.*1 NaN"):
        checkpoint.restore_training(checkpoint.load_checkpoint(path), Parts(seed=1))

    parts = Parts(seed=0)
    parts.model(*[torch.zeros(2, 8, 8, 3)] * 2)["elbo"].backward()
    parts.optimizer.step()
    next(iter(parts.optimizer.state.values()))["exp_avg_sq"].fill_(float("inf"))
    path = checkpoint.save_checkpoint(
        checkpoint.make_checkpoint(parts, checkpoint.Position(), rng, {}), tmp_path / "inf.pt"
    )
    with pytest.raises(CheckpointError, match=r"optimizer state in .*inf\.pt.*exp_avg_sq"):
        checkpoint.restore_training(checkpoint.load_checkpoint(path), Parts(seed=1))


def _edit(state: dict, key: str, value) -> None:
    state[key] = value


@pytest.mark.parametrize(
    "field, edit",
    [
        ("rng", lambda s: _edit(s, "rng", [])),  # was an IndexError at the rank's entry
        ("rng", lambda s: _edit(s, "rng", "abc")),
        ("rng", lambda s: s["rng"][0].update(torch=torch.zeros(7, dtype=torch.uint8))),  # was a RuntimeError
        ("rng", lambda s: s["rng"][0].update(python=(3, (1, 2)))),
        ("rng", lambda s: _edit(s, "world_size", 2)),
        ("step", lambda s: _edit(s, "step", "30")),
        ("step", lambda s: _edit(s, "step", -1)),
        ("epoch", lambda s: _edit(s, "epoch", 1.5)),
        ("hparams", lambda s: _edit(s, "hparams", ["width", 16])),  # was an AttributeError
    ],
)
def test_hand_edited_fields_are_named_with_the_file(tmp_path, field, edit):
    path = _saved_checkpoint(tmp_path, "edited.pt")
    state = torch.load(path, weights_only=True)
    edit(state)
    state["checksums"] = checkpoint.tensor_checksums(state)  # an edit made with care; the fields still break
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"edited\.pt.*field {field!r}"):
        checkpoint.load_checkpoint(path)


def test_files_of_another_kind_are_called_so_not_corrupt(tmp_path):
    """A picture, a text file and a pickle of code are not damaged checkpoints, and torch's advice to load
    them with weights_only=False is not passed on."""
    png = tmp_path / "grid.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    text = tmp_path / "notes.pt"
    text.write_text("step 30: looks good\n")
    code = tmp_path / "code.pt"
    torch.save({"format": checkpoint.FORMAT, "hook": print}, code)
    for path in (png, text, code):
        with pytest.raises(CheckpointError) as err:
            checkpoint.load_checkpoint(path)
        message = str(err.value)
        assert str(path) in message and "is not a checkpoint" in message
        assert "weights_only" not in message and "corrupt" not in message
    with pytest.raises(CheckpointError, match=r"code\.pt.*\(.*print\)"):  # the object that was refused
        checkpoint.read_weights(code)


def test_checkpoint_folder_is_the_run_folder_of_our_checkpoints_only(tmp_path):
    (tmp_path / "run").mkdir()
    ours = _saved_checkpoint(tmp_path / "run", "iter-3.pt")
    assert checkpoint.checkpoint_folder(ours) == tmp_path / "run"
    assert checkpoint.checkpoint_folder(tmp_path / "run") == tmp_path / "run"
    official = tmp_path / "downloads" / "tiny-model.th"
    official.parent.mkdir()
    torch.save(tiny_model().state_dict(), official)
    assert checkpoint.checkpoint_folder(official) is None
    assert checkpoint.checkpoint_folder(tmp_path / "missing.pt") is None
