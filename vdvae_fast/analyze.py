"""Where a trained VDVAE spends its rate: per layer and per resolution, active units, and the pruning curve.

Command line (our checkpoints and openai/vdvae's released ``*-model-ema.th`` files alike)::

    python -m vdvae_fast.analyze --restore_ema_path saved_models/demo/latest.pt --split valid
    # -> prints the tables, writes analysis-latest-valid.json and .png in the checkpoint's folder

Over the images of a split it measures:

- the rate of each stochastic layer and of each resolution, in bits per image dimension (they sum to the
  model's rate);
- active units: the latent dimensions whose KL(q||p), averaged over the images, exceeds 0.01 nats (the Ladder
  VAE's criterion, Sønderby et al. 2016, Table 2);
- the pruning curve: the ELBO when only the p% of latent dimensions with the highest average KL keep their
  posterior and all others take a draw from the prior and add no rate, for p in PRUNE_PERCENTS (Efficient-VDVAE
  found about 3% of the dimensions enough to reconstruct its inputs). At 100% it is
  the model's ELBO: the noise is seeded as training.evaluate seeds it, so the numbers match an evaluation of
  the same images in the same batches.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import ops
from .checkpoint import CheckpointError
from .data import DataError, Preprocessing, load_dataset
from .model import VAE
from .runtime import check_device_name, resolve_device
from .sample import add_model_arguments, load_model
from .training.evaluate import evaluation_subset
from .training.log import LN2

__all__ = ["ACTIVE_KL_NATS", "PRUNE_PERCENTS", "analyze", "keep_masks", "main", "plot", "run"]

USAGE_ERROR = 2  # argparse's status for a bad command line; the same for every error a user can fix
ACTIVE_KL_NATS = 0.01  # a latent dimension is active when its average KL exceeds this
PRUNE_PERCENTS = (1.0, 2.5, 5.0, 10.0, 25.0, 100.0)
SPLITS = ("valid", "test")
EVAL_SEED_OFFSET = 1000  # training.evaluate seeds the posterior noise with seed + 1000 (+ rank)


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def _batches(split: Any, n_batch: int) -> Any:
    for start in range(0, len(split), n_batch):
        yield torch.stack([split[i] for i in range(start, min(start + n_batch, len(split)))])


def _over_split(
    model: VAE,
    split: Any,
    preprocessing: Preprocessing,
    n_batch: int,
    seed: int,
    device: torch.device,
    keep: Sequence[Tensor | None] | None = None,
    per_dimension: bool = False,
) -> dict[str, Any]:
    """Sums over the split's images: distortion and per-layer KL (nats per image), and with per_dimension the
    analytic KL of every latent dimension (one tensor per layer, shaped like the layer's z without the batch)."""
    n_layers = len(model.decoder.dec_blocks)
    sums: dict[str, Any] = {"images": 0, "distortion": 0.0, "kl": torch.zeros(n_layers, dtype=torch.float64)}
    if per_dimension:
        sums["kl_per_dimension"] = [None] * n_layers
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + EVAL_SEED_OFFSET)
        for batch in _batches(split, n_batch):
            x, x_target = preprocessing(batch, device)
            distortion, stats = model.distortion_and_layers(x, x_target, get_latents=True, keep=keep)
            sums["images"] += len(batch)
            sums["distortion"] += distortion.double().sum().item()
            sums["kl"] += torch.stack([layer["kl"].double().sum() for layer in stats]).cpu()
            if per_dimension:
                for index, layer in enumerate(stats):
                    kl = ops.gaussian_kl(
                        layer["mu_q"], layer["sigma_q"].log(), layer["mu_p"], layer["sigma_p"].log(),
                        backend=model.backend,
                    ).double().sum(0).cpu()  # fmt: skip
                    previous = sums["kl_per_dimension"][index]
                    sums["kl_per_dimension"][index] = kl if previous is None else previous + kl
    return sums


def keep_masks(average_kl: Sequence[Tensor], percent: float) -> list[Tensor | None]:
    """Per layer, the latent dimensions among the ceil(percent% of all) with the highest average KL (ties broken
    by position); None for a layer that keeps all of its dimensions (nothing pruned, nothing redrawn)."""
    if not (isinstance(percent, (int, float)) and 0.0 < percent <= 100.0):
        raise ValueError(f"percent must be a number in (0, 100], got {percent!r}")
    flat = torch.cat([kl.flatten() for kl in average_kl])
    n_keep = min(len(flat), math.ceil(percent / 100.0 * len(flat)))
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    chosen[torch.sort(flat, descending=True, stable=True).indices[:n_keep]] = True
    masks: list[Tensor | None] = []
    for kl, mask in zip(average_kl, chosen.split([kl.numel() for kl in average_kl]), strict=True):
        masks.append(None if bool(mask.all()) else mask.view(1, *kl.shape))
    return masks


