"""Sampling from a trained VDVAE, and the image grids the trainer writes.

Command line (our checkpoints and openai/vdvae's released ``*-model-ema.th`` files alike)::

    python -m vdvae_fast.sample --restore_ema_path saved_models/demo/latest.pt --n 16 --temperature 0.9
    # -> saved_models/demo/samples-latest-t0.9-seed0.png
    python -m vdvae_fast.sample --restore_ema_path imagenet64-iter-1600000-model-ema.th --hps imagenet64 --out s.png
    python -m vdvae_fast.sample --restore_ema_path saved_models/demo --temperature linear:1.0:0.6  # per layer

--temperature is one value for every stochastic layer, one comma-separated value per layer (top, 1x1, first),
or a schedule over depth, ``linear:START:END`` (Efficient-VDVAE's temperature settings offer the same three).

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
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError, load_module_state, read_weights, saved_hparams
from .hparams import PRESETS, preset
from .model import VAE
from .ops import BACKENDS
from .runtime import check_device_name, resolve_device

__all__ = [
    "CELL_PIXELS",
    "GAP_PIXELS",
    "TEMPERATURE_SCHEDULES",
    "LayerTemperatures",
    "UNCONDITIONAL_TEMPERATURES",
    "RECONSTRUCTION_TEMPERATURE",
    "add_model_arguments",
    "check_writable",
    "load_model",
    "main",
    "output_path",
    "parse_temperature",
    "reconstruction_rows",
    "save_png",
    "stack_rows",
    "tile",
]

USAGE_ERROR = 2  # argparse's status for a bad command line; the same for every error a user can fix
UNCONDITIONAL_TEMPERATURES = (1.0, 0.9, 0.8, 0.7)
RECONSTRUCTION_TEMPERATURE = 0.1
CELL_PIXELS = 64  # grids upscale each image to at least this many pixels a side
GAP_PIXELS = 4  # white pixels between neighbouring images of a grid
TEMPERATURE_SCHEDULES = ("linear",)


# --------------------------------------------------------------------------------------------
# Temperatures per layer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerTemperatures:
    """The prior temperature of every stochastic layer, as the user wrote it: one value for all layers, one
    value per layer (top, 1x1, first), or a schedule over depth whose values are known once the layer count is."""

    text: str
    values: tuple[float, ...]
    schedule: str | None = None
    flag: str = "--temperature"

    def for_layers(self, n_layers: int) -> float | list[float]:
        """The temperature argument of the model's sampling methods: one float, or one value per layer.

        ``linear:START:END`` runs from START at the first (top) layer to END at the last, both included
        (Efficient-VDVAE's linear setting steps by (END - START) / n_layers and stops one step short of END)."""
        if self.schedule == "linear":
            start, end = self.values
            if n_layers == 1:
                return [start]
            return [start + (end - start) * i / (n_layers - 1) for i in range(n_layers)]
        if len(self.values) == 1:
            return self.values[0]
        if len(self.values) != n_layers:
            raise ValueError(
                f"{self.flag} lists {len(self.values)} values but the model has {n_layers} stochastic layers: give "
                f"one value, {n_layers} comma-separated values (top layer first) or a schedule such as linear:1.0:0.6"
            )
        return list(self.values)

    def label(self) -> str:
        """A short name for file names: the value, linearSTART-END, or per-layer."""
        if self.schedule is not None:
            return f"{self.schedule}{self.values[0]:g}-{self.values[1]:g}"
        return f"{self.values[0]:g}" if len(self.values) == 1 else "per-layer"


def parse_temperature(text: str, flag: str = "--temperature") -> LayerTemperatures:
    """Read a temperature setting: ``0.9``, ``1.0,0.9,...`` (one per layer) or ``linear:1.0:0.6``. Every value
    must be a finite number at least 0; `flag` names the setting in error messages."""
    text = str(text).strip()
    forms = "a number, comma-separated numbers (one per layer) or a schedule linear:START:END"
    schedule, values_text = None, text.split(",")
    if ":" in text:
        schedule, *values_text = text.split(":")
        if schedule not in TEMPERATURE_SCHEDULES:
            raise ValueError(
                f"{flag} {text!r}: unknown schedule {schedule!r}; schedules: {', '.join(TEMPERATURE_SCHEDULES)} "
                "(e.g. linear:1.0:0.6, from the top layer to the last)"
            )
        if len(values_text) != 2:
            raise ValueError(f"{flag} {text!r}: the {schedule} schedule takes START:END, e.g. {schedule}:1.0:0.6")
    try:
        values = tuple(float(value) for value in values_text)
    except ValueError:
        raise ValueError(f"{flag} {text!r} is not {forms}") from None
    for index, value in enumerate(values):
        if not (math.isfinite(value) and value >= 0):
            which = "" if len(values) == 1 and schedule is None else f" (value {index + 1} of {text!r})"
            raise ValueError(f"{flag} must be a finite number at least 0{which}, got {value}")
    return LayerTemperatures(text, values, schedule, flag)


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------


def _uint8_images(images: np.ndarray | torch.Tensor) -> np.ndarray:
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3); got {array.dtype} {array.shape}")
    return array


