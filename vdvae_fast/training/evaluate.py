"""Evaluation: a model's ELBO over a whole split, each image once, shards summed over ranks.

Non-finite batches are counted and left out of the filtered means, as VDVAE's filtered_elbo does. The posterior
noise is seeded the same way at every evaluation, so two evaluations of the same weights agree exactly. A stop
request (SIGINT/SIGTERM, training.signals) ends an evaluation before its next batch: the result says so
(``stopped``) and covers the batches read, so the run can save and exit instead of finishing the split.
With iw_samples > 0 it also estimates -log p(x) by importance weighting (VAE.iw_log_likelihood) next to the ELBO.
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


# Samples each decoder pass of the importance-weighted estimate draws for the whole batch. A pass without
# gradients at IW_SAMPLES_PER_PASS times the batch holds the encoder's output and the decoder's state at each
# resolution (each that many times) and one block's temporaries, while a training step keeps every block's
# activations (or, checkpointed, every block's input) for backward.
IW_SAMPLES_PER_PASS = 8


def _batch_sums(
    model: VAE,
    batch: torch.Tensor,
    preprocessing: Preprocessing,
    runtime: Runtime,
    precision: str,
    iw_samples: int,
    iw_seed: int,
) -> dict[str, float]:
    """One batch's contribution to the split's sums (per-layer KL as kl_per_layer.<index>). The importance
    weighting draws its noise from iw_seed, apart from the ELBO's stream, so the ELBO is the same with or without
    it."""
    x, target = preprocessing(batch, runtime.device)
    with autocast_for(runtime.device, precision):
        stats = model(x, target)
    elbo, distortion, rate = torch.stack([stats[k].double() for k in ("elbo", "distortion", "rate")]).tolist()
    kl_per_layer = stats["kl_per_layer"].double().tolist()
    n = float(len(batch))
    finite = all(math.isfinite(value) for value in (elbo, distortion, rate, *kl_per_layer))
    sums = {"images": n, "elbo": elbo * n, "batches": 1.0, "nonfinite_batches": 0.0 if finite else 1.0}
    if finite:
        sums.update(finite_images=n, finite_elbo=elbo * n, distortion=distortion * n, rate=rate * n)
        sums.update({f"kl_per_layer.{i}": kl * n for i, kl in enumerate(kl_per_layer)})
    if iw_samples and finite:
        with torch.random.fork_rng(devices=[runtime.device] if runtime.device.type == "cuda" else []):
            torch.manual_seed(iw_seed)
            with autocast_for(runtime.device, precision):
                log_px = model.iw_log_likelihood(x, target, iw_samples, min(iw_samples, IW_SAMPLES_PER_PASS))
        nll = -log_px[torch.isfinite(log_px)] / x[0].numel()
        sums.update(iw_images=float(len(nll)), iw_nll=nll.sum().item())
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
    iw_samples: int = 0,
) -> dict[str, Any]:
    """n_batches, n_images, elbo (every batch), filtered_elbo and its bits/dim elbo_bpd, distortion and rate
    (finite batches only, nats/dim), kl_per_layer (each stochastic layer's share of the rate, a list of floats in
    nats/dim over the finite batches), nonfinite_batches, and stopped: whether a stop request on any rank ended
    the evaluation before the split's end (the values then cover the batches read; NaN if none).

    With iw_samples > 0 also iw_samples, iw_nll (the importance-weighted -log p(x) with that many samples, nats/dim,
    over the finite batches' images whose estimate is finite), its bits/dim iw_bpd, and iw_images (how many)."""
    if isinstance(iw_samples, bool) or not isinstance(iw_samples, int) or iw_samples < 0:
        raise ValueError(f"iw_samples must be an integer at least 0 (0: no importance-weighted estimate), got "
                         f"{iw_samples!r}")  # fmt: skip
    n_layers = len(model.decoder.dec_blocks)
    keys = ("images", "elbo", "finite_images", "finite_elbo", "distortion", "rate", "batches", "nonfinite_batches")
    keys += tuple(f"kl_per_layer.{i}" for i in range(n_layers)) + ("iw_images", "iw_nll")
    sums = dict.fromkeys(keys, 0.0)
    stopped = False
    devices = [runtime.device] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 1000 + runtime.rank)
        for index, batch in enumerate(loader):
            if stop_requested() is not None:
                stopped = True
                break
            iw_seed = int(np.random.SeedSequence([seed, runtime.rank, index]).generate_state(1)[0])
            for key, value in _batch_sums(model, batch, preprocessing, runtime, precision, iw_samples, iw_seed).items():
                sums[key] += value
    total = all_reduce_sum({**sums, "stopped": float(stopped)}, runtime)
    if total["images"] == 0 and not total["stopped"]:
        raise SetupError(f"the {split} split is empty: nothing to evaluate")
    n_images = total["images"]
    n_finite = total["finite_images"]
    filtered = total["finite_elbo"] / n_finite if n_finite else float("nan")
    kl_per_layer = [total[f"kl_per_layer.{i}"] / n_finite if n_finite else float("nan") for i in range(n_layers)]
    result = {
        "n_batches": int(total["batches"]),
        "n_images": int(total["images"]),
        "elbo": total["elbo"] / n_images if n_images else float("nan"),
        "filtered_elbo": filtered,
        "elbo_bpd": filtered / LN2,
        "distortion": total["distortion"] / n_finite if n_finite else float("nan"),
        "rate": total["rate"] / n_finite if n_finite else float("nan"),
        "kl_per_layer": kl_per_layer,
        "nonfinite_batches": int(total["nonfinite_batches"]),
        "stopped": total["stopped"] > 0,
    }
    if iw_samples:
        iw_nll = total["iw_nll"] / total["iw_images"] if total["iw_images"] else float("nan")
        result.update(iw_samples=iw_samples, iw_nll=iw_nll, iw_bpd=iw_nll / LN2, iw_images=int(total["iw_images"]))
    return result
