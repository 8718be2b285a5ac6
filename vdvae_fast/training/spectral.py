"""NVAE's spectral regularization: the sum of the largest singular value of every conv weight, a term of the loss.

Each convolution's weight W (out, in, kh, kw) is read as the matrix (out, in*kh*kw). Its largest singular value is estimated
by power iteration, v <- W^T u / |W^T u|, u <- W v / |W v|, s = u^T W v, with u and v kept from one update to
the next (a few iterations a step then suffice; the first call does ten times as many, as NVAE does). u and v
are held fixed in backward, so the gradient of s is u v^T: it shrinks the weight along its top singular pair.

The vectors belong to the training run, not to the model: they are saved in the checkpoint's trainer state
(``state_dict``), so that a model's state dict stays VDVAE's and official checkpoints load unchanged.
Weights of one shape are iterated together, one batched matrix product per iteration.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SpectralNorms"]

_FIRST_CALL_ITERATIONS = 10  # times power_iters, while the vectors are still random


class SpectralNorms:
    """Power-iteration estimates of the largest singular value of the weight of every nn.Conv2d of `model`.

    `seed` draws the initial vectors from a generator of their own (the same on every process, and the run's
    random streams are left as they are)."""

    def __init__(self, model: nn.Module, power_iters: int, seed: int = 0) -> None:
        if power_iters < 1:
            raise ValueError(f"power_iters must be at least 1, got {power_iters}")
        self.power_iters = power_iters
        self.groups: dict[tuple[int, int], list[tuple[str, nn.Parameter]]] = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                weight = module.weight
                self.groups.setdefault((weight.shape[0], weight[0].numel()), []).append((f"{name}.weight", weight))
        if not self.groups:
            raise ValueError("spectral regularization needs convolutions; the model has none")
        generator = torch.Generator().manual_seed(seed)
        self.u: dict[tuple[int, int], Tensor] = {}
        self.v: dict[tuple[int, int], Tensor] = {}
        for (rows, cols), members in self.groups.items():
            device = members[0][1].device
            self.u[rows, cols] = _unit(torch.randn(len(members), rows, generator=generator)).to(device)
            self.v[rows, cols] = _unit(torch.randn(len(members), cols, generator=generator)).to(device)
        self.fresh = True

    def _matrices(self, shape: tuple[int, int]) -> Tensor:
        """The weights of one shape as a (n, out, in*kh*kw) stack (differentiable)."""
        return torch.stack([param.reshape(shape) for _, param in self.groups[shape]])

    @torch.no_grad()
    def _iterate(self, shape: tuple[int, int], weights: Tensor, iterations: int) -> None:
        u, v = self.u[shape], self.v[shape]
        for _ in range(iterations):
            v = _unit(torch.bmm(u.unsqueeze(1), weights).squeeze(1), keep=v)
            u = _unit(torch.bmm(weights, v.unsqueeze(2)).squeeze(2), keep=u)
        self.u[shape], self.v[shape] = u, v

    def penalty(self) -> Tensor:
        """Advance the power iteration, then return sum_i u_i^T W_i v_i (a float32 scalar whose gradient is
        u_i v_i^T for each weight)."""
        iterations = self.power_iters * (_FIRST_CALL_ITERATIONS if self.fresh else 1)
        total = []
        for shape in self.groups:
            weights = self._matrices(shape).float()
            self._iterate(shape, weights.detach(), iterations)
            total.append(torch.einsum("nr,nrc,nc->", self.u[shape], weights, self.v[shape]))
        self.fresh = False
        return torch.stack(total).sum()

    def state_dict(self) -> dict[str, Tensor]:
        """The vectors by weight name: ``{name}.u`` (out,) and ``{name}.v`` (in*kh*kw,)."""
        state = {}
        for shape, members in self.groups.items():
            for index, (name, _) in enumerate(members):
                state[f"{name}.u"], state[f"{name}.v"] = self.u[shape][index], self.v[shape][index]
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Put back the vectors of state_dict; a weight missing or of another shape raises ValueError."""
        for shape, members in self.groups.items():
            for side, size, store in (("u", shape[0], self.u), ("v", shape[1], self.v)):
                rows = []
                for name, _ in members:
                    vector = state.get(f"{name}.{side}")
                    if vector is None or tuple(vector.shape) != (size,):
                        found = "missing" if vector is None else f"of shape {tuple(vector.shape)}"
                        raise ValueError(f"the spectral vector {name}.{side} is {found}, expected shape ({size},)")
                    rows.append(vector)
                store[shape] = torch.stack(rows).to(store[shape].device, torch.float32)
        self.fresh = False


def _unit(rows: Tensor, keep: Tensor | None = None) -> Tensor:
    """Each row scaled to norm 1; a row of norm 0 (a weight that is still zero) keeps its previous value."""
    norms = rows.norm(dim=1, keepdim=True)
    unit = rows / norms.clamp_min(torch.finfo(rows.dtype).tiny)
    return unit if keep is None else torch.where(norms > 0, unit, keep)
