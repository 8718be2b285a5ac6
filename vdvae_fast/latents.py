"""Using a trained VDVAE: encode images to their latents, decode latents back to images, reconstruct images from
the first k stochastic layers (VDVAE's Figure 4) and interpolate between two images in latent space.

Command line (our checkpoints, or openai/vdvae's released ``*-model-ema.th`` files with ``--hps``)::

    python -m vdvae_fast.latents encode --restore_ema_path saved_models/demo --images photos/ --out z.npz
    python -m vdvae_fast.latents decode --restore_ema_path saved_models/demo --latents z.npz --out decoded/
    python -m vdvae_fast.latents reconstruct --restore_ema_path saved_models/demo --images photos/ --out rows.png
    python -m vdvae_fast.latents interpolate --restore_ema_path saved_models/demo --images a.png b.png --out ab.png

Images come from folders of PNG/JPEG files, single image files or ``.npy`` files of uint8 (N, H, W, 3), at the
model's image size (``--resize`` center-crops and resizes image files instead). The latent file is a ``.npz``
that plain numpy reads (``np.load(path)``, no pickle); docs/latents.md describes it. Images are written as
the DMoL's mean (``--output mean``, the default: deterministic) or as draws from it (``--output sample``, as
openai/vdvae writes them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import data
from .checkpoint import CheckpointError
from .hparams import ARCHITECTURE_KEYS, DEFAULTS, PRESETS, Hyperparams, preset
from .model import VAE, Temperature
from .runtime import resolve_device
from .sample import (
    RECONSTRUCTION_TEMPERATURE,
    add_model_arguments,
    check_writable,
    load_model,
    parse_temperature,
    save_png,
    stack_rows,
    tile,
)

__all__ = [
    "FORMAT_VERSION",
    "OUTPUTS",
    "Latents",
    "architecture_of",
    "check_fits",
    "decode",
    "default_layer_counts",
    "dmol_mean",
    "encode",
    "interpolate",
    "load_images",
    "load_latents",
    "main",
    "preset_of",
    "reconstruction_rows",
    "save_latents",
    "slerp",
]

FORMAT_VERSION = 1
OUTPUTS = ("mean", "sample")  # how a decoded image is read off the DMoL
USAGE_ERROR = 2


# --------------------------------------------------------------------------------------------
# The latent file
# --------------------------------------------------------------------------------------------


def architecture_of(H: Hyperparams) -> dict[str, Any]:
    """The hyperparameters that shape the network (hparams.ARCHITECTURE_KEYS): latents fit a model when these agree."""
    return {key: H.get(key, DEFAULTS.get(key)) for key in ARCHITECTURE_KEYS}  # a key H predates: its default


def preset_of(H: Hyperparams) -> str:
    """The name of the preset whose network H builds, or "custom"."""
    architecture = architecture_of(H)
    return next((name for name in PRESETS if architecture_of(preset(name)) == architecture), "custom")


@dataclass
class Latents:
    """The posterior latents of N images, one float32 array (N, zdim, res, res) per stochastic layer, top (1x1)
    layer first: z, drawn from the posterior, and its mean mu_q and standard deviation sigma_q; with the network
    that made them (preset name and architecture hyperparameters) and the images' names."""

    z: list[np.ndarray]
    mu_q: list[np.ndarray]
    sigma_q: list[np.ndarray]
    preset: str
    architecture: dict[str, Any]
    names: list[str]

    @property
    def n_layers(self) -> int:
        return len(self.z)

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        """(zdim, res, res) of each layer."""
        return [tuple(int(d) for d in z.shape[1:]) for z in self.z]


def _key(name: str, layer: int, n_layers: int) -> str:
    """The array name of a layer: two digits (more for models with 100 layers or more), e.g. z_00."""
    return f"{name}_{layer:0{max(2, len(str(n_layers - 1)))}d}"


