"""What one call of each fused op costs where its kernels cost almost nothing: forward and backward at VDVAE's
smallest latent shape, against the same formulas in eager PyTorch (the original backend).

    python -m benchmarks.call_overhead --calls 1000

At this size the time is Python and dispatch, which a VDVAE pays at each of its low-resolution stochastic layers.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from vdvae_fast import ops

LATENT_SHAPE = (4, 16, 4, 4)  # a 4x4 stochastic layer of imagenet64 at batch 4
LOGITS_SHAPE = (4, 100, 4, 4)


def calls(backend: str) -> dict[str, Callable[[], object]]:
    """Each op's forward and backward on small CPU tensors, by op name."""
    gen = torch.Generator().manual_seed(0)
    params = [(torch.randn(LATENT_SHAPE, generator=gen) * 0.5).requires_grad_() for _ in range(4)]
    upstream = torch.randn(LATENT_SHAPE, generator=gen)
    logits = (torch.randn(LOGITS_SHAPE, generator=gen) * 0.5).requires_grad_()
    x = torch.rand(LOGITS_SHAPE[0], 3, *LOGITS_SHAPE[2:], generator=gen) * 2 - 1
    seed = {} if backend == "original" else {"seed": 1}

    def sample_gaussian() -> object:
        z = ops.sample_gaussian(params[0], params[1], temperature=0.8, backend=backend, **seed)
        return torch.autograd.grad([z], params[:2], [upstream])

    def sample_and_kl() -> object:
        z, kl = ops.sample_and_kl(*params, backend=backend, **seed)
        return torch.autograd.grad([z, kl], params, [upstream, torch.ones_like(kl)])

    def gaussian_kl() -> object:
        return torch.autograd.grad([ops.gaussian_kl(*params, backend=backend)], params, [upstream])

    def dmol_nll() -> object:
        return torch.autograd.grad([ops.dmol_nll(logits, x, backend=backend, check_inputs=False).sum()], [logits])

    return {f.__name__: f for f in (sample_gaussian, sample_and_kl, gaussian_kl, dmol_nll)}


def median_us(call: Callable[[], object], count: int) -> float:
    """Median wall time of `count` calls, in microseconds, after a warm-up."""
    for _ in range(max(count // 20, 1)):
        call()
    times = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[count // 2] * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.call_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="timed calls per op and backend (default: 1000)")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")
    backends = [b for b in ("cpu", "original") if b in ops.available_backends("cpu")]
    print(f"forward+backward, latents {'x'.join(map(str, LATENT_SHAPE))}, logits {'x'.join(map(str, LOGITS_SHAPE))}")
    print("| op | " + " | ".join(f"{b} (us)" for b in backends) + " |")
    print("| --- |" + " --- |" * len(backends))
    measured = {b: calls(b) for b in backends}
    for name in measured[backends[0]]:
        row = [f"{median_us(measured[b][name], args.calls):.1f}" for b in backends]
        print(f"| `{name}` | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
