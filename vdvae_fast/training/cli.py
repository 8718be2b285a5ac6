"""The training program's command line: ``python train.py --hps demo`` (see ``python train.py --help``).

    python train.py --hps demo                                   # CPU, minutes, no download
    torchrun --nproc_per_node=8 train.py --hps imagenet64 --data_root /data --precision bf16
    python train.py --hps imagenet64 --restore_path saved_models/test/latest.pt      # resume
    python train.py --hps imagenet64 --restore_ema_path imagenet64-iter-1600000-model-ema.th --test_eval

Outputs go to save_dir/desc/: log.jsonl (VDVAE's records: type hparam, train_loss, eval_loss, test_loss),
log.txt, latest.pt and iter-N.pt (vdvae_fast.checkpoint), samples-N.png (vdvae_fast.sample's grid).
A fresh run refuses a folder that already holds a run; --restore_path continues a run in its own folder
(unless --desc or --save_dir say otherwise) with the same data order and random streams. SIGINT/SIGTERM
finish the current update, save latest.pt, exit and print the command that continues the run. Exit status:
0, 2 for an error a user can fix (a usage error, a full disk), 128 + the signal number after SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import hparams
from ..checkpoint import CheckpointError, checkpoint_folder, read_weights
from ..data import load_dataset
from ..hparams import Hyperparams
from ..runtime import Runtime, setup_runtime, teardown_runtime
from .errors import OutputError, SetupError
from .log import RunLog
from .run_folder import RunFolder, prepare_run_directory, run_directory
from .trainer import Restored, Trainer, with_data_properties
from .watchdog import StalledRunError

__all__ = ["USAGE_ERROR", "build_parser", "main", "parse_args", "resume_command", "run"]

USAGE_ERROR = 2  # argparse's status for a bad command line; the same for every error a user can fix
USER_ERRORS = (SetupError, CheckpointError, OutputError, StalledRunError, FileNotFoundError, ValueError)

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
    """The preset named by --hps with the command line's overrides applied. A run resumed with --restore_path
    from one of our checkpoints continues in that checkpoint's run folder, unless --desc or --save_dir is
    given."""
    parser = build_parser()
    H = hparams.parse_args(argv, parser)
    given = {key for key, value in vars(parser.parse_args(argv)).items() if value is not None}
    if H.restore_path and not given & {"desc", "save_dir"}:
        folder = checkpoint_folder(H.restore_path)
        if folder is not None:
            folder = Path(os.path.normpath(folder))
            folder = folder.resolve() if folder.name in ("", ".", "..") else folder
            H.update(save_dir=str(folder.parent), desc=folder.name)
    return H


def run(H: Hyperparams) -> dict[str, Any]:
    """Train (or, with test_eval, evaluate) with hyperparameters H; returns the run's summary.

    Flags, --desc and the checkpoint to restore are checked before the run folder is made; H is completed
    with the data's properties and logged before anything trains, and not changed after: the hparam records
    of log.jsonl are the checkpoint's hparams.
    """
    hparams.validate(H)
    run_directory(H)
    runtime = setup_runtime(H.device, H.num_threads)
    try:
        restored = read_weights(H.restore_path, prefer_ema=False) if H.restore_path else None
        resuming_from = Path(restored[1]["path"]).parent if restored and restored[1] is not None else None
        with prepare_run_directory(H, runtime, resuming_from) as folder:
            trainer = _set_up(H, runtime, folder, restored)
            del restored  # the trainer holds what it restored; the file's copy need not live through training
            summary = trainer.test_eval() if trainer.H.test_eval else trainer.train()
        if runtime.is_main:
            _print_outputs(summary)
        return summary
    finally:
        teardown_runtime(runtime)


def _set_up(H: Hyperparams, runtime: Runtime, folder: RunFolder, restored: Restored | None) -> Trainer:
    """Load the data, adopt its properties, log the hyperparameters and build the trainer; if any of it fails,
    the run folder is left as it was found."""
    try:
        log = RunLog(folder.path, enabled=runtime.is_main)
        splits = load_dataset(H)
        adopted = with_data_properties(H, splits)
        if adopted.num_bits != H.num_bits:
            log(f"dataset {splits.dataset} has {adopted.num_bits}-bit targets: num_bits set to it")
        for key in sorted(adopted):
            log(type="hparam", key=key, value=adopted[key], quiet=True)
        return Trainer(adopted, runtime, log, folder.path, splits, restored)
    except BaseException:
        folder.discard()
        raise


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
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        summary = run(parse_args(argv))
    except USER_ERRORS as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    if not summary["interrupted"]:
        return 0
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"continue with: {resume_command(argv, summary['folder'])}", flush=True)
    return 128 + int(summary["interrupted"])


def resume_command(argv: Sequence[str], folder: str) -> str:
    """The command line that continues a run in its own folder: this one's flags with --restore_path <folder>
    in place of any other (safe to paste: a run may resume in the folder its checkpoint is in)."""
    flags, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--restore_path="):
            skip = False
            continue
        skip = arg == "--restore_path"
        if not skip:
            flags.append(arg)
    script = Path(sys.argv[0])
    as_script = script.suffix == ".py" and script.resolve().parent != Path(__file__).resolve().parents[1]
    program = shlex.quote(sys.argv[0]) if as_script else "-m vdvae_fast.train"  # a package module runs with -m
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = (
        "python" if world_size == 1 else f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world_size)}"
    )
    return f"{launcher} {program} {shlex.join([*flags, '--restore_path', folder])}"
