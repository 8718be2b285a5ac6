"""The run log's window summary, evaluation on a subset, and evaluation honouring a stop request."""

from __future__ import annotations

import math
import os
import signal

import numpy as np
import pytest
import torch

from vdvae_fast.data import ArrayImages, builtin_patches, make_loader, preprocessing_for
from vdvae_fast.hparams import preset
from vdvae_fast.model import VAE
from vdvae_fast.runtime import Runtime
from vdvae_fast.training import StopRequest, evaluate, summarize
from vdvae_fast.training.evaluate import evaluation_subset
from vdvae_fast.training.signals import stop_requested

pytestmark = pytest.mark.usefixtures("one_thread")
CPU_RUNTIME = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def window_stats(grad_norm: float, elbo: float = 3.0) -> dict[str, float]:
    return {"elbo": elbo, "distortion": 2.0, "rate": 1.0, "grad_norm": grad_norm, "distortion_nans": 0.0,
            "rate_nans": 0.0, "skipped_updates": float(not math.isfinite(grad_norm)), "lr": 0.1}  # fmt: skip


def test_a_window_of_only_nonfinite_gradients_reports_nan_and_the_count_not_zero():
    stats = summarize([window_stats(math.nan), window_stats(math.inf)])
    assert math.isnan(stats["grad_norm"]) and stats["nonfinite_grad_norms"] == 2 and stats["skipped_updates"] == 2


def test_a_window_reports_the_largest_finite_gradient_norm_and_counts_the_rest():
    stats = summarize([window_stats(3.0), window_stats(math.nan), window_stats(7.5)])
    assert stats["grad_norm"] == 7.5 and stats["nonfinite_grad_norms"] == 1


def images(n: int, seed: int = 0) -> ArrayImages:
    return ArrayImages(np.random.RandomState(seed).randint(0, 256, (n, 8, 8, 3), dtype=np.uint8))


def tiny_vae() -> VAE:
    torch.manual_seed(0)
    H = preset("tiny")
    H.update(backend="reference", image_size=8)
    return VAE(H).eval()


def test_evaluation_subset_spreads_over_the_split():
    split = images(100)
    subset = evaluation_subset(split, 5)
    assert len(subset) == 5 and list(subset.indices) == [0, 25, 50, 74, 99]
    assert evaluation_subset(split, 0) is split and evaluation_subset(split, 100) is split
    with pytest.raises(ValueError, match="max_images must be at least 0"):
        evaluation_subset(split, -1)


class SignalAfter(torch.utils.data.Dataset):
    """A split that sends this process `signum` while its item `at` is read, as a user's kill would."""

    def __init__(self, split: ArrayImages, at: int, signum: int) -> None:
        self.split, self.at, self.signum = split, at, signum

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == self.at:
            os.kill(os.getpid(), self.signum)
        return self.split[index]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_evaluation_ends_it_before_the_next_batch(signum):
    model, split = tiny_vae(), images(40)
    preprocessing = preprocessing_for("builtin")
    loader = make_loader(SignalAfter(split, at=5, signum=signum), 4, shuffle=False, even_shards=False)
    with StopRequest() as stop:
        result = evaluate(model, loader, preprocessing, CPU_RUNTIME, "fp32", seed=0)
        assert stop.signum == signum and stop_requested() == signum
    assert stop_requested() is None
    assert (
        result["stopped"] and result["n_batches"] == 1 and result["n_images"] == 4
    )  # the batch loading item 5: not run
    full = evaluate(model, make_loader(split, 4, shuffle=False, even_shards=False), preprocessing, CPU_RUNTIME,
                    "fp32", seed=0)  # fmt: skip
    assert not full["stopped"] and full["n_batches"] == 10 and full["n_images"] == 40


def test_the_tiny_preset_evaluates_a_spread_subset_of_its_validation_patches():
    H = preset("tiny")
    valid = builtin_patches(H.image_size)[1]
    subset = evaluation_subset(ArrayImages(valid), H.eval_max_images)
    assert len(valid) > 20_000 and len(subset) == H.eval_max_images == 512 and H.num_threads == 1
    assert subset.indices[0] == 0 and subset.indices[-1] == len(valid) - 1  # every photograph contributes
