"""The training program's former module name, kept so that ``from vdvae_fast.train import ...`` and
``python -m vdvae_fast.train`` keep working; the code lives in vdvae_fast.training."""

from __future__ import annotations

import sys

from .checkpoint import CheckpointError
from .runtime import Runtime, setup_runtime
from .training import (
    Learner,
    RunLog,
    SetupError,
    Trainer,
    UpdateRule,
    linear_warmup,
    main,
    make_learner,
    make_optimizer,
    parse_args,
    prepare_run_directory,
    run,
    update_ema,
    update_step,
)

__all__ = [
    "CheckpointError",
    "Learner",
    "RunLog",
    "Runtime",
    "SetupError",
    "Trainer",
    "UpdateRule",
    "linear_warmup",
    "main",
    "make_learner",
    "make_optimizer",
    "parse_args",
    "prepare_run_directory",
    "run",
    "setup_runtime",
    "update_ema",
    "update_step",
]

if __name__ == "__main__":
    sys.exit(main())
