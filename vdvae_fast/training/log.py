"""The run's record and its progress line: log.jsonl/log.txt (VDVAE's logprint) and what the person watching sees.

A window is the list of per-update statistics since the last print; ``summarize`` reduces it the way VDVAE's
accumulate_stats does, ``throughput`` measures it, and ``status_line`` turns it into one readable line.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

__all__ = ["LN2", "Progress", "RunLog", "status_line", "summarize", "throughput"]

LN2 = math.log(2.0)  # nats per bit: bits/dim = nats/dim / LN2


def _plain(value: Any) -> Any:
    """A JSON-friendly version of numbers coming from torch or numpy."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Path):
        value = str(value)
    return value


class RunLog:
    """VDVAE's logprint: each call appends one JSON record to log.jsonl and a text line to log.txt and, unless
    quiet, prints it. Only rank 0 writes; other ranks' calls do nothing."""

    def __init__(self, directory: Path | None, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled and directory is not None
        self.jsonl = None if directory is None else directory / "log.jsonl"
        self.txt = None if directory is None else directory / "log.txt"
        self.stream = stream or sys.stdout

    def __call__(self, *message: Any, quiet: bool = False, **record: Any) -> None:
        if not self.enabled:
            return
        entry: dict[str, Any] = {"time": time.ctime()}
        if message:
            entry["message"] = " ".join(str(part) for part in message)
        entry.update({key: _plain(value) for key, value in record.items()})
        text = ", ".join(f"{k}: {v:.5f}" if isinstance(v, float) else f"{k}: {v}" for k, v in entry.items())
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(entry) + "\n")
        with open(self.txt, "a") as f:
            f.write(text + "\n")
        if not quiet:
            self.say(" ".join(str(part) for part in message) if message and not record else text)

    def say(self, text: str) -> None:
        """Print for the person watching (rank 0 only), not recorded."""
        if self.enabled:
            print(text, file=self.stream, flush=True)


class Progress:
    """One readable status line: redrawn in place after every update on a terminal, printed at every
    iters_per_print otherwise (logs, CI)."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.tty = enabled and self.stream.isatty()
        self._drawn = False

    def show(self, text: str, permanent: bool) -> None:
        if not self.enabled or not (self.tty or permanent):
            return
        if self.tty:
            self.stream.write("\r\x1b[K" + text + ("\n" if permanent else ""))
            self._drawn = not permanent
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Remove the in-place line before other output."""
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


def summarize(window: Sequence[dict[str, float]]) -> dict[str, float]:
    """VDVAE's accumulate_stats over the updates since the last print: NaN and skip counts are summed, the
    grad norm is the largest finite one (NaN when none was finite: never a made-up 0) and nonfinite_grad_norms
    counts the others, elbo is the plain mean and elbo_filtered the mean of finite values."""
    out: dict[str, float] = {}
    for key in window[-1]:
        values = np.array([stats[key] for stats in window], dtype=np.float64)
        finite = values[np.isfinite(values)]
        if key in ("distortion_nans", "rate_nans", "skipped_updates"):
            out[key] = float(values.sum())
        elif key == "grad_norm":
            out[key] = float(finite.max()) if len(finite) else float("nan")
            out["nonfinite_grad_norms"] = float(len(values) - len(finite))
        elif key == "elbo":
            out["elbo"] = float(values.mean())
            out["elbo_filtered"] = float(finite.mean()) if len(finite) else float("nan")
        else:
            out[key] = float(values.mean())
    return out


def throughput(window: Sequence[dict[str, float]], images_per_update: int) -> tuple[float, float]:
    """(images per second, seconds per update) over the window: loading and computing, nothing else."""
    seconds = sum(stats["iter_time"] + stats["data_time"] for stats in window)
    return len(window) * images_per_update / max(seconds, 1e-9), seconds / len(window)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def status_line(
    stats: dict[str, float], step: int, total: int, epoch: int, skipped: int, speed: tuple[float, float]
) -> str:
    """The progress line: position, ELBO in bits/dim, grad norm, skips, images/s and the time left, from
    summarize's stats and throughput's (images per second, seconds per update)."""
    images_per_sec, seconds_per_step = speed
    eta = (total - step) * seconds_per_step
    percent = 100.0 * step / max(total, 1)
    return (
        f"step {step}/{total} ({percent:.0f}%) epoch {epoch} | "
        f"elbo {stats['elbo'] / LN2:.3f} bits/dim (rate {stats['rate'] / LN2:.3f}, "
        f"distortion {stats['distortion'] / LN2:.3f}) | grad_norm {stats['grad_norm']:.1f} | "
        f"skipped {skipped} | {images_per_sec:.1f} img/s | eta {_duration(eta)}"
    )
