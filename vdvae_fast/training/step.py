"""One update of the paper's recipe, as a plain function the trainer, the benchmarks and the tests all call.

The negative ELBO (distortion + rate, nats per dimension) is backpropagated; the gradient norm is clipped at
grad_clip; the update is *skipped* when that norm is at or above skip_threshold, when it is NaN/Inf (whatever
the threshold, -1 included), or when the rate or distortion is NaN/Inf on any rank (gradient skipping, section
4.2), and the skip is counted; otherwise AdamW steps (betas
(0.9, 0.9), weight decay wd, linear warmup over warmup_iters) and the EMA of the weights moves towards them at
ema_rate. The learning-rate schedule counts every update tried, skipped ones included, as VDVAE's does.

Switches, all off by default: Adamax instead of AdamW and Efficient-VDVAE's schedules (training.schedules);
the KL warm-up, whose loss is distortion + beta * rate with beta rising to 1 (the reported elbo stays the
true one); NVAE's spectral regularization, lambda * sum of the conv weights' largest singular values
(training.spectral).
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
from .adamax import DecoupledAdamax
from .schedules import linear_warmup, schedule_factor
from .spectral import SpectralNorms

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


def make_optimizer(params: Iterable[torch.nn.Parameter], H: Hyperparams, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with VDVAE's betas and weight decay. On CUDA torch's fused kernel (one launch per step); NVIDIA
    apex's FusedAdam only if torch's is unavailable and apex happens to be installed. With H.optimizer
    "adamax", Efficient-VDVAE's: torch's Adamax with the same betas and eps, and wd decoupled as in AdamW."""
    params = list(params)
    kwargs = dict(lr=H.lr, betas=(H.adam_beta1, H.adam_beta2), weight_decay=H.wd, eps=1e-8)
    if H.get("optimizer", "adamw") == "adamax":
        return DecoupledAdamax(params, foreach=True, **kwargs)
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
    """The hyperparameters of one update: clipping, skipping (-1: never skip), EMA decay, precision, the KL
    warm-up (kl_warmup_iters 0: off) and the weight of the spectral regularization (0: off)."""

    grad_clip: float
    skip_threshold: float
    ema_rate: float
    precision: str = "fp32"
    kl_warmup_start: float = 0.0
    kl_warmup_iters: int = 0
    spectral_reg: float = 0.0

    @classmethod
    def from_hparams(cls, H: Hyperparams) -> UpdateRule:
        switches = (float(H.kl_warmup_start), int(H.kl_warmup_iters), float(H.spectral_reg))
        return cls(float(H.grad_clip), float(H.skip_threshold), float(H.ema_rate), H.precision, *switches)

    def kl_beta(self, step: int) -> float:
        """The weight of the rate in the training loss of the update after `step` updates: kl_warmup_start at
        step 0, rising linearly to 1 at step kl_warmup_iters (NVAE, Ladder VAE); 1 without a warm-up."""
        if self.kl_warmup_iters <= 0 or step >= self.kl_warmup_iters:
            return 1.0
        return self.kl_warmup_start + (1.0 - self.kl_warmup_start) * step / self.kl_warmup_iters

    def allows(self, grad_norm: float) -> bool:
        """Whether a gradient of this norm may be applied: never a NaN or infinite one, whatever the threshold
        (clipping cannot repair it: every weight it touches would become NaN)."""
        return math.isfinite(grad_norm) and (self.skip_threshold == -1 or grad_norm < self.skip_threshold)


@dataclass
class Learner:
    """What an update changes: the VAE, its EMA copy, the optimizer, the learning-rate schedule, fp16's
    GradScaler (None otherwise), and the spectral regularization's vectors (None when it is off). `forward` is
    the model itself or a wrapper of it (DistributedDataParallel, torch.compile)."""

    model: VAE
    ema: VAE
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    forward: Callable[..., dict[str, Tensor]]
    spectral: SpectralNorms | None = None


