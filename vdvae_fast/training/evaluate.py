"""Evaluation: a model's ELBO over a whole split, each image once, shards summed over ranks.

Non-finite batches are counted and left out of the filtered means, as VDVAE's filtered_elbo does. The posterior
noise is seeded the same way at every evaluation, so two evaluations of the same weights agree exactly. A stop
request (SIGINT/SIGTERM, training.signals) ends an evaluation before its next batch: the result says so
(``stopped``) and covers the batches read, so the run can save and exit instead of finishing the split.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import Preprocessing
from ..model import VAE
from ..runtime import Runtime, all_reduce_sum
from .errors import SetupError
from .log import LN2
from .signals import stop_requested
from .step import autocast_for

__all__ = ["evaluate", "evaluation_subset"]


def evaluation_subset(split: Dataset, max_images: int) -> Dataset:
    """At most `max_images` images of `split`, evenly spread over it (not its first ones, which often come
    from one source image or class); the whole split when max_images is 0 or covers it."""
    if max_images < 0:
        raise ValueError(f"max_images must be at least 0 (0: the whole split), got {max_images}")
    n = len(split)
    if max_images == 0 or max_images >= n:
        return split
    return Subset(split, np.linspace(0, n - 1, max_images).round().astype(int).tolist())


def _batch_sums(
    model: VAE, batch: torch.Tensor, preprocessing: Preprocessing, runtime: Runtime, precision: str
) -> dict[str, float]:
    """One batch's contribution to the split's sums."""
    x, target = preprocessing(batch, runtime.device)
    with autocast_for(runtime.device, precision):
        stats = model(x, target)
    elbo, distortion, rate = torch.stack([stats[k].double() for k in ("elbo", "distortion", "rate")]).tolist()
    n = float(len(batch))
    finite = all(math.isfinite(value) for value in (elbo, distortion, rate))
    sums = {"images": n, "elbo": elbo * n, "batches": 1.0, "nonfinite_batches": 0.0 if finite else 1.0}
    if finite:
        sums.update(finite_images=n, finite_elbo=elbo * n, distortion=distortion * n, rate=rate * n)
    return sums


@torch.no_grad()
def evaluate(
    model: VAE,
    loader: DataLoader,
    preprocessing: Preprocessing,
    runtime: Runtime,
    precision: str,
    seed: int,
    split: str = "valid",
) -> dict[str, Any]:
    """n_batches, n_images, elbo (every batch), filtered_elbo and its bits/dim elbo_bpd, distortion and rate
    (finite batches only, nats/dim), nonfinite_batches, and stopped: whether a stop request on any rank ended
    the evaluation before the split's end (the values then cover the batches read; NaN if none)."""
    keys = ("images", "elbo", "finite_images", "finite_elbo", "distortion", "rate", "batches", "nonfinite_batches")
    sums = dict.fromkeys(keys, 0.0)
    stopped = False
    devices = [runtime.device] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 1000 + runtime.rank)
        for batch in loader:
            if stop_requested() is not None:
                stopped = True
                break
            for key, value in _batch_sums(model, batch, preprocessing, runtime, precision).items():
                sums[key] += value
    total = all_reduce_sum({**sums, "stopped": float(stopped)}, runtime)
    if total["images"] == 0 and not total["stopped"]:
        raise SetupError(f"the {split} split is empty: nothing to evaluate")
    n_images = total["images"]
    n_finite = total["finite_images"]
    filtered = total["finite_elbo"] / n_finite if n_finite else float("nan")
    return {
        "n_batches": int(total["batches"]),
        "n_images": int(total["images"]),
        "elbo": total["elbo"] / n_images if n_images else float("nan"),
        "filtered_elbo": filtered,
        "elbo_bpd": filtered / LN2,
        "distortion": total["distortion"] / n_finite if n_finite else float("nan"),
        "rate": total["rate"] / n_finite if n_finite else float("nan"),
        "nonfinite_batches": int(total["nonfinite_batches"]),
        "stopped": total["stopped"] > 0,
    }
