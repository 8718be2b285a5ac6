"""Training checkpoints: one file per save holding everything a run needs to continue, written atomically.

A checkpoint is a dict saved with ``torch.save`` and read back with ``weights_only=True`` (tensors, numbers,
strings and containers only: loading one never runs code)::

    format, version      "vdvae_fast-checkpoint", 1
    model, ema           state dicts of the VAE and of its EMA copy
    optimizer, scheduler, scaler   AdamW, the warmup schedule, fp16's GradScaler (None otherwise)
    step, epoch, batch_in_epoch    updates done, and where in which epoch's data order they stopped
    skipped_updates      updates skipped so far (gradient norm above the skip threshold, or a NaN rate/distortion)
    rng                  one entry per rank: torch CPU and CUDA, numpy and python generator states
    hparams              the run's hyperparameters, as a plain dict

Writes go to a temporary file in the target's directory, are flushed and fsynced, then renamed over the
target (``os.replace`` is atomic on POSIX) and the directory is fsynced: a process killed mid-write leaves
the previous checkpoint intact, never half a file.

This module owns the format: ``make_checkpoint`` builds the dict above from a run's parts, ``load_checkpoint``
checks it, ``restore_training`` puts it back into the parts, and ``load_module_state`` is the one strict loader
of a state dict (ours or an official openai/vdvae file) used by training, evaluation and sampling.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .hparams import Hyperparams
from .model import load_official_state_dict

FORMAT = "vdvae_fast-checkpoint"
VERSION = 1
LATEST = "latest.pt"
_REQUIRED = ("model", "ema", "optimizer", "scheduler", "step", "epoch", "batch_in_epoch", "rng", "hparams")
_TEMP_SUFFIX = ".tmp"

__all__ = [
    "FORMAT",
    "LATEST",
    "CheckpointError",
    "Position",
    "TrainingParts",
    "capture_rng_state",
    "load_checkpoint",
    "load_module_state",
    "load_weights",
    "make_checkpoint",
    "read_weights",
    "remove_stale_temporaries",
    "restore_rng_state",
    "restore_training",
    "save_checkpoint",
    "saved_hparams",
]


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: unreadable, not ours, or not matching the model."""


@dataclass
class Position:
    """Where a run stands: updates done (skipped ones included) over all resumes, the epoch, the batches of that
    epoch's order already consumed, and the updates skipped so far."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_updates: int = 0


class TrainingParts(Protocol):
    """What a checkpoint saves of a run besides its position: the VAE, its EMA copy, AdamW, the warmup schedule
    and fp16's GradScaler (None otherwise)."""

    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None


def make_checkpoint(
    parts: TrainingParts, position: Position, rng: list[dict[str, Any]], hparams: Mapping[str, Any]
) -> dict[str, Any]:
    """The checkpoint of a run (the schema above); `rng` holds one capture_rng_state per rank."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": parts.model.state_dict(),
        "ema": parts.ema.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": None if parts.scaler is None else parts.scaler.state_dict(),
        "step": position.step,
        "epoch": position.epoch,
        "batch_in_epoch": position.batch_in_epoch,
        "skipped_updates": position.skipped_updates,
        "rng": rng,
        "world_size": len(rng),
        "hparams": dict(hparams),
    }


def restore_training(checkpoint: Mapping[str, Any], parts: TrainingParts) -> Position:
    """Load a checkpoint's weights and optimizer state into `parts`; returns its position. A mismatch raises
    CheckpointError naming the file."""
    path = checkpoint["path"]
    load_module_state(parts.model, checkpoint["model"], path, "the model weights")
    load_module_state(parts.ema, checkpoint["ema"], path, "the EMA weights")
    try:
        parts.optimizer.load_state_dict(checkpoint["optimizer"])
        parts.scheduler.load_state_dict(checkpoint["scheduler"])
        if parts.scaler is not None and checkpoint.get("scaler"):
            parts.scaler.load_state_dict(checkpoint["scaler"])
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"the optimizer state in {path!r} does not match this model: {err}") from err
    return Position(
        int(checkpoint["step"]),
        int(checkpoint["epoch"]),
        int(checkpoint["batch_in_epoch"]),
        int(checkpoint.get("skipped_updates", 0)),
    )


def saved_hparams(checkpoint: Mapping[str, Any]) -> Hyperparams:
    """The hyperparameters a checkpoint was trained with."""
    try:
        return Hyperparams(checkpoint["hparams"])
    except (AttributeError, TypeError, ValueError) as err:
        raise CheckpointError(f"the hyperparameters in {checkpoint['path']!r} are not readable: {err}") from err


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable: fsync the directory entry (not supported everywhere; then best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write `state` to `path` atomically: a reader sees the old file or the new one, never a partial one."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_directory(path.parent)
    return path


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files left by writes that were killed midway (call before this run writes any)."""
    removed = []
    for temp in Path(directory).glob(f".*{_TEMP_SUFFIX}"):
        if temp.is_file():
            with contextlib.suppress(OSError):
                temp.unlink()
                removed.append(temp)
    return removed


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _read(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged zip or pickle; all mean the same here
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: the file is truncated or corrupt ({type(err).__name__}: {err})"
        ) from err


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    return path / LATEST if path.is_dir() else path


def _check_format(state: Any, path: Path) -> dict[str, Any]:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a vdvae_fast training checkpoint (written by vdvae_fast.train); an official "
            "openai/vdvae *-model-ema.th file is loaded with --restore_ema_path instead"
        )
    if state.get("version") != VERSION:
        raise CheckpointError(f"{str(path)!r} has checkpoint version {state.get('version')}; this code reads {VERSION}")
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks the entries {', '.join(missing)}")
    state["path"] = str(path)
    return state


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (a file, or a run directory meaning its latest.pt) and check its format."""
    path = _resolve(path)
    return _check_format(_read(path), path)


def load_module_state(module: nn.Module, state: Any, path: str, what: str) -> None:
    """Load a state dict strictly; a mismatch names the file and the first missing, extra or misshapen key."""
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{what} in {path!r} is not a state dict of tensors")
    try:
        load_official_state_dict(module, state)
    except ValueError as err:
        raise CheckpointError(f"{what} in {path!r}: {err}") from err


def read_weights(path: str | os.PathLike, prefer_ema: bool = True) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Read weights for evaluation or sampling from our checkpoint (its EMA, or its model) or from an official
    openai/vdvae ``*-model.th`` / ``*-model-ema.th`` state dict: (state dict, our whole checkpoint or None)."""
    path = _resolve(path)
    state = _read(path)
    if isinstance(state, dict) and "format" in state:
        checkpoint = _check_format(state, path)
        return checkpoint["ema" if prefer_ema else "model"], checkpoint
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(state).__name__}, not a checkpoint or a state dict")
    return state, None


def load_weights(model: nn.Module, path: str | os.PathLike, prefer_ema: bool = True) -> dict[str, Any] | None:
    """Load read_weights(path) into `model`; returns our checkpoint (None for an official file)."""
    weights, checkpoint = read_weights(path, prefer_ema)
    what = "the state dict" if checkpoint is None else f"the {'ema' if prefer_ema else 'model'} weights"
    load_module_state(model, weights, str(_resolve(path)), what)
    return checkpoint


# --------------------------------------------------------------------------------------------
# Random number generators
# --------------------------------------------------------------------------------------------


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator the training stream draws from: torch's CPU generator (which also seeds the fused
    ops' Philox noise), the CUDA generator of `device`, numpy's and python's global generators."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }
    return state


def restore_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Put back what capture_rng_state recorded (the CUDA entry only where both sides are on CUDA)."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy["bit_generator"],
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
