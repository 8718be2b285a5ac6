"""Efficient-VDVAE's optimizer: torch's Adamax, with its weight decay decoupled from the gradient as in AdamW.

torch.optim.Adamax adds weight_decay * p to the gradient (an L2 term). Adamax then divides by the largest
gradient seen, so where the gradient is small the L2 term dominates and every such weight shrinks by about
lr per update, whatever wd is. Efficient-VDVAE applies its decay after the Adamax direction instead
(p <- p - lr * (m / u) / (1 - beta1^t) - lr * wd * p), which is what this class does; with weight decay 0
it is torch's Adamax unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["DecoupledAdamax"]


class DecoupledAdamax(torch.optim.Adamax):
    """torch.optim.Adamax whose `weight_decay` multiplies each weight by 1 - lr * weight_decay before the step
    (kept in each parameter group as "decoupled_weight_decay"; torch's own L2 term stays 0)."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0, foreach=foreach)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = weight_decay

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                decay = group["lr"] * group["decoupled_weight_decay"]
                stepped = [p for p in group["params"] if p.grad is not None]
                if decay and stepped:
                    torch._foreach_mul_(stepped, 1.0 - decay)
        super().step()
        return loss
