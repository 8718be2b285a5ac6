"""The training program's command line: ``python train.py --hps demo`` (see ``python train.py --help``).

    python train.py --hps demo                                   # CPU, minutes, no download
    torchrun --nproc_per_node=8 train.py --hps imagenet64 --data_root /data --precision bf16
    python train.py --hps imagenet64 --restore_path saved_models/test/latest.pt      # resume
    python train.py --hps imagenet64 --restore_ema_path imagenet64-iter-1600000-model-ema.th --test_eval

Outputs go to save_dir/desc/: log.jsonl (VDVAE's records: type hparam, train_loss, eval_loss, test_loss),
log.txt, latest.pt and iter-N.pt (vdvae_fast.checkpoint), samples-N.png (vdvae_fast.sample's grid).
SIGINT/SIGTERM finish the current update, save latest.pt and exit; --restore_path continues from it with
the same data order and random streams. Exit status: 0, 2 for an error a user can fix (a usage error), 128 +
the signal number after SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .. import hparams
from ..checkpoint import CheckpointError
from ..data import load_dataset
from ..hparams import Hyperparams
from ..runtime import setup_runtime, teardown_runtime
from .errors import SetupError
from .log import RunLog
from .run_folder import prepare_run_directory
from .trainer import Trainer, with_data_properties

__all__ = ["USAGE_ERROR", "build_parser", "main", "parse_args", "run"]

USAGE_ERROR = 2  # argparse's status for a bad command line; the same for every error a user can fix
USER_ERRORS = (SetupError, CheckpointError, FileNotFoundError, ValueError)

_EPILOG = """\
examples:
  python train.py --hps demo                                    # CPU, a few minutes, no download
  python train.py --hps cifar10 --data_root ./data --precision bf16
  torchrun --nproc_per_node=8 train.py --hps imagenet64 --data_root /data --precision bf16
  python train.py --hps imagenet64 --data_root /data --restore_path saved_models/test/latest.pt
  python train.py --hps imagenet64 --data_root /data --restore_ema_path imagenet64-iter-1600000-model-ema.th \\
      --test_eval

Outputs go to save_dir/desc/: log.jsonl, log.txt, latest.pt, iter-N.pt, samples-N.png.
"""


def build_parser() -> argparse.ArgumentParser:
    """The trainer's command line: --hps picks a preset, every other flag overrides one hyperparameter."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a very deep VAE (VDVAE, Child 2021), or evaluate one with --test_eval.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return hparams.add_arguments(parser)


def parse_args(argv: Sequence[str] | None = None) -> Hyperparams:
    """The preset named by --hps with the command line's overrides applied."""
    return hparams.parse_args(argv, build_parser())


def run(H: Hyperparams) -> dict[str, Any]:
    """Train (or, with test_eval, evaluate) with hyperparameters H; returns the run's summary.

    H is checked, completed with the data's properties and logged before anything trains, and not changed
    after: the hparam records of log.jsonl are the checkpoint's hparams.
    """
    hparams.validate(H)
    runtime = setup_runtime(H.device, H.num_threads)
    try:
        directory = prepare_run_directory(H, runtime)
        log = RunLog(directory, enabled=runtime.is_main)
        splits = load_dataset(H)
        adopted = with_data_properties(H, splits)
        if adopted.num_bits != H.num_bits:
            log(f"dataset {splits.dataset} has {adopted.num_bits}-bit targets: num_bits set to it")
        for key in sorted(adopted):
            log(type="hparam", key=key, value=adopted[key], quiet=True)
        trainer = Trainer(adopted, runtime, log, directory, splits)
        summary = trainer.test_eval() if adopted.test_eval else trainer.train()
        if runtime.is_main:
            _print_outputs(summary)
        return summary
    finally:
        teardown_runtime(runtime)


def _print_outputs(summary: dict[str, Any]) -> None:
    done = "interrupted" if summary["interrupted"] else "done"
    lines = [f"{done} at step {summary['step']} ({summary['skipped_updates']} skipped updates)"]
    evaluation = summary.get("eval")
    if evaluation:
        lines.append(f"  EMA elbo:   {evaluation['elbo_bpd']:.4f} bits/dim at step {evaluation['step']}")
    lines.append(f"  log:        {summary['log']}")
    if summary["checkpoint"]:
        lines.append(f"  checkpoint: {summary['checkpoint']}")
    if summary["images"]:
        lines.append(f"  samples:    {summary['images']}")
    print("\n".join(lines), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: parse (preset, then overrides), run, and turn errors a user can fix into one message.
    Returns the exit status: 0, USAGE_ERROR (2) for such an error, 128 + the signal number after
    SIGINT/SIGTERM."""
    H = parse_args(argv)
    try:
        summary = run(H)
    except USER_ERRORS as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    return 128 + int(summary["interrupted"]) if summary["interrupted"] else 0
