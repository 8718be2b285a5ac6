"""The training program's own error: a problem a user can fix, found before training starts."""

from __future__ import annotations


class SetupError(RuntimeError):
    """A problem found before training starts (unwritable save_dir, too few images for a batch, ...)."""