def save_latents(latents: Latents, path: str | os.PathLike) -> Path:
    """Write `latents` as one .npz file (docs/latents.md) that np.load reads without pickle."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {
        "format_version": np.array(FORMAT_VERSION),
        "preset": np.array(latents.preset),
        "n_layers": np.array(latents.n_layers),
        "shapes": np.array(latents.shapes, dtype=np.int64).reshape(latents.n_layers, 3),
        "hparams": np.array(json.dumps(latents.architecture, sort_keys=True)),
        "names": np.array(latents.names, dtype=str),
    }
    for name in ("z", "mu_q", "sigma_q"):
        for layer, array in enumerate(getattr(latents, name)):
            arrays[_key(name, layer, latents.n_layers)] = np.asarray(array, dtype=np.float32)
    with open(path, "wb") as f:  # np.savez would append .npz to a name without it
        np.savez(f, **arrays)
    return path


def load_latents(path: str | os.PathLike) -> Latents:
    """Read a latent file written by save_latents (or by hand in its format); a missing file or array is named."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"latent file {str(path)!r} does not exist (write one with the encode command)")
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a latent .npz file: {err}") from err
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not a latent .npz file: it holds a single array (write latents with encode)")
    with arrays:
        stored = {key: arrays[key] for key in arrays.files}
    missing = [key for key in ("format_version", "preset", "n_layers", "hparams") if key not in stored]
    if missing:
        raise ValueError(f"{path} is not a latent file of this format: it lacks {', '.join(missing)} (docs/latents.md)")
    if int(stored["format_version"]) != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {int(stored['format_version'])}; this reads {FORMAT_VERSION}")
    n_layers = int(stored["n_layers"])
    layers: dict[str, list[np.ndarray]] = {}
    for name in ("z", "mu_q", "sigma_q"):
        keys = [_key(name, layer, n_layers) for layer in range(n_layers)]
        absent = [key for key in keys if key not in stored]
        if absent and name == "z":
            raise ValueError(f"{path} says it holds {n_layers} layers but lacks {', '.join(absent[:3])}")
        layers[name] = [] if absent else [stored[key].astype(np.float32, copy=False) for key in keys]
    if len({z.shape[0] for z in layers["z"]}) > 1:
        raise ValueError(f"{path}: the layers hold different numbers of images: {[z.shape[0] for z in layers['z']]}")
    count = layers["z"][0].shape[0] if n_layers else 0
    names = [str(name) for name in stored["names"]] if "names" in stored else [str(i) for i in range(count)]
    return Latents(
        layers["z"], layers["mu_q"], layers["sigma_q"], str(stored["preset"]), json.loads(str(stored["hparams"])), names
    )


def check_fits(latents: Latents, model: VAE, source: str = "the latents") -> None:
    """Refuse latents of another network (naming both presets and the first differing hyperparameter), more layers
    than the model has, or a layer of another shape."""
    mine = architecture_of(model.H)
    theirs = {key: latents.architecture.get(key, DEFAULTS.get(key)) for key in ARCHITECTURE_KEYS}  # older files
    differing = [key for key in ARCHITECTURE_KEYS if theirs[key] != mine[key]]
    if differing:
        key = differing[0]
        raise ValueError(
            f"{source} come from preset {latents.preset!r} ({key}={theirs[key]!r}), but this model "
            f"is preset {preset_of(model.H)!r} ({key}={mine[key]!r}): decode them with the checkpoint that encoded them"
        )
    blocks = model.decoder.dec_blocks
    if latents.n_layers > len(blocks):
        raise ValueError(f"{source} hold {latents.n_layers} layers, but this model has {len(blocks)} stochastic layers")
    for layer, (shape, block) in enumerate(zip(latents.shapes, blocks, strict=False)):
        if shape != (block.zdim, block.base, block.base):
            raise ValueError(
                f"{source}: layer {layer} is {shape}, but this model's layer {layer} takes "
                f"{(block.zdim, block.base, block.base)} (zdim, res, res)"
            )


# --------------------------------------------------------------------------------------------
# Images in
# --------------------------------------------------------------------------------------------


def _image_file_problem(file: Path, size: int | None) -> str | None:
    problem = data._image_problem(str(file), size)
    return None if problem is None else f"{file}: {problem}"


