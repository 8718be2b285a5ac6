"""The training program's own errors: problems a user can fix, each reported in one line."""

from __future__ import annotations


class SetupError(RuntimeError):
    """A problem found before training starts (unwritable save_dir, too few images for a batch, ...)."""


class OutputError(RuntimeError):
    """A run's output could not be written (a full disk, a quota, a read-only folder); the message names the
    file and the last good checkpoint."""
