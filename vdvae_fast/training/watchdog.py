"""The skip watchdog: a run that skips update after update is noticed, and acted on, instead of stalling forever.

After `iters` consecutive skipped updates (and again after every `iters` more) it fires: the trainer warns and
takes the chosen action: "warn" only, "raise_threshold" (skip_threshold times a factor), "lower_lr" (the
learning rate times a factor, from then on) or "stop" (save latest.pt, then raise StalledRunError). Every process
sees the same skip decisions (they are all-reduced), so every process fires at the same update.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..hparams import FIELDS, Hyperparams
from .step import Learner

__all__ = ["WATCHDOG_ACTIONS", "SkipWatchdog", "StalledRunError", "scale_learning_rate"]

WATCHDOG_ACTIONS: tuple[str, ...] = FIELDS["skip_watchdog_action"].choices


class StalledRunError(RuntimeError):
    """The skip watchdog stopped a run that skipped too many updates in a row; the message says what to try."""


@dataclass
class SkipWatchdog:
    """Counts consecutive skipped updates; `iters` 0 never fires."""

    iters: int
    action: str = "warn"
    threshold_factor: float = 2.0
    lr_factor: float = 0.5
    consecutive: int = 0

    def __post_init__(self) -> None:
        if self.action not in WATCHDOG_ACTIONS:
            raise ValueError(
                f"the skip watchdog's action must be one of {', '.join(WATCHDOG_ACTIONS)}, got {self.action!r}"
            )

    @classmethod
    def from_hparams(cls, H: Hyperparams) -> SkipWatchdog:
        return cls(
            int(H.skip_watchdog_iters),
            H.skip_watchdog_action,
            float(H.skip_watchdog_threshold_factor),
            float(H.skip_watchdog_lr_factor),
        )

    def observe(self, skipped: bool) -> bool:
        """Count one update; True when it completes a run of `iters` consecutive skips (or `iters` more)."""
        self.consecutive = self.consecutive + 1 if skipped else 0
        return self.iters > 0 and self.consecutive > 0 and self.consecutive % self.iters == 0


def scale_learning_rate(learner: Learner, factor: float) -> None:
    """Multiply the learning rate by `factor` for the rest of the run: the schedule's base rate (saved with the
    schedule in checkpoints) and the rate already set for the next update."""
    scheduler = learner.scheduler
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group in learner.optimizer.param_groups:
        group["lr"] *= factor