def load_images(paths: Sequence[str | os.PathLike], size: int, resize: bool = False) -> tuple[np.ndarray, list[str]]:
    """uint8 (N, size, size, 3) images and their names from folders of PNG/JPEG files (recursively, sorted), image
    files and .npy files of uint8 (N, H, W, 3), in the order given. Image files of another size are refused, or
    center-cropped and resized with `resize`."""
    arrays, names = [], []
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"{str(path)!r} does not exist: give a folder of PNG/JPEG images, an image file or a .npy file of "
                "uint8 (N, H, W, 3) images"
            )
        if path.suffix.lower() == ".npy":
            array = np.asarray(data._open_npy(path, size))
            arrays.append(array)
            names += [f"{path.name}[{i}]" for i in range(len(array))]
            continue
        if path.is_dir():
            files = data._image_files(path)
        elif path.suffix.lower() in data.IMAGE_SUFFIXES:
            files = [path]
        else:
            raise ValueError(f"{str(path)!r} is not a folder, a PNG/JPEG file or a .npy file")
        problems = [p for file in files if (p := _image_file_problem(file, None if resize else size)) is not None]
        if problems:
            hint = "" if resize else f" (this model takes {size}x{size} images; --resize crops and resizes)"
            raise data.DataError(f"{len(problems)} image(s) cannot be used{hint}: " + "; ".join(problems[:10]))
        images = data.ImageFiles(files, size, resize=resize)
        arrays.append(np.stack([images[i].numpy() for i in range(len(images))]))
        names += [file.name if path.is_file() else file.relative_to(path).as_posix() for file in files]
    if not arrays:
        raise ValueError("no images given")
    return np.concatenate(arrays), names


# --------------------------------------------------------------------------------------------
# Encode, decode
# --------------------------------------------------------------------------------------------


def _batches(n: int, batch: int) -> list[slice]:
    if batch < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch}")
    return [slice(i, min(i + batch, n)) for i in range(0, n, batch)]


@torch.no_grad()
def encode(
    model: VAE, images: np.ndarray, names: Sequence[str] | None = None, batch: int = 32, preset_name: str | None = None
) -> Latents:
    """The posterior latents of uint8 (N, H, W, 3) images, drawn with seeds from torch's default generator, one
    per layer and batch (torch.manual_seed and the same batch size reproduce them). `preset_name` is recorded
    (default: preset_of(model.H))."""
    device = model.decoder.gain.device
    per_layer: dict[str, list[list[np.ndarray]]] = {"z": [], "mu_q": [], "sigma_q": []}
    for part in _batches(len(images), batch):
        x, _ = data.preprocess(np.ascontiguousarray(images[part]), model.H, device)
        stats = model.forward_get_latents(x)
        for name, layers in per_layer.items():
            if not layers:
                layers.extend([] for _ in stats)
            for layer, layer_stats in zip(layers, stats, strict=True):
                layer.append(layer_stats[name].float().cpu().numpy())
    z, mu_q, sigma_q = ([np.concatenate(parts) for parts in per_layer[name]] for name in ("z", "mu_q", "sigma_q"))
    names = [str(i) for i in range(len(images))] if names is None else list(names)
    return Latents(z, mu_q, sigma_q, preset_name or preset_of(model.H), architecture_of(model.H), names)


def dmol_mean(logits: Tensor) -> Tensor:
    """The mean image of a discretized mixture of logistics, (B, 3, H, W) in [-1, 1], from its logits (B, 10*M, H, W)
    (the layout of docs/kernel-contract.md): each mixture's channel means with the RGB coupling applied to the
    previous channels' means, weighted by the mixture probabilities; the logistic tails beyond [-1, 1] are not
    folded in, and the result is clamped to [-1, 1]. Deterministic, unlike a draw."""
    m = logits.shape[1] // 10
    logits = logits.float()
    weights = torch.softmax(logits[:, :m], dim=1)
    blocks = [logits[:, m + 3 * m * c : m + 3 * m * (c + 1)] for c in range(3)]
    means = [block[:, :m] for block in blocks]
    coupling = [torch.tanh(block[:, 2 * m :]) for block in blocks]
    red = means[0]
    green = means[1] + coupling[0] * red
    blue = means[2] + coupling[1] * red + coupling[2] * green
    return torch.stack([(weights * channel).sum(dim=1) for channel in (red, green, blue)], dim=1).clamp(-1.0, 1.0)