def make_learner(model: VAE, H: Hyperparams, device: torch.device) -> Learner:
    """A fresh EMA copy, optimizer, schedule, (fp16) scaler and (spectral_reg) power-iteration vectors around
    `model`, which is already on `device`."""
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = make_optimizer(model.parameters(), H, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(H))
    scaler = torch.amp.GradScaler(device.type) if H.precision == "fp16" else None
    spectral = SpectralNorms(model, int(H.spectral_power_iters), H.seed) if H.get("spectral_reg", 0) > 0 else None
    return Learner(model, ema, optimizer, scheduler, scaler, model, spectral)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast for a --precision on `device` (nothing for fp32)."""
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _training_loss(learner: Learner, rule: UpdateRule, out: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """The loss to backpropagate: the negative ELBO, or with the switches distortion + beta * rate plus
    spectral_reg * the sum of largest singular values; and the switches' statistics (none when off)."""
    loss, stats = out["elbo"], {}
    if rule.kl_warmup_iters > 0:
        beta = rule.kl_beta(learner.scheduler.last_epoch)
        loss = out["distortion"] + beta * out["rate"]
        stats["kl_beta"] = beta
    if rule.spectral_reg > 0:
        if learner.spectral is None:
            raise ValueError("the rule has spectral_reg > 0 but the learner has no spectral vectors: make it with "
                             "make_learner from hyperparameters with the same spectral_reg")  # fmt: skip
        penalty = learner.spectral.penalty()
        loss = loss + rule.spectral_reg * penalty
        stats["spectral_norm_sum"] = float(penalty.detach())
    return loss, stats


def _backward(
    learner: Learner, rule: UpdateRule, x: Tensor, x_target: Tensor
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Loss and gradients of one batch, the gradient unscaled (fp16) and clipped: this rank's statistics to
    reduce, and the switches' statistics (the same on every rank)."""
    learner.optimizer.zero_grad(set_to_none=True)
    with autocast_for(x.device, rule.precision):
        out = learner.forward(x, x_target)
    loss, switches = _training_loss(learner, rule, out)
    if learner.scaler is not None:
        learner.scaler.scale(loss).backward()
        learner.scaler.unscale_(learner.optimizer)
    else:
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(learner.model.parameters(), rule.grad_clip)
    distortion, rate = out["distortion"].detach().float(), out["rate"].detach().float()
    local = {
        "elbo": out["elbo"].detach().float(),
        "distortion": distortion,
        "rate": rate,
        "grad_norm": grad_norm.detach().float(),
        "distortion_nans": (~torch.isfinite(distortion)).float(),
        "rate_nans": (~torch.isfinite(rate)).float(),
    }
    return local, switches


def _apply(learner: Learner, rule: UpdateRule, skipped: bool) -> float:
    """Step the optimizer and the EMA unless skipped; step the schedule either way. Returns the learning rate
    this update had."""
    scaler = learner.scaler
    lr = learner.optimizer.param_groups[0]["lr"]
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
    elbo (the true negative ELBO, whatever the loss), distortion, rate and grad_norm (means over ranks),
    distortion_nans, rate_nans and skipped_updates (0 or 1), lr, stop (1 if any rank was asked to stop), with
    fp16 loss_scale, with the KL warm-up kl_beta, and with spectral_reg spectral_norm_sum.
    """
    runtime = runtime or Runtime(0, 1, 0, x.device)
    measured, switches = _backward(learner, rule, x, x_target)
    local: dict[str, Tensor | float] = {**measured, "stop": float(stop)}
    totals = all_reduce_sum(local, runtime)
    means = {key: totals[key] / runtime.world_size for key in ("elbo", "distortion", "rate", "grad_norm")}
    nans = {key: float(totals[key] > 0) for key in ("distortion_nans", "rate_nans")}
    skipped = bool(nans["distortion_nans"] or nans["rate_nans"] or not rule.allows(means["grad_norm"]))
    lr = _apply(learner, rule, skipped)
    stats = {**means, **nans, "skipped_updates": float(skipped), "lr": lr, "stop": float(totals["stop"] > 0)}
    stats.update(switches)
    if learner.scaler is not None:
        stats["loss_scale"] = float(learner.scaler.get_scale())
    return stats
