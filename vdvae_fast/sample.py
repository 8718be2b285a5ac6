"""Sampling from a trained VDVAE, and the image grids the trainer writes.

Command line (our checkpoints and openai/vdvae's released ``*-model-ema.th`` files alike)::

    python -m vdvae_fast.sample --restore_ema_path saved_models/demo/latest.pt --n 16 --temperature 0.9 \\
        --out samples.png
    python -m vdvae_fast.sample --restore_ema_path imagenet64-iter-1600000-model-ema.th --hps imagenet64 --out s.png

The trainer's grid follows VDVAE's write_images: one row of validation images; rows of reconstructions that
keep the first k posterior latents and sample the remaining layers at temperature 0.1, for a few k spread over
the depth (num_variables_visualize of them); rows of unconditional samples at temperatures 1.0, 0.9, 0.8, 0.7
(the first num_temperatures_visualize). Reading top to bottom shows which layers carry what.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError, load_module_state, read_weights, saved_hparams
from .hparams import PRESETS, preset
from .model import VAE
from .ops import BACKENDS
from .runtime import resolve_device

__all__ = [
    "UNCONDITIONAL_TEMPERATURES",
    "RECONSTRUCTION_TEMPERATURE",
    "main",
    "reconstruction_rows",
    "save_png",
    "stack_rows",
    "tile",
]

USAGE_ERROR = 2  # argparse's status for a bad command line; the same for every error a user can fix
UNCONDITIONAL_TEMPERATURES = (1.0, 0.9, 0.8, 0.7)
RECONSTRUCTION_TEMPERATURE = 0.1


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------


def _uint8_images(images: np.ndarray | torch.Tensor) -> np.ndarray:
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3); got {array.dtype} {array.shape}")
    return array


def stack_rows(rows: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
    """VDVAE's grid: row r holds the n images of rows[r] side by side; no borders. (R*H, n*W, 3) uint8."""
    arrays = [_uint8_images(row) for row in rows]
    n, height, width, _ = arrays[0].shape
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError(f"every row needs the same image count and size; got {[a.shape for a in arrays]}")
    grid = np.stack(arrays)  # (R, n, H, W, 3)
    return grid.transpose(0, 2, 1, 3, 4).reshape(len(arrays) * height, n * width, 3)


def tile(images: np.ndarray | torch.Tensor, columns: int | None = None) -> np.ndarray:
    """Images in a grid of `columns` (default: nearly square), filled row by row; empty cells stay black."""
    array = _uint8_images(images)
    n, height, width, _ = array.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    padded = np.zeros((rows * columns, height, width, 3), np.uint8)
    padded[:n] = array
    return padded.reshape(rows, columns, height, width, 3).transpose(0, 2, 1, 3, 4).reshape(rows * height, -1, 3)


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an (H, W, 3) uint8 array as a PNG with Pillow."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path, format="PNG")
    return path


@torch.no_grad()
def reconstruction_rows(
    model: VAE, originals: torch.Tensor, x_input: torch.Tensor, H: Any, backend: str | None = None
) -> list[np.ndarray]:
    """The rows of VDVAE's training grid for one batch: originals (uint8 NHWC), partial reconstructions at
    t = 0.1 keeping the first k posterior latents, unconditional samples at decreasing temperatures."""
    n = len(originals)
    rows = [originals.cpu().numpy()]
    if int(H.num_variables_visualize) > 0:
        latents = [layer["z"] for layer in model.forward_get_latents(x_input, backend=backend)]
        n_kept = np.floor(np.linspace(0, 1, int(H.num_variables_visualize) + 2) * len(latents)).astype(int)[1:-1]
        for k in n_kept:
            rows.append(
                model.forward_samples_set_latents(n, latents[:k], t=RECONSTRUCTION_TEMPERATURE, backend=backend)
            )
    for t in UNCONDITIONAL_TEMPERATURES[: int(H.num_temperatures_visualize)]:
        rows.append(model.forward_uncond_samples(n, t=t, backend=backend))
    return [row.cpu().numpy() if isinstance(row, torch.Tensor) else row for row in rows]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vdvae_fast.sample",
        description="Draw unconditional samples from a trained VDVAE and write them as one PNG grid.",
    )
    parser.add_argument(
        "--restore_ema_path",
        "--restore_path",
        dest="path",
        required=True,
        help="a vdvae_fast checkpoint (its EMA weights are used; a run directory means its latest.pt) or an "
        "official openai/vdvae *-model-ema.th file",
    )
    parser.add_argument(
        "--hps",
        "--hparam_sets",
        dest="hps",
        choices=PRESETS,
        default=None,
        help="preset of the model; needed for official files (our checkpoints carry their hyperparameters)",
    )
    parser.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="prior temperature: sigma scaled by t (default 1.0)"
    )
    parser.add_argument("--out", default="samples.png", help="PNG file to write (default samples.png)")
    parser.add_argument("--columns", type=int, default=None, help="images per grid row (default: nearly square)")
    parser.add_argument("--n_batch", type=int, default=None, help="samples drawn per forward pass (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--backend", default=None, choices=BACKENDS, help="ops backend (default: the checkpoint's)")
    return parser


def _load_model(args: argparse.Namespace) -> VAE:
    """The VAE of args.path's weights: our checkpoint carries its hyperparameters, an official file needs --hps."""
    weights, checkpoint = read_weights(args.path, prefer_ema=True)
    if args.hps is not None:
        H = preset(args.hps)
    elif checkpoint is not None:
        H = saved_hparams(checkpoint)
    else:
        raise ValueError(f"{args.path} is an official VDVAE state dict: name its preset with --hps")
    model = VAE(H, backend=args.backend)
    load_module_state(model, weights, str(args.path), "the weights")
    return model


def sample(args: argparse.Namespace) -> Path:
    """Load the weights, draw args.n samples at args.temperature and write the grid; returns the PNG path."""
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    device = resolve_device(args.device)
    model = _load_model(args).to(device).eval()
    torch.manual_seed(args.seed)
    per_pass = args.n_batch or args.n
    images = [model.forward_uncond_samples(min(per_pass, args.n - i), t=args.temperature).cpu()
              for i in range(0, args.n, per_pass)]  # fmt: skip
    return save_png(tile(torch.cat(images), args.columns), args.out)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status: 0, or USAGE_ERROR (2, as for a bad flag) for an error a user
    can fix."""
    args = _build_parser().parse_args(argv)
    try:
        path = sample(args)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"sample: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    print(f"wrote {args.n} samples at temperature {args.temperature} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
