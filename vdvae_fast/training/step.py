"""One update of the paper's recipe, as a plain function the trainer, the benchmarks and the tests all call.

The negative ELBO (distortion + rate, nats per dimension) is backpropagated; the gradient norm is clipped at
grad_clip; the update is *skipped* when that norm is at or above skip_threshold, when it is NaN/Inf (whatever
the threshold, -1 included), or when the rate or distortion is NaN/Inf on any rank (gradient skipping, section
4.2), and the skip is counted; otherwise AdamW steps (betas
(0.9, 0.9), weight decay wd, linear warmup over warmup_iters) and the EMA of the weights moves towards them at
ema_rate. The learning-rate schedule counts every update tried, skipped ones included, as VDVAE's does.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..hparams import PRECISIONS, Hyperparams
from ..model import VAE
from ..runtime import Runtime, all_reduce_sum

__all__ = [
    "Learner",
    "UpdateRule",
    "autocast_for",
    "linear_warmup",
    "make_learner",
    "make_optimizer",
    "update_ema",
    "update_step",
]


def linear_warmup(warmup_iters: float) -> Callable[[int], float]:
    """VDVAE's schedule: the learning rate grows linearly from 0 over warmup_iters updates, then stays."""

    def factor(iteration: int) -> float:
        if warmup_iters <= 0 or iteration > warmup_iters:
            return 1.0
        return iteration / warmup_iters

    return factor


def make_optimizer(params: Iterable[torch.nn.Parameter], H: Hyperparams, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with VDVAE's betas and weight decay. On CUDA torch's fused kernel (one launch per step); NVIDIA
    apex's FusedAdam only if torch's is unavailable and apex happens to be installed."""
    params = list(params)
    kwargs = dict(lr=H.lr, betas=(H.adam_beta1, H.adam_beta2), weight_decay=H.wd, eps=1e-8)
    if device.type == "cuda":
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            with contextlib.suppress(ImportError):
                from apex.optimizers import FusedAdam

                return FusedAdam(params, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(params, foreach=True, **kwargs)


@torch.no_grad()
def update_ema(model: torch.nn.Module, ema: torch.nn.Module, rate: float) -> None:
    """EMA of the weights: ema = rate * ema + (1 - rate) * weights, for every parameter at once."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - rate)


@dataclass(frozen=True)
class UpdateRule:
    """The hyperparameters of one update: clipping, skipping (-1: never skip), EMA decay and precision."""

    grad_clip: float
    skip_threshold: float
    ema_rate: float
    precision: str = "fp32"

    @classmethod
    def from_hparams(cls, H: Hyperparams) -> UpdateRule:
        return cls(float(H.grad_clip), float(H.skip_threshold), float(H.ema_rate), H.precision)

    def allows(self, grad_norm: float) -> bool:
        """Whether a gradient of this norm may be applied: never a NaN or infinite one, whatever the threshold
        (clipping cannot repair it: every weight it touches would become NaN)."""
        return math.isfinite(grad_norm) and (self.skip_threshold == -1 or grad_norm < self.skip_threshold)


@dataclass
class Learner:
    """What an update changes: the VAE, its EMA copy, AdamW, the warmup schedule, fp16's GradScaler (None
    otherwise). `forward` is the model itself or a wrapper of it (DistributedDataParallel, torch.compile)."""

    model: VAE
    ema: VAE
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    forward: Callable[..., dict[str, Tensor]]


def make_learner(model: VAE, H: Hyperparams, device: torch.device) -> Learner:
    """A fresh EMA copy, optimizer, schedule and (fp16) scaler around `model`, which is already on `device`."""
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = make_optimizer(model.parameters(), H, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup(H.warmup_iters))
    scaler = torch.amp.GradScaler(device.type) if H.precision == "fp16" else None
    return Learner(model, ema, optimizer, scheduler, scaler, model)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast for a --precision on `device` (nothing for fp32)."""
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _backward(learner: Learner, rule: UpdateRule, x: Tensor, x_target: Tensor) -> dict[str, Tensor]:
    """Loss and gradients of one batch, the gradient unscaled (fp16) and clipped; this rank's statistics."""
    learner.optimizer.zero_grad(set_to_none=True)
    with autocast_for(x.device, rule.precision):
        out = learner.forward(x, x_target)
    loss = out["elbo"]
    if learner.scaler is not None:
        learner.scaler.scale(loss).backward()
        learner.scaler.unscale_(learner.optimizer)
    else:
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(learner.model.parameters(), rule.grad_clip)
    distortion, rate = out["distortion"].detach().float(), out["rate"].detach().float()
    return {
        "elbo": loss.detach().float(),
        "distortion": distortion,
        "rate": rate,
        "grad_norm": grad_norm.detach().float(),
        "distortion_nans": (~torch.isfinite(distortion)).float(),
        "rate_nans": (~torch.isfinite(rate)).float(),
    }


def _apply(learner: Learner, rule: UpdateRule, skipped: bool) -> float:
    """Step AdamW and the EMA unless skipped; step the schedule either way. Returns the learning rate used."""
    scaler = learner.scaler
    if skipped:
        learner.optimizer.zero_grad(set_to_none=True)
    elif scaler is not None:
        scaler.step(learner.optimizer)
    else:
        learner.optimizer.step()
    if scaler is not None:
        scaler.update()
    if not skipped:
        update_ema(learner.model, learner.ema, rule.ema_rate)
    lr = learner.scheduler.get_last_lr()[0]
    with warnings.catch_warnings():
        # Torch warns of a scheduler step before any optimizer step when the first updates are skipped.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        learner.scheduler.step()
    return lr


def update_step(
    learner: Learner, rule: UpdateRule, x: Tensor, x_target: Tensor, runtime: Runtime | None = None, stop: bool = False
) -> dict[str, Any]:
    """One update on a preprocessed batch (x, x_target: (B, H, W, C) on the model's device).

    Every rank's metrics and votes travel in one all-reduce, so all ranks skip (and stop) together. Returns
    elbo, distortion, rate and grad_norm (means over ranks), distortion_nans, rate_nans and skipped_updates
    (0 or 1), lr, stop (1 if any rank was asked to stop) and, with fp16, loss_scale.
    """
    runtime = runtime or Runtime(0, 1, 0, x.device)
    local: dict[str, Tensor | float] = {**_backward(learner, rule, x, x_target), "stop": float(stop)}
    totals = all_reduce_sum(local, runtime)
    means = {key: totals[key] / runtime.world_size for key in ("elbo", "distortion", "rate", "grad_norm")}
    nans = {key: float(totals[key] > 0) for key in ("distortion_nans", "rate_nans")}
    skipped = bool(nans["distortion_nans"] or nans["rate_nans"] or not rule.allows(means["grad_norm"]))
    lr = _apply(learner, rule, skipped)
    stats = {**means, **nans, "skipped_updates": float(skipped), "lr": lr, "stop": float(totals["stop"] > 0)}
    if learner.scaler is not None:
        stats["loss_scale"] = float(learner.scaler.get_scale())
    return stats
