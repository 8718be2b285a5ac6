"""The run folder save_dir/desc/: where a run's log, checkpoints and sample grids go, and who may write there.

A run holds the folder's lock file (run.lock, an advisory ``fcntl.flock`` lock naming the process) for its
whole life, so a second run on the same folder refuses instead of deleting or overwriting the first one's
files. A fresh run never takes over a folder that already holds a run: only a run resuming one of that
folder's checkpoints does. If set-up fails after the folder was prepared, ``discard`` removes what this run
created there (the lock file, new log lines, the folder itself if it was new).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..checkpoint import remove_stale_temporaries, write_probe
from ..hparams import Hyperparams
from ..runtime import Runtime, all_gather_objects
from .errors import SetupError

__all__ = ["LOCK", "RunFolder", "holds_a_run", "prepare_run_directory", "run_directory"]

LOCK = "run.lock"
_LOGS = ("log.jsonl", "log.txt")


def run_directory(H: Hyperparams) -> Path:
    """save_dir/desc, as in VDVAE; desc must be a plain folder name, so that a run never writes outside save_dir."""
    desc = str(H.desc)
    if not desc or desc in (".", "..") or "/" in desc or (os.altsep and os.altsep in desc) or "\0" in desc:
        raise SetupError(
            f"--desc must be a plain folder name (the run's outputs go to --save_dir/desc), got {H.desc!r}: "
            "no '/', not '.' or '..'; give the parent folder with --save_dir"
        )
    return Path(H.save_dir).expanduser() / desc


def holds_a_run(directory: Path) -> list[str]:
    """The files that show a run used `directory` (its log, its checkpoints), sorted; empty for a new folder."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name == "log.jsonl" or p.suffix == ".pt")


class RunFolder:
    """A run folder in use by this process: locked for the run's life (close releases it), with what this run
    created recorded, so that discard can remove it when set-up fails. On ranks other than 0 it only names
    the folder."""

    def __init__(self, path: Path, created: list[Path] | None = None) -> None:
        self.path = path
        self._created = created or []  # the folders this run made, outermost first
        self._lock: int | None = None
        self._log_sizes: dict[str, int | None] = {}

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lock(self) -> None:
        """Take run.lock, or raise SetupError naming the process that holds it."""
        lock_path = self.path / LOCK
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip()
                os.close(fd)
                raise SetupError(_in_use(self.path, holder)) from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                    break  # not a file its last holder removed between our open and our lock
            os.close(fd)
        self._lock = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({**holder, "command": " ".join(sys.argv)}).encode())
        self._log_sizes = {name: _size(self.path / name) for name in _LOGS}

    def close(self) -> None:
        """Release the lock and remove run.lock (it exists only while a run uses the folder)."""
        if self._lock is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path / LOCK)
            os.close(self._lock)
            self._lock = None

    def discard(self) -> None:
        """Undo this run's traces after a failed set-up: log lines it appended (or the logs it created), the
        lock, and the folders it made if they are empty again."""
        if self._lock is not None:
            for name, size in self._log_sizes.items():
                with contextlib.suppress(OSError):
                    if size is None:
                        os.unlink(self.path / name)
                    else:
                        os.truncate(self.path / name, size)
        self.close()
        for directory in reversed(self._created):
            with contextlib.suppress(OSError):
                directory.rmdir()


def _size(path: Path) -> int | None:
    return path.stat().st_size if path.exists() else None


def _in_use(directory: Path, holder: str) -> str:
    try:
        info = json.loads(holder)
        who = f"process {info['pid']} on {info['host']} since {info['since']} ({info['command']})"
    except (ValueError, KeyError, TypeError):
        who = "another process"
    return f"the run folder {str(directory)!r} is in use by {who}: wait for that run to end, or choose another --desc"


def _make_directories(directory: Path) -> list[Path]:
    """mkdir -p, returning the folders it created, outermost first."""
    missing = []
    for folder in (directory, *directory.parents):
        if folder.exists():
            break
        missing.append(folder)
    directory.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _open(H: Hyperparams, resuming_from: Path | None) -> RunFolder:
    """Make, lock and check the folder on rank 0 (see prepare_run_directory)."""
    directory = run_directory(H)
    try:
        folder = RunFolder(directory, _make_directories(directory))
    except OSError as err:
        raise _unwritable(H, directory, err) from err
    try:
        folder.lock()
        held = holds_a_run(directory)
        ours = resuming_from is not None and resuming_from.resolve() == directory.resolve()
        if held and not ours:
            raise SetupError(
                f"the run folder {str(directory)!r} already holds a run ({', '.join(held)}): resume it with "
                f"--restore_path {directory}, or choose another --desc (or --save_dir)"
            )
        write_probe(directory)
        remove_stale_temporaries(directory)
    except OSError as err:
        folder.discard()
        raise _unwritable(H, directory, err) from err
    except BaseException:
        folder.discard()
        raise
    return folder


def _unwritable(H: Hyperparams, directory: Path, err: OSError) -> SetupError:
    where = f"at {err.filename}" if err.filename else "creating it"
    return SetupError(
        f"cannot write to the run directory {str(directory)!r} (save_dir {H.save_dir!r} / desc {H.desc!r}): "
        f"{err.strerror or err} ({where}). Free some space or choose a writable --save_dir."
    )


def prepare_run_directory(H: Hyperparams, runtime: Runtime, resuming_from: Path | None = None) -> RunFolder:
    """The run folder, made, locked and proven writable with real bytes before any work starts; its own stale
    temporaries removed. `resuming_from` is the folder of the checkpoint this run resumes (None for a fresh
    run): only then may the folder already hold a run. Rank 0 does the work; every rank raises its error."""
    directory = run_directory(H)
    folder, error = RunFolder(directory), None
    if runtime.is_main:
        try:
            folder = _open(H, resuming_from)
        except SetupError as err:
            error = str(err)
    errors = [message for message in all_gather_objects(error, runtime) if message]
    if errors:
        folder.discard()
        raise SetupError(errors[0])
    return folder
