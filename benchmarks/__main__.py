"""python -m benchmarks --suite ops|train|sample|all --out benchmarks/results"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import ops_suite, report, sample_suite, train_suite
from .timing import copy_bandwidth_gbps, environment, matmul_peak_tflops

SUITES = {"ops": ops_suite.run, "train": train_suite.run, "sample": sample_suite.run}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a small subset of cases (smoke run)")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip torch.compile (of the original ops; of the model in train)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="train suite time budget: no batch sweep or compile starts after it, a step 90 s past it is cut short",
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    results = {
        "environment": environment(device),
        "bandwidth_gbps": copy_bandwidth_gbps(device),
        "peak_tflops": matmul_peak_tflops(device),
        "rows": [],
    }
    print(f"{results['environment']['device']}: {results['bandwidth_gbps']:.1f} GB/s copy bandwidth")
    for name, run in SUITES.items():
        if args.suite in (name, "all"):
            options = {"quick": args.quick, "with_compile": not args.no_compile}
            if name == "train":  # MFU needs the measured peak; only the train suite has a time budget
                options.update(peak_tflops=results["peak_tflops"], budget_s=args.budget_s)
            results["rows"] += run(device, **options)
    report.add_bandwidth(results["rows"], results["bandwidth_gbps"])
    path = report.write(results, args.out)
    print(report.markdown(results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
