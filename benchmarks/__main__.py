"""Benchmarks of vdvae_fast: the fused ops, the training step and sampling, against openai/vdvae's eager ops
(the ``original`` backend) and torch.compile of them. Results go to OUT/<device>.json, .md and .png; rows
measured again replace the old ones there, other rows are kept."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import ops_suite, report, sample_suite, train_suite
from .timing import copy_bandwidth_gbps, environment, matmul_peak_tflops

SUITES = {"ops": ops_suite.run, "train": train_suite.run, "sample": sample_suite.run}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--suite",
        choices=[*SUITES, "all"],
        default="all",
        help="ops: each fused op per backend, shape, dtype and layout (time, GB/s, share of the measured bandwidth, "
        "bytes saved for backward); train: one training step per configuration (time, images/s, peak memory, "
        "saved bytes, MFU, largest batch on a GPU); sample: unconditional sampling per backend; all: the three (default)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results"),
        help="folder of the results files, created if missing (default: benchmarks/results)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device to measure on, e.g. cuda, cuda:1 or cpu (default: cuda when a GPU is visible)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        dest="size",
        action="store_const",
        const="quick",
        help="ops: the roofline shapes only (logits 32x100x64x64 and 4x100x64x64, latents 32x16x64x64); "
        "train: baseline and best on imagenet64 at batch 4 and their largest batches (cifar10 at batch 2 on a "
        "CPU); sample: two presets",
    )
    size.add_argument(
        "--tiny",
        dest="size",
        action="store_const",
        const="tiny",
        help="tiny shapes and the tiny preset: checks that every path runs, measures nothing worth keeping (without --quick or --tiny: every preset shape)",
    )
    parser.set_defaults(size="full")
    parser.add_argument(
        "--backends",
        type=lambda text: [b for b in text.split(",") if b],
        default=None,
        help="comma-separated backends to measure in the ops and sample suites, e.g. cuda or "
        "triton,original,compile (compile: torch.compile of the original; default: every kernel backend built "
        "for the device, original and compile)",
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip torch.compile (of the original ops in the ops suite; of the model in the train suite)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="time budget in seconds of the ops and train suites: no torch.compile row (ops) and no batch sweep "
        "or compile (train) starts after it, and a training measurement still running 30 s past it is cut short; "
        "what was skipped says so in its row (default: no budget)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="ops suite: measure only the cases whose label contains TEXT (repeatable), e.g. "
        "'sample_gaussian fwd+bwd 8x16x64x64 float32'",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    results = {
        "environment": environment(device),
        "bandwidth_gbps": copy_bandwidth_gbps(device),
        "peak_tflops": matmul_peak_tflops(device),
        "rows": [],
    }
    print(f"{results['environment']['device']}: {results['bandwidth_gbps']:.1f} GB/s copy bandwidth")
    with_compile = not args.no_compile
    if args.suite in ("ops", "all"):
        results["rows"] += ops_suite.run(
            device,
            size=args.size,
            backends=args.backends,
            with_compile=with_compile,
            budget_s=args.budget_s,
            only=args.only,
        )
    if args.suite in ("train", "all"):  # MFU needs the measured peak
        results["rows"] += train_suite.run(
            device,
            size=args.size,
            with_compile=with_compile,
            peak_tflops=results["peak_tflops"],
            budget_s=args.budget_s,
        )
    if args.suite in ("sample", "all"):
        backends = [b for b in args.backends if b != "compile"] if args.backends else None
        results["rows"] += sample_suite.run(device, size=args.size, backends=backends)
    report.add_bandwidth(results["rows"], results["bandwidth_gbps"])
    path = report.write(results, args.out)
    print(report.markdown(results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
