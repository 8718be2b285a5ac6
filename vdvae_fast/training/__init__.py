"""The training program, one concern per module.

runtime (vdvae_fast.runtime)  the process: device, rank, named collectives
step        one update (loss, backward, clip, skip rule, optimizer, EMA) as a plain function
schedules   the learning-rate schedules (linear warm-up; Efficient-VDVAE's cosine, exponential, noam)
adamax      Efficient-VDVAE's optimizer: Adamax with decoupled weight decay
spectral    NVAE's spectral regularization by power iteration
watchdog    the skip watchdog: what to do after many skipped updates in a row
evaluate    a model's ELBO over a split
log         log.jsonl/log.txt and the progress line
signals     stopping on SIGINT/SIGTERM
run_folder  save_dir/desc/
trainer     the orchestrator: the paper's loop and when each periodic action happens
cli         ``python train.py``: parse, validate, adopt the data's properties, log, run
"""

from __future__ import annotations

from .cli import USAGE_ERROR, build_parser, main, parse_args, run
from .errors import SetupError
from .evaluate import evaluate
from .log import Progress, RunLog, summarize
from .run_folder import prepare_run_directory, run_directory
from .signals import StopRequest
from .step import Learner, UpdateRule, linear_warmup, make_learner, make_optimizer, update_ema, update_step
from .trainer import Trainer, with_data_properties

__all__ = [
    "USAGE_ERROR",
    "Learner",
    "Progress",
    "RunLog",
    "SetupError",
    "StopRequest",
    "Trainer",
    "UpdateRule",
    "build_parser",
    "evaluate",
    "linear_warmup",
    "main",
    "make_learner",
    "make_optimizer",
    "parse_args",
    "prepare_run_directory",
    "run",
    "run_directory",
    "summarize",
    "update_ema",
    "update_step",
    "with_data_properties",
]
