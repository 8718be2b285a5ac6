"""Where the time of one training step goes: torch.profiler's top operators, and the share of the fused ops.

    python -m benchmarks.profile_step --hps cifar10 --config fused --batch 4

The step is the train suite's (train_suite.build_step) under one of its configurations, profiled after a
warm-up step. The fused ops' share counts the vdvae_fast custom ops (forward and backward kernels) of a fused
configuration, or nothing for the baseline, whose ops are plain PyTorch; the last line names them.
"""

from __future__ import annotations

import argparse

import torch

from vdvae_fast.hparams import PRESETS, preset

from . import train_suite
from .timing import synchronize


def profile(name: str, config: train_suite.Config, batch: int, device: torch.device) -> torch.profiler.profile:
    step, _ = train_suite.build_step(preset(name), config, device)
    batches = train_suite.make_batches(preset(name), batch, device)
    step(*batches[0])
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step(*batches[1])
        synchronize(device)
    return prof


FUSED_PREFIXES = ("vdvae_fast::", "vdvae_fast_C::")  # the custom ops and the compiled kernels they call


def fused_ops(events: list) -> list[str]:
    """The names of the vdvae_fast ops among the profiler's events, sorted."""
    return sorted({e.key for e in events if e.key.startswith(FUSED_PREFIXES)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n")[0])
    parser.add_argument("--hps", default="cifar10", choices=PRESETS, help="the model preset (default: cifar10)")
    parser.add_argument(
        "--config",
        default="fused",
        choices=[c.name for c in train_suite.CONFIGS],
        help="the train suite's configuration of the step (default: fused)",
    )
    parser.add_argument("--batch", type=int, default=4, help="images per step (default: 4)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device, e.g. cuda or cpu (default: cuda when a GPU is visible)",
    )
    parser.add_argument("--rows", type=int, default=15, help="operators listed, by self time (default: 15)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    config = next(c for c in train_suite.CONFIGS if c.name == args.config)
    events = profile(args.hps, config, args.batch, device).key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events)
    fused = sum(getattr(e, key) for e in events if e.key.startswith(FUSED_PREFIXES))
    print(events.table(sort_by=key, row_limit=args.rows))
    print(
        f"{args.hps} batch {args.batch} [{args.config}]: fused ops {100 * fused / total:.1f}% of the step's self time"
    )
    print(f"fused ops in the step: {', '.join(fused_ops(events)) or 'none'}")


if __name__ == "__main__":
    main()
