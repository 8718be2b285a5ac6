"""The run folder save_dir/desc/: where a run's log, checkpoints and sample grids go."""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint import remove_stale_temporaries
from ..hparams import Hyperparams
from ..runtime import Runtime
from .errors import SetupError

__all__ = ["prepare_run_directory", "run_directory"]


def run_directory(H: Hyperparams) -> Path:
    """save_dir/desc, as in VDVAE."""
    return Path(H.save_dir).expanduser() / str(H.desc)


def prepare_run_directory(H: Hyperparams, runtime: Runtime) -> Path:
    """Create the run directory and prove it writable now, rather than fail at the first checkpoint."""
    directory = run_directory(H)
    if runtime.is_main:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise SetupError(
                f"cannot write to the run directory {str(directory)!r} (save_dir {H.save_dir!r} / desc {H.desc!r}): "
                f"{err.strerror or err}. Choose a writable --save_dir."
            ) from err
        remove_stale_temporaries(directory)
    return directory
