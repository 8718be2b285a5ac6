"""Two presets' training steps side by side, e.g. Efficient-VDVAE's C1 against VDVAE at the same resolution.

Each preset runs the train suite's step (``train_suite.measure``: the trainer's update_step under one configuration)
at the same batch on the same device, one after the other in one process; the table gives images/s and bytes saved
for backward per image of each, and the second's ratio to the first.

    python -m benchmarks.preset_pair imagenet32 effvdvae_imagenet32 --batch 2 --config best
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from vdvae_fast.hparams import PRESETS
from vdvae_fast.runtime import resolve_device

from .train_suite import CONFIGS, CPU_PLAN, GPU_PLAN, measure

__all__ = ["compare", "main"]


def compare(first: str, second: str, batch: int, config_name: str, device: torch.device) -> list[dict]:
    """The two presets' rows of train_suite.measure, in order."""
    config = next(config for config in CONFIGS if config.name == config_name)
    plan = GPU_PLAN if device.type == "cuda" else CPU_PLAN
    return [measure(name, config, batch, device, plan) for name in (first, second)]


def table(rows: list[dict]) -> str:
    """Markdown: per preset images/s and MB saved for backward per image, then the second's ratios."""
    lines = ["| preset | images/s | saved for backward per image |", "| --- | --- | --- |"]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['images_per_s']:.2f} | {row['saved_bytes'] / row['batch'] / 1e6:.1f} MB |"
        )
    first, second = rows
    speed = second["images_per_s"] / first["images_per_s"]
    memory = second["saved_bytes"] / first["saved_bytes"]
    lines.append(f"| ratio {second['name']} / {first['name']} | {speed:.2f}x | {memory:.3f}x |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preset_pair", description=__doc__.splitlines()[0])
    parser.add_argument("first", choices=PRESETS)
    parser.add_argument("second", choices=PRESETS)
    parser.add_argument("--batch", type=int, default=2, help="images per step for both presets")
    parser.add_argument("--config", default="best", choices=[config.name for config in CONFIGS])
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    rows = compare(args.first, args.second, args.batch, args.config, device)
    print(f"{args.config} on {device}, batch {args.batch}, one run")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