def _images(model: VAE, px_z: Tensor, output: str) -> np.ndarray:
    """uint8 (B, H, W, 3) images read off the DMoL of px_z: its mean or a draw, converted as openai/vdvae does."""
    if output == "sample":
        return model.decoder.out_net.sample(px_z, model.backend).cpu().numpy()
    image = dmol_mean(model.decoder.out_net(px_z))
    return ((image + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")


@torch.no_grad()
def decode(
    model: VAE,
    latents: Sequence[np.ndarray | Tensor],
    t: Temperature = None,
    output: str = "mean",
    batch: int = 32,
    n: int | None = None,
) -> np.ndarray:
    """uint8 (N, H, W, 3) images whose first len(latents) layers take the given z (N images each); the later
    layers sample from the prior at temperature t (one value or one per layer; None: 1). With no latents, n
    says how many images to draw. With output "sample" the images are draws from the DMoL; all draws take
    their seeds from torch's default generator."""
    _check_output(output)
    if n is None:
        if not latents:
            raise ValueError("no latents given: give z of at least the first layer, or the number of images n")
        n = len(latents[0])
    device = model.decoder.gain.device
    images = []
    for part in _batches(n, batch):
        z = [torch.as_tensor(layer[part]).to(device) for layer in latents]
        px_z = model.decoder.forward_manual_latents(part.stop - part.start, z, t=t, backend=model.backend)
        images.append(_images(model, px_z, output))
    return np.concatenate(images)


# --------------------------------------------------------------------------------------------
# Reconstruct from the first k layers, interpolate
# --------------------------------------------------------------------------------------------


def default_layer_counts(n_layers: int, rows: int = 6) -> list[int]:
    """About `rows` layer counts from 1 to n_layers, spaced geometrically (the top layers change most)."""
    return sorted({int(round(k)) for k in np.geomspace(1, n_layers, rows)})


def _check_layer_counts(counts: Sequence[int], n_layers: int) -> None:
    bad = [k for k in counts if not 0 <= k <= n_layers]
    if bad:
        raise ValueError(
            f"layer count {bad[0]} is out of range: this model has {n_layers} stochastic layers, so k (the layers "
            f"kept from the posterior) runs from 0 to {n_layers}"
        )


def reconstruction_rows(
    model: VAE,
    images: np.ndarray,
    layer_counts: Sequence[int],
    t: Temperature = RECONSTRUCTION_TEMPERATURE,
    output: str = "mean",
    batch: int = 32,
) -> list[np.ndarray]:
    """VDVAE's Figure 4: the images, then one row per k in layer_counts of reconstructions that keep the first k
    layers' posterior z (one encoding for all rows) and sample the others from the prior at temperature t."""
    n_layers = len(model.decoder.dec_blocks)
    _check_layer_counts(layer_counts, n_layers)
    _check_output(output)
    z = encode(model, images, batch=batch).z
    return [np.asarray(images)] + [decode(model, z[:k], t, output, batch, len(images)) for k in layer_counts]


def slerp(a: np.ndarray, b: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Spherical interpolation from a to b (one image's z of one layer, any shape) at each weight w in [0, 1]:
    sin((1 - w)θ)/sin θ · a + sin(wθ)/sin θ · b, θ the angle between them. Between two Gaussian draws this keeps
    the norm typical where a straight line would pass near the origin; parallel vectors are interpolated
    linearly. Weights 0 and 1 give a and b exactly. Returns (len(weights), *a.shape) float32."""
    a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    norms = np.linalg.norm(a64) * np.linalg.norm(b64)
    angle = math.acos(float(np.clip(a64 @ b64 / norms, -1.0, 1.0))) if norms > 0 else 0.0
    out = []
    for w in weights:
        if math.sin(angle) < 1e-6:
            wa, wb = 1.0 - w, float(w)
        else:
            wa, wb = math.sin((1.0 - w) * angle) / math.sin(angle), math.sin(w * angle) / math.sin(angle)
        out.append((wa * a64 + wb * b64).reshape(np.shape(a)))
    return np.stack(out).astype(np.float32)


def interpolate(model: VAE, images: np.ndarray, steps: int = 8, output: str = "mean", batch: int = 32) -> np.ndarray:
    """uint8 (steps, H, W, 3): the decodings of z spherically interpolated, layer by layer, from the first image's
    posterior z to the second's (one encoding of both); the ends are the two images' reconstructions."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (the two ends), got {steps}")
    if len(images) != 2:
        raise ValueError(f"interpolation runs between 2 images, got {len(images)}")
    _check_output(output)
    z = encode(model, images, batch=batch).z
    weights = np.linspace(0.0, 1.0, steps)
    path = [slerp(layer[0], layer[1], weights) for layer in z]
    return decode(model, path, None, output, batch)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parse_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--layers {text!r} is not a comma-separated list of layer counts, e.g. 1,2,4,8") from None
    return counts


def _build_parser(prog: str = "python -m vdvae_fast.latents") -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_model_arguments(common)
    common.add_argument("--seed", type=int, default=0, help="random seed of the posterior and prior draws (default 0)")
    common.add_argument("--n_batch", type=int, default=32, help="images per forward pass, at least 1 (default 32)")
    images = argparse.ArgumentParser(add_help=False)
    images.add_argument("--images", nargs="+", required=True,
                        help="folders of PNG/JPEG images, image files or .npy files of uint8 (N, H, W, 3)")  # fmt: skip
    images.add_argument("--resize", action="store_true",
                        help="center-crop and resize image files to the model's size instead of refusing them")  # fmt: skip
    shown = argparse.ArgumentParser(add_help=False)
    shown.add_argument("--output", choices=OUTPUTS, default="mean",
                       help="the DMoL's mean image (deterministic, default) or a draw from it (as openai/vdvae)")  # fmt: skip

    parser = argparse.ArgumentParser(prog=prog, description="Encode, decode, reconstruct and interpolate images "
                                     "with a trained VDVAE.")  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    encode_parser = commands.add_parser("encode", parents=[common, images], help="images -> a latent .npz file")
    encode_parser.add_argument("--out", required=True, help="the .npz file to write")
    decode_parser = commands.add_parser("decode", parents=[common, shown], help="a latent .npz file -> images")
    decode_parser.add_argument("--latents", required=True, help="a latent .npz file (from encode)")
    decode_parser.add_argument("--temperature", default="1.0",
                               help="prior temperature of the layers the file does not hold: one value, one per "
                               "layer or linear:START:END (default 1.0)")  # fmt: skip
    decode_parser.add_argument("--out", required=True,
                               help="a .png file (one grid) or a folder (one PNG per image, 00000.png, ...)")  # fmt: skip
    decode_parser.add_argument("--columns", type=int, default=None, help="images per grid row (default: square)")
    recon_parser = commands.add_parser("reconstruct", parents=[common, images, shown],
                                       help="VDVAE's Figure 4: rows keeping the first k layers")  # fmt: skip
    recon_parser.add_argument("--layers", default=None,
                              help="comma-separated layer counts k, one row each (default: about 6 from 1 to all)")  # fmt: skip
    recon_parser.add_argument("--temperature", default=str(RECONSTRUCTION_TEMPERATURE),
                              help="prior temperature of the layers after k: one value, one per layer or "
                              f"linear:START:END (default {RECONSTRUCTION_TEMPERATURE})")  # fmt: skip
    recon_parser.add_argument("--n", type=int, default=8, help="images (columns) used, at least 1 (default 8)")
    recon_parser.add_argument("--out", required=True, help="the .png grid to write")
    interp_parser = commands.add_parser("interpolate", parents=[common, images, shown],
                                        help="a strip of images between two images")  # fmt: skip
    interp_parser.add_argument("--pair", type=int, nargs=2, default=(0, 1), metavar=("I", "J"),
                               help="indices of the two images among those given (default 0 1)")  # fmt: skip
    interp_parser.add_argument("--steps", type=int, default=8, help="images in the strip, ends included (default 8)")
    interp_parser.add_argument("--out", required=True, help="the .png strip to write")
    return parser


def _checked_out(args: argparse.Namespace) -> Path:
    out = Path(args.out).expanduser()
    if args.command == "decode" and out.suffix.lower() != ".png":
        out.mkdir(parents=True, exist_ok=True)
        check_writable(out / "00000.png")
        return out
    check_writable(out, ".npz file" if args.command == "encode" else ".png file")
    return out


def _check_counts(args: argparse.Namespace) -> None:
    for flag, least in (("n_batch", 1), ("n", 1), ("steps", 2)):
        value = getattr(args, flag, None)
        if value is not None and value < least:
            ends = " (the two ends)" if flag == "steps" else ""
            raise ValueError(f"--{flag} must be at least {least}{ends}, got {value}")
    if args.seed < 0:
        raise ValueError(f"--seed must be at least 0, got {args.seed}")


def run(args: argparse.Namespace) -> str:
    """Carry out one command; returns what was written, for the user."""
    _check_counts(args)
    temperature = parse_temperature(args.temperature) if "temperature" in args else None
    out = _checked_out(args)
    device = resolve_device(args.device)
    model = load_model(args.path, args.hps, args.backend).to(device).eval()
    n_layers = len(model.decoder.dec_blocks)
    t = None if temperature is None else temperature.for_layers(n_layers)
    size = model.H.image_size
    torch.manual_seed(args.seed)
    if args.command == "decode":
        latents = load_latents(args.latents)
        check_fits(latents, model, f"the latents in {args.latents}")
        images = decode(model, latents.z, t, args.output, args.n_batch)
        if out.suffix.lower() == ".png":
            save_png(tile(images, args.columns), out)
        else:
            for index, image in enumerate(images):
                save_png(image, out / f"{index:05d}.png")
        return f"decoded {len(images)} images ({latents.n_layers} of {n_layers} layers given) to {out}"
    images, names = load_images(args.images, size, args.resize)
    if args.command == "encode":
        latents = encode(model, images, names, args.n_batch, args.hps)
        save_latents(latents, out)
        return f"encoded {len(images)} images ({n_layers} layers, preset {latents.preset}) to {out}"
    if args.command == "reconstruct":
        counts = default_layer_counts(n_layers) if args.layers is None else _parse_counts(args.layers)
        rows = reconstruction_rows(model, images[: args.n], counts, t, args.output, args.n_batch)
        save_png(stack_rows(rows), out)
        return f"wrote the originals and reconstructions from the first {counts} of {n_layers} layers to {out}"
    first, second = args.pair
    if not (0 <= first < len(images) and 0 <= second < len(images)):
        raise ValueError(
            f"--pair {first} {second}: the images given number {len(images)} (indices 0 to {len(images) - 1})"
        )
    strip = interpolate(model, images[[first, second]], args.steps, args.output, args.n_batch)
    save_png(stack_rows([strip]), out)
    return f"wrote {args.steps} images from {names[first]} to {names[second]} to {out}"


def main(argv: Sequence[str] | None = None, prog: str = "python -m vdvae_fast.latents") -> int:
    """The command line; returns the exit status: 0, or USAGE_ERROR (2, as for a bad flag) for an error a user
    can fix."""
    args = _build_parser(prog).parse_args(argv)
    try:
        message = run(args)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"latents {args.command}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as err:
        print(f"latents {args.command}: error: cannot write {args.out}: {err.strerror or err}", file=sys.stderr)
        return USAGE_ERROR
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
