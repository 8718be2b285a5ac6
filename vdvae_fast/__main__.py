"""``vdvae-fast COMMAND ...`` (or ``python -m vdvae_fast COMMAND ...``): one entry point for the programs.

    vdvae-fast train --hps demo                        # python train.py --hps demo
    vdvae-fast sample --restore_ema_path saved_models/demo/latest.pt
    vdvae-fast latents encode --restore_ema_path saved_models/demo --images photos/ --out z.npz
    vdvae-fast hparams                                 # every flag with its default and valid values
    vdvae-fast bench --suite ops --quick               # from a source checkout: python -m benchmarks

Each command takes its program's flags unchanged (``vdvae-fast train --help``) and returns its exit status.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

__all__ = ["COMMANDS", "main"]

USAGE_ERROR = 2


def _train(argv: Sequence[str]) -> int:
    from .training.cli import main as train_main

    return train_main(list(argv))


def _sample(argv: Sequence[str]) -> int:
    from .sample import main as sample_main

    return sample_main(list(argv), prog="vdvae-fast sample")


def _latents(argv: Sequence[str]) -> int:
    from .latents import main as latents_main

    return latents_main(list(argv), prog="vdvae-fast latents")


def _hparams(argv: Sequence[str]) -> int:
    from .hparams import main as hparams_main

    return hparams_main(list(argv), prog="vdvae-fast hparams")


def _analyze(argv: Sequence[str]) -> int:
    from .analyze import main as analyze_main

    return analyze_main(list(argv), prog="vdvae-fast analyze")


def _bench(argv: Sequence[str]) -> int:
    try:
        from benchmarks.__main__ import main as bench_main
    except ImportError:
        print(
            "vdvae-fast bench: error: the benchmarks are not installed with the package; run this command from "
            "the root of a source checkout (it is python -m benchmarks)",
            file=sys.stderr,
        )
        return USAGE_ERROR
    bench_main(list(argv))
    return 0


# name -> (what it does, the program)
COMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], int]]] = {
    "train": ("train a VDVAE, or evaluate one with --test_eval (python train.py)", _train),
    "sample": ("draw samples from a checkpoint into a PNG grid (python -m vdvae_fast.sample)", _sample),
    "latents": ("encode, decode, reconstruct or interpolate images (python -m vdvae_fast.latents)", _latents),
    "analyze": ("rate per layer, active units and the pruning curve of a checkpoint", _analyze),
    "hparams": (
        "print every hyperparameter flag (default, valid values, meaning), or --params PRESET: parameter counts",
        _hparams,
    ),
    "bench": ("benchmark the ops, sampling and training steps (source checkout: python -m benchmarks)", _bench),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vdvae-fast COMMAND [ARGS...]   (COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (what, _) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the named command with the remaining arguments; help without one; exit status 2 for an unknown one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"vdvae-fast {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"vdvae-fast: error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return USAGE_ERROR
    return COMMANDS[command][1](rest)


if __name__ == "__main__":
    sys.exit(main())
