"""Learning-rate schedules: VDVAE's linear warm-up and Efficient-VDVAE's decays, as a fraction of the peak lr.

`step` is the number of updates tried before the one the rate is for, skipped ones included (VDVAE counts
them): the first update has step 0. With warmup_iters W, lr_decay_start S, lr_decay_steps D, the floor
m = lr_min / lr and lr_decay_rate r, the factor is

    linear_warmup  min(1, step / W)                    (VDVAE; 1 when W = 0)
    cosine         warm-up before S, then (1 - m) * (1 + cos(pi * min(step - S, D) / D)) / 2 + m
    exponential    warm-up before S, then r ** ((step - S) / D), clipped to [m, 1]
    noam           sqrt(W) * min(step ** -0.5, step * W ** -1.5)   (0 at step 0; peaks at 1 at step W)

cosine and exponential are Efficient-VDVAE's NarrowCosineDecay and NarrowExponentialDecay (its configs use
cosine: warm-up 100, start 50000, 750000 steps, floor 2e-4 of lr 1e-3), noam its NoamSchedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..hparams import FIELDS

__all__ = ["LR_SCHEDULES", "learning_rate", "linear_warmup", "lr_factor", "schedule_factor"]

LR_SCHEDULES: tuple[str, ...] = FIELDS["lr_schedule"].choices


def linear_warmup(warmup_iters: float) -> Callable[[int], float]:
    """VDVAE's schedule: the learning rate grows linearly from 0 over warmup_iters updates, then stays."""

    def factor(iteration: int) -> float:
        if warmup_iters <= 0 or iteration > warmup_iters:
            return 1.0
        return iteration / warmup_iters

    return factor


def _cosine(step: int, H: Any) -> float:
    floor = H.lr_min / H.lr
    progress = min(step - H.lr_decay_start, H.lr_decay_steps) / H.lr_decay_steps
    return (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)) + floor


def _exponential(step: int, H: Any) -> float:
    decayed = H.lr_decay_rate ** ((step - H.lr_decay_start) / H.lr_decay_steps)
    return min(1.0, max(H.lr_min / H.lr, decayed))


def _noam(step: int, warmup_iters: float) -> float:
    if step <= 0:
        return 0.0
    return math.sqrt(warmup_iters) * min(step**-0.5, step * warmup_iters**-1.5)


def lr_factor(step: int, H: Any) -> float:
    """The learning rate of the update after `step` updates, as a fraction of H.lr (see the module's table)."""
    schedule = H.get("lr_schedule", "linear_warmup")
    if schedule == "noam":
        return _noam(step, float(H.warmup_iters))
    if schedule == "linear_warmup" or step < H.lr_decay_start:
        return linear_warmup(H.warmup_iters)(step)
    if schedule == "cosine":
        return _cosine(step, H)
    if schedule == "exponential":
        return _exponential(step, H)
    raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")


def learning_rate(step: int, H: Any) -> float:
    """The learning rate of the update after `step` updates: H.lr times lr_factor."""
    return H.lr * lr_factor(step, H)


def schedule_factor(H: Any) -> Callable[[int], float]:
    """lr_factor as a function of the step alone, for torch's LambdaLR; VDVAE's warm-up exactly as before."""
    if H.get("lr_schedule", "linear_warmup") == "linear_warmup":
        return linear_warmup(H.warmup_iters)
    return lambda step: lr_factor(step, H)
