"""Sample suite: unconditional sampling (VAE.forward_uncond_samples) per preset, fused backends against the
eager original (torch's sampler, as openai/vdvae).

Sampling runs the decoder's prior path and the DMoL sampler only, so it shows what the fused sample_gaussian and
dmol_sample ops change end to end. Each preset's model is built once and shared by every backend; fp32, like the
released samplers. The batch fills the GPU's convolutions while keeping one call under a second.
"""

from __future__ import annotations

import functools

import torch

from vdvae_fast import ops
from vdvae_fast.hparams import preset
from vdvae_fast.model import VAE

from .timing import median_ms

__all__ = ["CPU_CASES", "GPU_CASES", "run"]

# (preset, images per call)
GPU_CASES = (("cifar10", 32), ("imagenet32", 32), ("imagenet64", 16), ("ffhq256", 4))
CPU_CASES = (("cifar10", 4),)
QUICK_PRESETS = ("cifar10", "imagenet64")


def run(device: torch.device, *, quick: bool = False, with_compile: bool = True) -> list[dict]:
    """Images/s of each case × backend; with_compile is accepted for a uniform suite signature and unused
    (sampling is compared between the fused and the original ops only)."""
    del with_compile
    backends = [
        b for b in ops.available_backends(device) if b != "reference" and not (b == "triton" and device.type == "cpu")
    ]
    if device.type == "cuda":
        cases = [(name, n) for name, n in GPU_CASES if name in QUICK_PRESETS or not quick]
        warmup, repeats = 2, 10
    else:
        cases = [(name, 2 if quick else n) for name, n in CPU_CASES]
        warmup, repeats = 1, 2 if quick else 3
    rows = []
    for name, n in cases:
        H = preset(name)
        torch.manual_seed(0)
        with torch.device(device):
            vae = VAE(H).eval()
        found = []
        for backend in backends:
            torch.manual_seed(0)
            sample = functools.partial(vae.forward_uncond_samples, n, backend=backend)
            ms = median_ms(sample, [()], device, warmup=warmup, repeats=repeats)
            found.append(
                {
                    "suite": "sample",
                    "name": name,
                    "backend": backend,
                    "batch": n,
                    "dtype": "float32",
                    "median_ms": ms,
                    "images_per_s": n / (ms * 1e-3),
                }
            )
            print(f"  sample {name:10s} {backend:9s} n={n:3d} {ms:10.1f} ms {found[-1]['images_per_s']:8.1f} images/s")
        eager = next((r["median_ms"] for r in found if r["backend"] == "original"), float("nan"))
        for row in found:
            row["speedup_vs_eager"] = eager / row["median_ms"]
        rows += found
        del vae
    return rows
