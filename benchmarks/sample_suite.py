"""Sample suite: unconditional sampling (VAE.forward_uncond_samples) per preset, fused backends against the
eager original (torch's sampler, as openai/vdvae).

Sampling runs the decoder's prior path and the DMoL sampler only, so it shows what the fused sample_gaussian and
dmol_sample ops change end to end. Each preset's model is built once and shared by every backend; fp32, like the
released samplers. The batch fills the GPU's convolutions while keeping one call under a second.
"""

from __future__ import annotations

import functools

import torch

from vdvae_fast.hparams import preset
from vdvae_fast.model import VAE

from .ops_suite import default_backends
from .timing import time_calls

__all__ = ["CPU_CASES", "GPU_CASES", "SIZES", "run"]

# (preset, images per call)
GPU_CASES = (("cifar10", 32), ("imagenet32", 32), ("imagenet64", 16), ("ffhq256", 4))
CPU_CASES = (("cifar10", 4),)
QUICK_PRESETS = ("cifar10", "imagenet64")
SIZES = ("tiny", "quick", "full")


def _cases(device: torch.device, size: str) -> tuple[list[tuple[str, int]], int, int]:
    """(preset, images per call) pairs, warm-up calls and timed repeats of a run of `size`."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    if size == "tiny":
        return [("tiny", 2)], 0, 2
    if device.type == "cuda":
        return [(name, n) for name, n in GPU_CASES if name in QUICK_PRESETS or size == "full"], 2, 10
    return [(name, 2 if size == "quick" else n) for name, n in CPU_CASES], 1, 2 if size == "quick" else 3


def _measure(vae: VAE, name: str, n: int, backend: str, device: torch.device, warmup: int, repeats: int) -> dict:
    """One row: images/s of sampling n images on `backend`, or why it failed."""
    row = {"suite": "sample", "name": name, "backend": backend, "batch": n, "dtype": "float32"}
    try:
        torch.manual_seed(0)
        sample = functools.partial(vae.forward_uncond_samples, n, backend=backend)
        timing = time_calls(sample, [()], device, warmup=warmup, repeats=repeats)
        row.update(timing.fields(), images_per_s=n / (timing.median_ms * 1e-3))
        result = f"{timing.median_ms:10.1f} ms {row['images_per_s']:8.1f} images/s"
    except Exception as error:  # a backend that cannot sample is reported in its row, not fatal
        row.update(images_per_s=float("nan"), error=f"{type(error).__name__}: {' '.join(str(error).split())[:300]}")
        result = row["error"]
    print(f"  sample {name:10s} {backend:9s} n={n:3d} {result}", flush=True)
    return row


def run(
    device: torch.device, *, size: str = "full", backends: list[str] | None = None, with_compile: bool = True
) -> list[dict]:
    """Images/s of each case × backend (default: every kernel backend and the original); with_compile is
    accepted for a uniform suite signature and unused (sampling compares the fused and the original ops only)."""
    del with_compile
    if backends is None:
        backends = default_backends(device, with_compile=False)
    cases, warmup, repeats = _cases(device, size)
    rows = []
    for name, n in cases:
        H = preset(name)
        torch.manual_seed(0)
        with torch.device(device):
            vae = VAE(H).eval()
        rows += [_measure(vae, name, n, backend, device, warmup, repeats) for backend in backends]
        del vae
    return rows