@torch.no_grad()
def analyze(
    model: VAE,
    split: Any,
    preprocessing: Preprocessing,
    n_batch: int = 16,
    seed: int = 0,
    percents: Sequence[float] = PRUNE_PERCENTS,
) -> dict[str, Any]:
    """The analysis of `model` over `split` (a dataset of uint8 HWC images) as a JSON-ready dict: the ELBO and
    its terms, each layer's rate, latent dimensions and active units, the rate per resolution, and the pruning
    curve. Rates, distortions and ELBOs are in bits per image dimension (the *_bpd keys)."""
    if n_batch < 1:
        raise ValueError(f"n_batch must be at least 1, got {n_batch}")
    if len(split) == 0:
        raise ValueError("the split has no images: nothing to analyze")
    device = next(model.parameters()).device
    dims = model.H.image_size**2 * model.H.image_channels
    full = _over_split(model, split, preprocessing, n_batch, seed, device, per_dimension=True)
    n = full["images"]
    average_kl = [kl / n for kl in full["kl_per_dimension"]]
    layer_rates = (full["kl"] / n / dims / LN2).tolist()
    layers = []
    for index, (block, kl, rate) in enumerate(zip(model.decoder.dec_blocks, average_kl, layer_rates, strict=True)):
        active = int((kl > ACTIVE_KL_NATS).sum())
        layers.append({"index": index, "resolution": block.base, "rate_bpd": rate, "latent_dims": kl.numel(),
                       "active_units": active, "active_fraction": active / kl.numel()})  # fmt: skip
    resolutions: dict[str, float] = {}
    for layer in layers:
        key = str(layer["resolution"])
        resolutions[key] = resolutions.get(key, 0.0) + layer["rate_bpd"]
    rate = sum(layer_rates)
    distortion = full["distortion"] / n / LN2
    total_dims = sum(layer["latent_dims"] for layer in layers)
    pruning = []
    for percent in percents:
        masks = keep_masks(average_kl, percent)
        if all(mask is None for mask in masks):
            pruned_distortion, pruned_rate = distortion, rate
        else:
            sums = _over_split(model, split, preprocessing, n_batch, seed, device, keep=masks)
            pruned_distortion = sums["distortion"] / n / LN2
            pruned_rate = sums["kl"].sum().item() / n / dims / LN2
        kept = sum(
            layer["latent_dims"] if mask is None else int(mask.sum()) for layer, mask in zip(layers, masks, strict=True)
        )
        pruning.append({"percent": percent, "kept_dims": kept, "elbo_bpd": pruned_distortion + pruned_rate,
                        "distortion_bpd": pruned_distortion, "rate_bpd": pruned_rate})  # fmt: skip
    return {
        "n_images": n,
        "seed": seed,
        "n_batch": n_batch,
        "image_dims": dims,
        "elbo_bpd": distortion + rate,
        "distortion_bpd": distortion,
        "rate_bpd": rate,
        "active_kl_nats": ACTIVE_KL_NATS,
        "latent_dims": total_dims,
        "active_units": sum(layer["active_units"] for layer in layers),
        "layers": layers,
        "rate_per_resolution_bpd": resolutions,
        "pruning": pruning,
    }


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def report(result: dict[str, Any]) -> str:
    """The analysis as readable tables."""
    lines = [
        f"{result['n_images']} images: elbo {result['elbo_bpd']:.4f} bits/dim (distortion "
        f"{result['distortion_bpd']:.4f}, rate {result['rate_bpd']:.4f}); {result['active_units']} of "
        f"{result['latent_dims']} latent dimensions active (average KL > {result['active_kl_nats']} nats)",
        "",
        "layer  resolution  rate (bits/dim)  active units",
    ]
    for layer in result["layers"]:
        lines.append(
            f"{layer['index']:>5}  {layer['resolution']:>10}  {layer['rate_bpd']:>15.5f}  "
            f"{layer['active_units']:>6} / {layer['latent_dims']}"
        )
    lines += ["", "resolution  rate (bits/dim)"]
    lines += [f"{res:>10}  {rate:>15.5f}" for res, rate in result["rate_per_resolution_bpd"].items()]
    lines += ["", "kept latents  dims  elbo (bits/dim)  rate  distortion"]
    for point in result["pruning"]:
        lines.append(
            f"{point['percent']:>11g}%  {point['kept_dims']:>4}  {point['elbo_bpd']:>15.4f}  "
            f"{point['rate_bpd']:.4f}  {point['distortion_bpd']:.4f}"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Three panels in one PNG: rate per layer (coloured by resolution), active units per layer, and the pruning
    curve (ELBO on the left axis, the rate kept on the right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    layers = result["layers"]
    index = [layer["index"] for layer in layers]
    resolutions = sorted({layer["resolution"] for layer in layers})
    colours = dict(zip(resolutions, plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(resolutions))), strict=True))
    colour = [colours[layer["resolution"]] for layer in layers]
    figure, (rate_axis, active_axis, prune_axis) = plt.subplots(1, 3, figsize=(13, 3.6))
    rate_axis.bar(index, [layer["rate_bpd"] for layer in layers], color=colour)
    rate_axis.set(xlabel="stochastic layer (top-down)", ylabel="rate (bits/dim)", title="rate per layer")
    legend = [Patch(color=c, label=f"{res}x{res}") for res, c in colours.items()]
    rate_axis.legend(handles=legend, fontsize=8, title="resolution", title_fontsize=8)
    active_axis.bar(index, [100.0 * layer["active_fraction"] for layer in layers], color=colour)
    active_axis.set(xlabel="stochastic layer (top-down)", ylabel="active units (%)", ylim=(0, 100),
                    title=f"active units (average KL > {result['active_kl_nats']} nats)")  # fmt: skip
    percents = [point["percent"] for point in result["pruning"]]
    prune_axis.plot(percents, [point["elbo_bpd"] for point in result["pruning"]], "o-", color="C0")
    prune_axis.set(xscale="log", xlabel="latent dimensions kept (%, highest KL first)", title="pruning the others "
                   "to the prior")  # fmt: skip
    prune_axis.set_ylabel("elbo (bits/dim)", color="C0")
    prune_axis.set_xticks(percents, [f"{p:g}" for p in percents])
    kept_rate_axis = prune_axis.twinx()
    kept_rate_axis.plot(percents, [point["rate_bpd"] for point in result["pruning"]], "s--", color="C1")
    kept_rate_axis.set_ylabel("rate kept (bits/dim)", color="C1")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _build_parser(prog: str = "python -m vdvae_fast.analyze") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Measure a trained VDVAE's rate per layer and per resolution, its active units and its "
        "pruning curve over a data split; print them and write them as JSON and a PNG plot.",
    )
    add_model_arguments(parser)
    parser.add_argument("--split", default="valid", help="valid or test (default valid)")
    parser.add_argument("--data_root", default=None, help="folder of the dataset's files (default: the "
                        "checkpoint's)")  # fmt: skip
    parser.add_argument("--max_images", type=int, default=0, help="at most this many images of the split, spread "
                        "evenly over it, at least 0 (default 0: all)")  # fmt: skip
    parser.add_argument("--n_batch", type=int, default=16, help="images per forward pass, at least 1 (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed, at least 0 (default 0); the run's "
                        "--seed gives its evaluations' noise")  # fmt: skip
    parser.add_argument("--out", default=None, help="the JSON file to write; the PNG goes beside it (default: "
                        "analysis-<checkpoint>-<split>.json in the checkpoint's folder)")  # fmt: skip
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Refuse what would fail late, naming the flag and what is valid."""
    if args.split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {args.split!r}")
    for flag, value, low in (("max_images", args.max_images, 0), ("n_batch", args.n_batch, 1), ("seed", args.seed, 0)):
        if value < low:
            raise ValueError(f"--{flag} must be at least {low}, got {value}")
    check_device_name(args.device)


def output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """The JSON file and the PNG beside it."""
    if args.out is not None:
        json_path = Path(args.out).expanduser()
    else:
        weights = Path(args.path).expanduser()
        folder, stem = (weights, "latest") if weights.is_dir() else (weights.parent, weights.stem)
        json_path = folder / f"analysis-{stem}-{args.split}.json"
    if json_path.suffix != ".json":
        raise ValueError(f"--out {str(json_path)!r} must name a .json file (the .png is written beside it)")
    return json_path, json_path.with_suffix(".png")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Check the arguments, load the model and the split, analyze, print and write; returns the result."""
    _check_args(args)
    json_path, png_path = output_paths(args)
    device = resolve_device(args.device)
    model = load_model(args.path, args.hps, args.backend).to(device).eval()
    H = model.H.copy()
    if args.data_root is not None:
        H.data_root = args.data_root
    splits = load_dataset(H)
    split = evaluation_subset(getattr(splits, args.split), args.max_images)
    result = analyze(model, split, splits.preprocessing, args.n_batch, args.seed)
    result = {"checkpoint": str(args.path), "dataset": H.dataset, "split": args.split, **result}
    print(report(result))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    weights = Path(args.path)
    plot(
        result,
        png_path,
        title=f"{weights.parent.name}/{weights.name}: {H.dataset} {args.split}, {result['n_images']} images",
    )
    print(f"wrote {json_path} and {png_path}")
    return result


def main(argv: Sequence[str] | None = None, prog: str = "python -m vdvae_fast.analyze") -> int:
    """The command line; returns the exit status: 0, or USAGE_ERROR (2) for an error a user can fix."""
    args = _build_parser(prog).parse_args(argv)
    try:
        run(args)
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as err:
        print(f"analyze: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
