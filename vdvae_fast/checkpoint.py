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
    trainer_state        what the trainer keeps beyond the parts above (the skip watchdog's count and threshold,
                         the spectral regularization's vectors): a dict, {} when there is nothing (optional)
    checksums            SHA-256 of every tensor above (dtype, shape and bytes), keyed by its place in the dict

Loading verifies the checksums (a bit flipped on disk or in a copy is named, not trained on), the fields a
hand edit can break (step, rng, hparams, ...), and, before weights go into a model, that they are finite.
Checkpoints written before checksums existed still load; ``checkpoint["verified"]`` is False for them.

Writes go to a temporary file in the target's directory, are flushed and fsynced, then renamed over the
target (``os.replace`` is atomic on POSIX) and the directory is fsynced: a process killed mid-write leaves
the previous checkpoint intact, never half a file. A temporary's name says which host and process wrote it
(``.latest.pt.vdvae-tmp.<host>.<pid>.<random>.tmp``), so that only those of dead processes are cleaned up.

This module owns the format: ``make_checkpoint`` builds the dict above from a run's parts, ``load_checkpoint``
checks it, ``restore_training`` puts it back into the parts, and ``load_module_state`` is the one strict loader
of a state dict (ours or an official openai/vdvae file) used by training, evaluation and sampling.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import random
import re
import socket
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
_TEMP_MARK = ".vdvae-tmp."
_TEMP_PATTERN = re.compile(
    re.escape(_TEMP_MARK) + r"(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+" + re.escape(_TEMP_SUFFIX) + "$"
)
_COUNTS = ("step", "epoch", "batch_in_epoch", "skipped_updates")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format is a zip archive

__all__ = [
    "FORMAT",
    "LATEST",
    "CheckpointError",
    "Position",
    "TrainingParts",
    "capture_rng_state",
    "checkpoint_folder",
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
    "tensor_checksums",
    "write_probe",
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
    parts: TrainingParts,
    position: Position,
    rng: list[dict[str, Any]],
    hparams: Mapping[str, Any],
    trainer_state: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint of a run (the schema above), its tensors on the CPU and sealed with their checksums;
    `rng` holds one capture_rng_state per rank."""
    state = _on_cpu({
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
        "trainer_state": dict(trainer_state or {}),
    })  # fmt: skip
    state["checksums"] = tensor_checksums(state)
    return state


def _on_cpu(value: Any) -> Any:
    """`value` with every tensor on the CPU (the one device-to-host copy a save makes anyway)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    return value


def _tensors(value: Any, place: str) -> list[tuple[str, torch.Tensor]]:
    """Every tensor in nested dicts, lists and tuples, with its place: ``model/decoder.out_net.weight``."""
    if isinstance(value, torch.Tensor):
        return [(place, value)]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return []
    return [found for key, item in items for found in _tensors(item, f"{place}/{key}" if place else str(key))]


def tensor_checksums(state: Mapping[str, Any]) -> dict[str, str]:
    """SHA-256 of each tensor of a checkpoint (its dtype, shape and bytes), by place; the entries that are not
    saved data (checksums, and the path and verified flag a load adds) are left out."""
    saved = {key: value for key, value in state.items() if key not in ("checksums", "path", "verified")}
    checksums = {}
    for place, tensor in _tensors(saved, ""):
        digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        checksums[place] = digest.hexdigest()
    return checksums


def restore_training(checkpoint: Mapping[str, Any], parts: TrainingParts) -> Position:
    """Load a checkpoint's weights and optimizer state into `parts`; returns its position. A mismatch raises
    CheckpointError naming the file."""
    path = checkpoint["path"]
    load_module_state(parts.model, checkpoint["model"], path, "the model weights")
    load_module_state(parts.ema, checkpoint["ema"], path, "the EMA weights")
    _refuse_nonfinite(dict(_tensors(checkpoint["optimizer"], "")), path, "the optimizer state")
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
    fd, temp = _temporary(path.parent, path.name)
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


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _temporary(directory: Path, name: str) -> tuple[int, str]:
    """A new temporary file for `name` in `directory`, named by this host and process: (descriptor, path)."""
    return tempfile.mkstemp(prefix=f".{name}{_TEMP_MARK}{_host()}.{os.getpid()}.", suffix=_TEMP_SUFFIX, dir=directory)


def _process_gone(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process has not started a write here yet (callers hold the run folder's lock)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, someone else's
    return False


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of writes killed midway: only files named as ours, by a process of this host
    that no longer runs (call before this run writes any). Other hidden files, and temporaries of live or
    other hosts' processes, are left alone."""
    removed = []
    host = _host()
    for temp in sorted(Path(directory).glob(f".*{_TEMP_MARK}*{_TEMP_SUFFIX}")):
        match = _TEMP_PATTERN.search(temp.name)
        if match and match["host"] == host and _process_gone(int(match["pid"])) and temp.is_file():
            with contextlib.suppress(OSError):
                temp.unlink()
                removed.append(temp)
    return removed


def write_probe(directory: str | os.PathLike, size: int = 1 << 20) -> None:
    """Write `size` random bytes to a temporary in `directory`, fsync them and delete the file: proof that the
    folder takes real data now (a full disk or quota fails here, not at the first checkpoint). Raises OSError
    with the temporary's name."""
    fd, temp = _temporary(Path(directory), "write-test")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(size))
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        err.filename = err.filename or temp
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _read(path: Path) -> Any:
    """torch.load with weights_only; a failure says whether the file is a damaged archive or not one at all."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(8)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):  # damage, not an object weights_only refused
            raise _unreadable(path, head, err) from err
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f" ({found[1]})" if found else ""
        raise CheckpointError(
            f"{str(path)!r} is not a checkpoint: it holds Python objects other than tensors, numbers, strings and "
            f"containers{what}, and is refused unread since loading such a file can run code"
        ) from err
    except Exception as err:  # torch raises many types for a damaged zip or pickle; all mean the same here
        raise _unreadable(path, head, err) from err


def _unreadable(path: Path, head: bytes, err: Exception) -> CheckpointError:
    """A file torch.load fails on: a damaged zip archive, or a file of another kind (judged by its first bytes)."""
    if not head.startswith(_ZIP_MAGIC):
        return CheckpointError(
            f"{str(path)!r} is not a checkpoint: torch.save writes a zip archive, this file starts with {head!r}"
        )
    return CheckpointError(
        f"cannot read checkpoint {str(path)!r}: the file is truncated or corrupt ({type(err).__name__}: {err})"
    )


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
    _check_fields(state, path)
    state["verified"] = _verify_checksums(state, path)
    state["path"] = str(path)
    return state


def _verify_checksums(state: dict[str, Any], path: Path) -> bool:
    """Compare every tensor with the checksum saved beside it; False for a file written before checksums."""
    saved = state.get("checksums")
    if saved is None:
        return False
    found = tensor_checksums(state)
    if not isinstance(saved, dict):
        raise _field_error(path, "checksums", f"must be a dict, got a {type(saved).__name__}")
    unmatched = sorted(set(saved) ^ set(found))
    if unmatched:
        where = "has no checksum" if unmatched[0] in found else "is missing from the file"
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: tensor {unmatched[0]!r} {where}")
    for place, digest in found.items():
        if saved[place] != digest:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is damaged: the data of tensor {place!r} does not match its checksum "
                "(changed on disk or in a copy); resume from another checkpoint, e.g. an iter-N.pt"
            )
    return True


def _field_error(path: Path, key: str, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r}: field {key!r} {problem} (the file was edited or damaged)")


def _check_fields(state: dict[str, Any], path: Path) -> None:
    """The fields a hand edit can break, each checked here so that a resume fails with the field's name."""
    for key in _COUNTS:
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _field_error(path, key, f"must be a whole number >= 0, got {value!r}")
    hparams = state["hparams"]
    if not isinstance(hparams, dict) or not all(isinstance(key, str) for key in hparams):
        raise _field_error(path, "hparams", f"must be a dict of hyperparameters, got a {type(hparams).__name__}")
    trainer_state = state.get("trainer_state", {})
    if not isinstance(trainer_state, dict):
        raise _field_error(path, "trainer_state", f"must be a dict, got a {type(trainer_state).__name__}")
    rng = state["rng"]
    world_size = state.get("world_size", len(rng) if isinstance(rng, list) else 1)
    if not isinstance(rng, list) or not rng or len(rng) != world_size:
        raise _field_error(path, "rng", f"must be a list of one generator state per process ({world_size})")
    current = capture_rng_state(torch.device("cpu"))
    try:
        for rank, entry in enumerate(rng):
            try:
                restore_rng_state(entry, torch.device("cpu"))
            except Exception as err:  # a wrong type or size raises anything from TypeError to RuntimeError
                problem = f"entry {rank} is not a generator state ({type(err).__name__}: {err})"
                raise _field_error(path, "rng", problem) from err
    finally:
        restore_rng_state(current, torch.device("cpu"))


def checkpoint_folder(path: str | os.PathLike) -> Path | None:
    """The run folder a --restore_path belongs to: the folder itself, or the folder of a vdvae_fast checkpoint
    file; None for any other file (an official state dict, or one that load_checkpoint will refuse). Reads
    only the file's small index, not its tensor data."""
    path = Path(path).expanduser()
    if path.is_dir():
        return path
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # whatever the file is, it is not a checkpoint whose folder a run continues in
        return None
    return path.parent if isinstance(state, dict) and state.get("format") == FORMAT else None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (a file, or a run directory meaning its latest.pt) and check its format."""
    path = _resolve(path)
    return _check_format(_read(path), path)


def load_module_state(module: nn.Module, state: Any, path: str, what: str) -> None:
    """Load a state dict strictly; a mismatch names the file and the first missing, extra or misshapen key."""
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{what} in {path!r} is not a state dict of tensors")
    _refuse_nonfinite(state, path, what)
    try:
        load_official_state_dict(module, state)
    except ValueError as err:
        raise CheckpointError(f"{what} in {path!r}: {err}") from err


def _refuse_nonfinite(tensors: Mapping[str, torch.Tensor], path: str, what: str) -> None:
    """Weights or optimizer moments with NaN or Inf would make every update non-finite: name the first."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{what} in {path!r} are not finite: {name!r} has {count} NaN or Inf values (the run diverged "
                "before this save); resume from an earlier checkpoint, e.g. an iter-N.pt"
            )


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