def _grid(cells: np.ndarray) -> np.ndarray:
    """(R, C, H, W, 3) uint8 cells as one image: each upscaled nearest-neighbour to at least CELL_PIXELS a
    side, GAP_PIXELS of white between neighbours (16-pixel images side by side are unreadable otherwise)."""
    rows, columns, height, width, _ = cells.shape
    scale = max(1, math.ceil(CELL_PIXELS / min(height, width)))
    cells = cells.repeat(scale, axis=2).repeat(scale, axis=3)
    step_y, step_x = height * scale + GAP_PIXELS, width * scale + GAP_PIXELS
    grid = np.full((rows * step_y - GAP_PIXELS, columns * step_x - GAP_PIXELS, 3), 255, np.uint8)
    for r in range(rows):
        for c in range(columns):
            grid[r * step_y : r * step_y + height * scale, c * step_x : c * step_x + width * scale] = cells[r, c]
    return grid


def stack_rows(rows: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
    """VDVAE's grid: row r holds the n images of rows[r] side by side, upscaled and spaced as _grid does."""
    arrays = [_uint8_images(row) for row in rows]
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError(f"every row needs the same image count and size; got {[a.shape for a in arrays]}")
    return _grid(np.stack(arrays))


def tile(images: np.ndarray | torch.Tensor, columns: int | None = None) -> np.ndarray:
    """Images in a grid of `columns` (default: nearly square), filled row by row, upscaled and spaced as _grid
    does; empty cells stay black."""
    array = _uint8_images(images)
    n, height, width, _ = array.shape
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    padded = np.zeros((rows * columns, height, width, 3), np.uint8)
    padded[:n] = array
    return _grid(padded.reshape(rows, columns, height, width, 3))


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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that name a trained model and where it runs, shared by the sample, latents and analyze
    commands: --restore_ema_path (dest path), --hps, --device, --backend; load_model takes them."""
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
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--backend", default=None, choices=BACKENDS, help="ops backend (default: the checkpoint's)")


def _build_parser(prog: str = "python -m vdvae_fast.sample") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Draw unconditional samples from a trained VDVAE and write them as one PNG grid (each image "
        f"upscaled to at least {CELL_PIXELS} pixels, {GAP_PIXELS} white pixels apart).",
    )
    add_model_arguments(parser)
    parser.add_argument("--n", type=int, default=16, help="number of samples, at least 1 (default 16)")
    parser.add_argument(
        "--temperature",
        default="1.0",
        help="prior temperature, sigma scaled by t: one value for every layer, one comma-separated value per "
        "stochastic layer (top first), or linear:START:END over depth; finite numbers at least 0 (default 1.0)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="PNG file to write (default: samples-<checkpoint>-t<temperature>-seed<seed>.png in the checkpoint's "
        "folder, i.e. its run folder)",
    )
    parser.add_argument("--columns", type=int, default=None, help="images per grid row, at least 1 (default: "
                        "nearly square)")  # fmt: skip
    parser.add_argument("--n_batch", type=int, default=None, help="samples drawn per forward pass, at least 1 "
                        "(default: all)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="random seed, at least 0 (default 0)")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Refuse values that would fail late or write a useless grid, naming the flag and what is valid."""
    for flag, value in (("n", args.n), ("n_batch", args.n_batch), ("columns", args.columns)):
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be at least 1, got {value}")
    parse_temperature(args.temperature)
    if args.seed < 0:
        raise ValueError(f"--seed must be at least 0, got {args.seed}")
    check_device_name(args.device)


def output_path(args: argparse.Namespace) -> Path:
    """--out, or a name saying what was drawn in the folder of the checkpoint (a run folder stays whole)."""
    if args.out is not None:
        return Path(args.out).expanduser()
    weights = Path(args.path).expanduser()
    folder, stem = (weights, "latest") if weights.is_dir() else (weights.parent, weights.stem)
    return folder / f"samples-{stem}-t{parse_temperature(args.temperature).label()}-seed{args.seed}.png"


def check_writable(out: Path, what: str = ".png file") -> None:
    """Prove that `out` can be written before any sampling: not a directory, its folder creatable and writable.
    `what` says in the error what --out should name."""
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory: give the path of the {what} to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(
            f"--out {str(out)!r}: cannot write in {str(out.parent)!r} ({err.strerror or err}); give a writable path"
        ) from err


def load_model(path: str | os.PathLike, hps: str | None = None, backend: str | None = None) -> VAE:
    """The VAE of the weights at `path` (its EMA weights for our checkpoints): our checkpoint carries its
    hyperparameters, an official openai/vdvae file needs its preset `hps`. `backend`: the ops backend (default:
    the hyperparameters')."""
    weights, checkpoint = read_weights(path, prefer_ema=True)
    if hps is not None:
        H = preset(hps)
    elif checkpoint is not None:
        H = saved_hparams(checkpoint)
    else:
        raise ValueError(f"{path} is an official VDVAE state dict: name its preset with --hps")
    model = VAE(H, backend=backend)
    load_module_state(model, weights, str(path), "the weights")
    return model


def sample(args: argparse.Namespace) -> Path:
    """Check the arguments and the output, load the weights, draw args.n samples at args.temperature (one value
    or per layer) and write the grid; returns the PNG path."""
    _check_args(args)
    out = output_path(args)
    check_writable(out)
    device = resolve_device(args.device)
    model = load_model(args.path, args.hps, args.backend).to(device).eval()
    t = parse_temperature(args.temperature).for_layers(len(model.decoder.dec_blocks))
    torch.manual_seed(args.seed)
    per_pass = args.n_batch or args.n
    images = [model.forward_uncond_samples(min(per_pass, args.n - i), t=t).cpu()
              for i in range(0, args.n, per_pass)]  # fmt: skip
    return save_png(tile(torch.cat(images), args.columns), out)


def main(argv: Sequence[str] | None = None, prog: str = "python -m vdvae_fast.sample") -> int:
    """The command line (`prog` names it in --help and usage errors); returns the exit status: 0, or USAGE_ERROR
    (2, as for a bad flag) for an error a user can fix."""
    args = _build_parser(prog).parse_args(argv)
    try:
        path = sample(args)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"sample: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as err:  # the output's disk filled or went away after the check
        print(f"sample: error: cannot write {output_path(args)}: {err.strerror or err}", file=sys.stderr)
        return USAGE_ERROR
    print(f"wrote {args.n} samples at temperature {args.temperature} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
