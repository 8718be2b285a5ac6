"""The training program: openai/vdvae's train.py with its command line, made resumable and CPU-friendly.

    python train.py --hps demo                                   # CPU, minutes, no download
    torchrun --nproc_per_node=8 train.py --hps imagenet64 --data_root /data --precision bf16
    python train.py --hps imagenet64 --restore_path saved_models/test/latest.pt      # resume
    python train.py --hps imagenet64 --restore_ema_path imagenet64-iter-1600000-model-ema.th --test_eval

What one update does (the paper's recipe): the negative ELBO (distortion + rate, nats per dimension) is
backpropagated; the gradient norm is clipped at grad_clip; the update is *skipped* when that norm is at or
above skip_threshold or the rate or distortion is NaN/Inf on any rank (gradient skipping, section 4.2), and
the skip is counted; otherwise AdamW steps (betas (0.9, 0.9), weight decay wd, linear warmup over
warmup_iters) and the EMA of the weights moves towards them at ema_rate. Evaluation and image grids use the
EMA weights.

Outputs go to save_dir/desc/: log.jsonl (VDVAE's records: type hparam, train_loss, eval_loss, test_loss),
log.txt, latest.pt and iter-N.pt (vdvae_fast.checkpoint), samples-N.png (vdvae_fast.sample's grid).
SIGINT/SIGTERM finish the current update, save latest.pt and exit; --restore_path continues from it with
the same data order and random streams.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import hparams, ops
from .checkpoint import (
    FORMAT,
    LATEST,
    VERSION,
    CheckpointError,
    capture_rng_state,
    load_module_state,
    read_weights,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
)
from .data import load_dataset, make_loader, set_epoch
from .hparams import Hyperparams
from .model import VAE
from .sample import reconstruction_rows, resolve_device, save_png, stack_rows

__all__ = ["Runtime", "RunLog", "Trainer", "linear_warmup", "main", "parse_args", "update_ema"]

LN2 = math.log(2.0)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Keys that shape the network: a checkpoint trained with other values cannot be loaded.
ARCHITECTURE_KEYS = (
    "enc_blocks", "dec_blocks", "width", "zdim", "custom_width_str", "bottleneck_multiple", "no_bias_above",
    "num_mixtures", "image_size", "image_channels",
)  # fmt: skip
# Keys that only say where this invocation runs or what it restores: never reported as changed on resume.
_INVOCATION_KEYS = (
    "restore_path", "restore_ema_path", "test_eval", "max_iters", "device", "num_workers", "num_threads",
)  # fmt: skip


class SetupError(RuntimeError):
    """A problem found before training starts (unwritable save_dir, bad flag combination, ...)."""


# --------------------------------------------------------------------------------------------
# Processes and devices
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank among world_size processes (torchrun's environment) and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(H: Hyperparams) -> Runtime:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK and join the process group: NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(H.get("device"), local_rank)
    if H.get("num_threads"):
        torch.set_num_threads(int(H.num_threads))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank, world_size, local_rank, device)


def _all_reduce_sum(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


# --------------------------------------------------------------------------------------------
# Log and progress
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON-friendly version of numbers coming from torch or numpy."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Path):
        value = str(value)
    return value


class RunLog:
    """VDVAE's logprint: each call appends one JSON record to log.jsonl and a text line to log.txt and, unless
    quiet, prints it. Only rank 0 writes; other ranks' calls do nothing."""

    def __init__(self, directory: Path | None, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled and directory is not None
        self.jsonl = None if directory is None else directory / "log.jsonl"
        self.txt = None if directory is None else directory / "log.txt"
        self.stream = stream or sys.stdout

    def __call__(self, *message: Any, quiet: bool = False, **record: Any) -> None:
        if not self.enabled:
            return
        entry: dict[str, Any] = {"time": time.ctime()}
        if message:
            entry["message"] = " ".join(str(part) for part in message)
        entry.update({key: _plain(value) for key, value in record.items()})
        text = ", ".join(f"{k}: {v:.5f}" if isinstance(v, float) else f"{k}: {v}" for k, v in entry.items())
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(entry) + "\n")
        with open(self.txt, "a") as f:
            f.write(text + "\n")
        if not quiet:
            self.say(" ".join(str(part) for part in message) if message and not record else text)

    def say(self, text: str) -> None:
        """Print for the person watching (rank 0 only), not recorded."""
        if self.enabled:
            print(text, file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """One readable status line: redrawn in place after every update on a terminal, printed at every
    iters_per_print otherwise (logs, CI)."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.tty = enabled and self.stream.isatty()
        self._drawn = False

    def show(self, text: str, permanent: bool) -> None:
        if not self.enabled or not (self.tty or permanent):
            return
        if self.tty:
            self.stream.write("\r\x1b[K" + text + ("\n" if permanent else ""))
            self._drawn = not permanent
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Remove the in-place line before other output."""
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


def summarize(window: Sequence[dict[str, float]]) -> dict[str, float]:
    """VDVAE's accumulate_stats over the updates since the last print: NaN and skip counts are summed, the
    grad norm is the largest finite one, elbo is the plain mean and elbo_filtered the mean of finite values."""
    out: dict[str, float] = {}
    for key in window[-1]:
        values = np.array([stats[key] for stats in window], dtype=np.float64)
        finite = values[np.isfinite(values)]
        if key in ("distortion_nans", "rate_nans", "skipped_updates"):
            out[key] = float(values.sum())
        elif key == "grad_norm":
            out[key] = float(finite.max()) if len(finite) else 0.0
        elif key == "elbo":
            out["elbo"] = float(values.mean())
            out["elbo_filtered"] = float(finite.mean()) if len(finite) else float("nan")
        else:
            out[key] = float(values.mean())
    return out


# --------------------------------------------------------------------------------------------
# Optimization pieces
# --------------------------------------------------------------------------------------------


def linear_warmup(warmup_iters: float) -> Callable[[int], float]:
    """VDVAE's schedule: the learning rate grows linearly from 0 over warmup_iters updates, then stays."""

    def factor(iteration: int) -> float:
        if warmup_iters <= 0 or iteration > warmup_iters:
            return 1.0
        return iteration / warmup_iters

    return factor


def make_optimizer(params: Iterable[torch.nn.Parameter], H: Hyperparams, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with VDVAE's betas and weight decay. On CUDA torch's fused kernel (one launch per step); NVIDIA
    apex's FusedAdam only if torch's is unavailable and apex happens to be installed."""
    params = list(params)
    kwargs = dict(lr=H.lr, betas=(H.adam_beta1, H.adam_beta2), weight_decay=H.wd, eps=1e-8)
    if device.type == "cuda":
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            with contextlib.suppress(ImportError):
                from apex.optimizers import FusedAdam

                return FusedAdam(params, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(params, foreach=True, **kwargs)


@torch.no_grad()
def update_ema(model: torch.nn.Module, ema: torch.nn.Module, rate: float) -> None:
    """EMA of the weights: ema = rate * ema + (1 - rate) * weights, for every parameter at once."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - rate)


# --------------------------------------------------------------------------------------------
# Interruption
# --------------------------------------------------------------------------------------------


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop reads after each update (then saves and exits); a second
    Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


def run_directory(H: Hyperparams) -> Path:
    """save_dir/desc, as in VDVAE."""
    return Path(H.save_dir).expanduser() / str(H.desc)


def prepare_run_directory(H: Hyperparams, runtime: Runtime) -> Path:
    """Create the run directory and prove it writable now, rather than fail at the first checkpoint."""
    directory = run_directory(H)
    if runtime.is_main:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise SetupError(
                f"cannot write to the run directory {str(directory)!r} (save_dir {H.save_dir!r} / desc {H.desc!r}): "
                f"{err.strerror or err}. Choose a writable --save_dir."
            ) from err
        remove_stale_temporaries(directory)
    return directory


class Trainer:
    """One run: data, VAE and its EMA copy, optimizer, schedule and loss scaler, and the loop around them."""

    def __init__(self, H: Hyperparams, runtime: Runtime, log: RunLog, directory: Path) -> None:
        self.H, self.runtime, self.log, self.directory = H, runtime, log, directory
        self.device = runtime.device
        self.step = 0  # updates done (skipped ones included), over all resumes
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of this epoch's order already consumed
        self.skipped_total = 0
        self.last_images: Path | None = None
        self.last_checkpoint: Path | None = None
        self.last_eval: dict[str, Any] | None = None
        self._rng_to_restore: dict[str, Any] | None = None

        self.splits = load_dataset(H)
        self._adopt_data_properties()
        self.autocast_dtype = PRECISIONS[H.precision]
        self.backend = ops.resolve_backend(H.backend, self.device)

        random.seed(H.seed)
        np.random.seed(H.seed)
        torch.manual_seed(H.seed)  # the same initial weights on every rank
        self.model = VAE(H.copy()).to(self.device)  # own copy of H: check_inputs is switched off below
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = make_optimizer(self.model.parameters(), H, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_warmup(H.warmup_iters))
        self.scaler = torch.amp.GradScaler(self.device.type) if H.precision == "fp16" else None
        self._restore()
        if runtime.rank > 0 and self._rng_to_restore is None:
            torch.manual_seed(H.seed + runtime.rank)  # independent noise per rank
        self.train_model: Any = self.model
        if runtime.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=device_ids)
        if H.get("compile"):
            self.train_model = torch.compile(self.train_model)

        num_workers = H.get("num_workers")
        if num_workers is None:
            num_workers = 4 if self.device.type == "cuda" else 0
        loader_args = dict(
            distributed=runtime.distributed, seed=H.seed, num_workers=num_workers, pin_memory=self.device.type == "cuda"
        )
        self.train_loader = make_loader(self.splits.train, H.n_batch, shuffle=True, drop_last=True, **loader_args)
        if len(self.train_loader) == 0:
            raise SetupError(
                f"the training split has {len(self.splits.train)} images: too few for one batch of n_batch "
                f"{H.n_batch} on each of {runtime.world_size} process(es)"
            )
        self.eval_loaders = {
            name: make_loader(split, H.n_batch, shuffle=False, even_shards=False, **loader_args)
            for name, split in (("valid", self.splits.valid), ("test", self.splits.test))
        }
        count = min(int(H.num_images_visualize), len(self.splits.valid))
        spread = np.linspace(0, len(self.splits.valid) - 1, count).round().astype(int)  # not just neighbours
        self.viz_batch = torch.stack([self.splits.valid[int(i)] for i in spread]) if count else None

    # ---------------------------------------------------------------- setup

    def _adopt_data_properties(self) -> None:
        """Image size and DMoL bit depth come from the data (folder/builtin sizes, FFHQ-256's 5-bit targets)."""
        H, splits = self.H, self.splits
        if H.get("image_size") != splits.image_size:
            H.image_size = splits.image_size
        if H.num_bits != splits.preprocessing.num_bits:
            self.log(f"dataset {splits.dataset} has {splits.preprocessing.num_bits}-bit targets: num_bits set to it")
            H.num_bits = splits.preprocessing.num_bits

    def _restore(self) -> None:
        """--restore_path: a vdvae_fast checkpoint resumes everything; an official *-model.th state dict only
        initializes the weights. --restore_ema_path: EMA weights (our checkpoint's, or an official file)."""
        H = self.H
        if H.get("restore_path"):
            weights, checkpoint = read_weights(H.restore_path, prefer_ema=False)
            if checkpoint is None:
                load_module_state(self.model, weights, str(H.restore_path), "the model weights")
                self.ema.load_state_dict(self.model.state_dict())
                self.log(f"initialized the weights from {H.restore_path} (a state dict: training starts at step 0)")
            else:
                self._resume(checkpoint)
        if H.get("restore_ema_path"):
            weights, _ = read_weights(H.restore_ema_path, prefer_ema=True)
            load_module_state(self.ema, weights, str(H.restore_ema_path), "the EMA weights")
            self.log(f"EMA weights from {H.restore_ema_path}")
        ignored = [f"--{key}" for key in ("restore_log_path", "restore_optimizer_path") if H.get(key)]
        if ignored and not H.test_eval:
            self.log(
                f"note: {' and '.join(ignored)} (openai/vdvae's separate files) are not read: training continues "
                "from the restored weights at step 0 with a fresh optimizer"
            )

    def _resume(self, checkpoint: dict[str, Any]) -> None:
        path = checkpoint["path"]
        saved = checkpoint["hparams"]
        changed = {
            key: (saved.get(key), self.H.get(key))
            for key in sorted(set(saved) | set(self.H))
            if key not in _INVOCATION_KEYS and saved.get(key) != self.H.get(key)
        }
        architecture = [key for key in changed if key in ARCHITECTURE_KEYS]
        if architecture:
            details = ", ".join(
                f"{key} {changed[key][0]!r} in the file, {changed[key][1]!r} now" for key in architecture
            )
            self.log(f"warning: {path} was trained with other architecture hyperparameters: {details}")
        load_module_state(self.model, checkpoint["model"], path, "the model weights")
        load_module_state(self.ema, checkpoint["ema"], path, "the EMA weights")
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            if self.scaler is not None and checkpoint.get("scaler"):
                self.scaler.load_state_dict(checkpoint["scaler"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"the optimizer state in {path!r} does not match this model: {err}") from err
        self.step = int(checkpoint["step"])
        self.epoch = int(checkpoint["epoch"])
        self.batch_in_epoch = int(checkpoint["batch_in_epoch"])
        self.skipped_total = int(checkpoint.get("skipped_updates", 0))
        states = checkpoint["rng"]
        if checkpoint.get("world_size", 1) != self.runtime.world_size:
            self.log(
                f"warning: {path} was written by {checkpoint.get('world_size')} process(es), this run has "
                f"{self.runtime.world_size}: it continues at the same epoch and batch of the new sharding, with "
                "new random streams"
            )
            self._rng_to_restore = None
        else:
            self._rng_to_restore = states[self.runtime.rank]
        others = {key: value for key, value in changed.items() if key not in architecture}
        if others:
            self.log(
                "changed since the checkpoint: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in others.items())
            )
        self.log(f"resuming from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")

    # ---------------------------------------------------------------- one update

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _set_check_inputs(self, enabled: bool) -> None:
        """The loss checks that targets lie in [-1, 1] (a GPU sync per step); once the data pipeline has passed
        the check on a real batch, the trainer turns it off (the model reads H.check_inputs)."""
        for model in (self.model, self.ema):
            model.H.check_inputs = enabled

    def train_step(self, batch: torch.Tensor, stop: bool) -> dict[str, float]:
        """One update with gradient skipping; returns its statistics averaged over ranks."""
        H = self.H
        start = time.perf_counter()
        x, target = self.splits.preprocessing(batch, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            stats = self.train_model(x, target)
        loss = stats["elbo"]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), H.grad_clip)
        distortion, rate = stats["distortion"].detach().float(), stats["rate"].detach().float()
        # One all-reduce carries the metrics and every rank's vote, so all ranks skip (and stop) together.
        values = torch.stack([
            loss.detach().float(), distortion, rate, grad_norm.detach().float(),
            (~torch.isfinite(distortion)).float(), (~torch.isfinite(rate)).float(),
            torch.tensor(float(stop), device=distortion.device),
        ])  # fmt: skip
        values = _all_reduce_sum(values, self.runtime).tolist()
        world = self.runtime.world_size
        elbo, distortion_v, rate_v, norm = (v / world for v in values[:4])
        distortion_nans, rate_nans, stop_votes = values[4:]
        within = H.skip_threshold == -1 or norm < H.skip_threshold  # False for a NaN norm
        skipped = bool(distortion_nans or rate_nans or not within)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        elif self.scaler is not None:
            self.scaler.step(self.optimizer)
        else:
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        if not skipped:
            update_ema(self.model, self.ema, H.ema_rate)
        lr = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():
            # The schedule counts updates tried, skipped ones included (as VDVAE's does): torch's warning about a
            # scheduler step before any optimizer step is expected when the first updates are skipped.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        result = {
            "elbo": elbo,
            "distortion": distortion_v,
            "rate": rate_v,
            "grad_norm": norm,
            "distortion_nans": float(distortion_nans > 0),
            "rate_nans": float(rate_nans > 0),
            "skipped_updates": float(skipped),
            "lr": lr,
            "iter_time": time.perf_counter() - start,
            "stop": float(stop_votes > 0),
        }
        if self.scaler is not None:
            result["loss_scale"] = float(self.scaler.get_scale())
        return result

    # ---------------------------------------------------------------- evaluation and images

    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> dict[str, Any]:
        """The EMA model's ELBO over the whole split (each image once, shards summed over ranks). Non-finite
        batches are counted and left out of the filtered means, as VDVAE's filtered_elbo does."""
        loader = self.eval_loaders[split]
        # [images, elbo sum, images in finite batches, their elbo, distortion and rate sums, batches, non-finite]
        sums = torch.zeros(8, dtype=torch.float64, device=self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.H.seed + 1000 + self.runtime.rank)  # the same posterior noise at every evaluation
            for batch in loader:
                x, target = self.splits.preprocessing(batch, self.device)
                with self._autocast():
                    stats = self.ema(x, target)
                n = float(len(batch))
                elbo, distortion, rate = (stats[k].double() for k in ("elbo", "distortion", "rate"))
                finite = bool(torch.isfinite(elbo) and torch.isfinite(distortion) and torch.isfinite(rate))
                sums[0] += n
                sums[1] += elbo * n
                if finite:
                    sums[2] += n
                    sums[3] += elbo * n
                    sums[4] += distortion * n
                    sums[5] += rate * n
                else:
                    sums[7] += 1
                sums[6] += 1
        total, elbo_sum, n_finite, finite_elbo, distortion, rate, n_batches, nonfinite = _all_reduce_sum(
            sums, self.runtime
        ).tolist()
        if total == 0:
            raise SetupError(f"the {split} split is empty: nothing to evaluate")
        filtered = finite_elbo / n_finite if n_finite else float("nan")
        return {
            "n_batches": int(n_batches),
            "n_images": int(total),
            "elbo": elbo_sum / total,
            "filtered_elbo": filtered,
            "elbo_bpd": filtered / LN2,
            "distortion": distortion / n_finite if n_finite else float("nan"),
            "rate": rate / n_finite if n_finite else float("nan"),
            "nonfinite_batches": int(nonfinite),
        }

    def run_eval(self, split: str) -> dict[str, Any]:
        """Evaluate, write the eval_loss/test_loss record and the readable line; remembered for the summary."""
        stats = self.evaluate(split)
        kind = "eval_loss" if split == "valid" else "test_loss"
        self.log(model=self.H.desc, type=kind, epoch=self.epoch, step=self.step, quiet=True, **stats)
        self.log.say(
            f"{split} (EMA) step {self.step}: elbo {stats['elbo_bpd']:.4f} bits/dim = {stats['filtered_elbo']:.4f} "
            f"nats/dim (rate {stats['rate'] / LN2:.4f}, distortion {stats['distortion'] / LN2:.4f} bits/dim), "
            f"{stats['n_images']} images, {stats['nonfinite_batches']} non-finite batches"
        )
        self.last_eval = {"step": self.step, **stats}
        return stats

    @torch.no_grad()
    def write_images(self, name: str) -> Path | None:
        """VDVAE's grid from the EMA model on rank 0: originals, partial reconstructions, samples."""
        if not self.runtime.is_main or self.viz_batch is None:
            return None
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.H.seed)
            x, _ = self.splits.preprocessing(self.viz_batch, self.device)
            rows = reconstruction_rows(self.ema, self.viz_batch, x, self.H)
        path = save_png(stack_rows(rows), self.directory / f"{name}.png")
        self.last_images = path
        self.log(f"wrote images {path}", quiet=True)
        return path

    # ---------------------------------------------------------------- checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue; a collective under DDP (gathers every rank's RNG states)."""
        rng = capture_rng_state(self.device)
        states = [rng]
        if self.runtime.distributed:
            states = [None] * self.runtime.world_size
            dist.all_gather_object(states, rng)
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "skipped_updates": self.skipped_total,
            "rng": states,
            "world_size": self.runtime.world_size,
            "hparams": dict(self.H),
        }

    def save(self, name: str = LATEST) -> Path | None:
        """Write a checkpoint atomically (rank 0); every rank must call it at the same point."""
        state = self.checkpoint_state()
        if not self.runtime.is_main:
            return None
        path = save_checkpoint(state, self.directory / name)
        self.last_checkpoint = self.directory / LATEST if name == LATEST else path
        self.log(f"saved checkpoint {path} at step {self.step}", quiet=True)
        return path

    # ---------------------------------------------------------------- the loop

    def _epoch_batches(self) -> Iterator[torch.Tensor]:
        """This epoch's batches in their (seed, epoch) order, minus those consumed before a resume."""
        set_epoch(self.train_loader, self.epoch)
        if self.batch_in_epoch == 0:
            return iter(self.train_loader)
        loader = self.train_loader
        order = list(loader.sampler)[self.batch_in_epoch * loader.batch_size :]
        rest = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=order,
            drop_last=loader.drop_last,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            generator=torch.Generator(),  # leaves the default generator, which the training noise uses, alone
        )
        return iter(rest)

    def total_steps(self) -> int:
        total = int(self.H.num_epochs) * len(self.train_loader)
        return min(total, int(self.H.max_iters)) if self.H.get("max_iters") else total

    def _throughput(self, window: list[dict[str, float]]) -> tuple[float, float]:
        """(images per second, seconds per update) over the window: loading and computing, nothing else."""
        seconds = sum(stats["iter_time"] + stats["data_time"] for stats in window)
        images = len(window) * self.H.n_batch * self.runtime.world_size
        return images / max(seconds, 1e-9), seconds / len(window)

    def _show_live(self, window: list[dict[str, float]], progress: Progress) -> None:
        progress.show(self._status(summarize(window), *self._throughput(window)), permanent=False)

    def _log_window(self, window: list[dict[str, float]], progress: Progress) -> None:
        stats = summarize(window)
        images_per_sec, seconds_per_step = self._throughput(window)
        stats.pop("stop")
        lr = stats.pop("lr")
        self.log(
            model=self.H.desc, type="train_loss", lr=lr, epoch=self.epoch, step=self.step,
            images_per_sec=images_per_sec, skipped_total=self.skipped_total, quiet=True, **stats,
        )  # fmt: skip
        progress.show(self._status(stats, images_per_sec, seconds_per_step), permanent=True)

    def _status(self, stats: dict[str, float], images_per_sec: float, seconds_per_step: float) -> str:
        total = self.total_steps()
        eta = (total - self.step) * seconds_per_step
        percent = 100.0 * self.step / max(total, 1)
        return (
            f"step {self.step}/{total} ({percent:.0f}%) epoch {self.epoch} | "
            f"elbo {stats['elbo'] / LN2:.3f} bits/dim (rate {stats['rate'] / LN2:.3f}, "
            f"distortion {stats['distortion'] / LN2:.3f}) | grad_norm {stats['grad_norm']:.1f} | "
            f"skipped {self.skipped_total} | {images_per_sec:.1f} img/s | eta {_duration(eta)}"
        )

    def train(self) -> dict[str, Any]:
        """Train to num_epochs or max_iters, or until SIGINT/SIGTERM; returns a summary of the run."""
        H = self.H
        total = self.total_steps()
        progress = Progress(enabled=self.runtime.is_main)
        self.log(
            f"training {H.desc}: {sum(p.numel() for p in self.model.parameters()):,} parameters, dataset "
            f"{self.splits.dataset} ({len(self.splits.train)} train / {len(self.splits.valid)} valid images of "
            f"{self.splits.image_size}x{self.splits.image_size}), {self.runtime.world_size} process(es) x batch "
            f"{H.n_batch} on {self.device}, backend {self.backend}, precision {H.precision}, step {self.step}/{total}"
        )
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore, self.device)
        self._set_check_inputs(True)
        window: list[dict[str, float]] = []
        first = True
        stopped_by: int | None = None
        with StopRequest() as stop:
            while self.epoch < H.num_epochs and self.step < total and stopped_by is None:
                ready = time.perf_counter()  # step times leave out evaluation, image grids and checkpoints
                for batch in self._epoch_batches():
                    fetched = time.perf_counter()
                    stats = self.train_step(batch, stop.requested)
                    stats["data_time"] = fetched - ready
                    if first:
                        self._set_check_inputs(False)  # the first batch passed the loss's input check
                    self.step += 1
                    self.batch_in_epoch += 1
                    self.skipped_total += int(stats["skipped_updates"])
                    window.append(stats)
                    if self.step % H.iters_per_print == 0 or first:
                        progress.clear()
                        self._log_window(window, progress)
                        window = []
                    elif progress.tty:
                        self._show_live(window, progress)
                    first = False
                    if self.step % H.iters_per_images == 0:
                        progress.clear()
                        self.write_images(f"samples-{self.step}")
                    if self.step % H.iters_per_save == 0:
                        self.save(LATEST)
                    if self.step % H.iters_per_ckpt == 0:
                        self.save(f"iter-{self.step}.pt")
                    if stats["stop"]:
                        stopped_by = stop.signum if stop.signum is not None else signal.SIGTERM
                        break
                    if self.step >= total:
                        break
                    ready = time.perf_counter()
                if stopped_by is not None:
                    break
                if self.batch_in_epoch >= len(self.train_loader):  # the epoch is complete
                    if self.epoch % H.epochs_per_eval == 0:
                        progress.clear()
                        self.run_eval("valid")
                    self.epoch += 1
                    self.batch_in_epoch = 0
            progress.clear()
            if window and stopped_by is None:
                self._log_window(window, progress)
            if stopped_by is not None:
                path = self.save(LATEST)
                self.log(
                    f"stopped by {signal.Signals(stopped_by).name} at step {self.step}: saved {path}; continue with "
                    f"--restore_path {path}"
                )
                return self.summary(interrupted=stopped_by)
            self.save(LATEST)
            if self.last_eval is None or self.last_eval["step"] != self.step:
                self.run_eval("valid")
            self.write_images(f"samples-{self.step}")
        return self.summary()

    def test_eval(self) -> dict[str, Any]:
        """--test_eval: the EMA weights on the test split, once."""
        self._set_check_inputs(True)
        self.run_eval("test")
        self.write_images("samples-test")
        return self.summary()

    def summary(self, interrupted: int | None = None) -> dict[str, Any]:
        """Where the run stands and where its outputs are (main prints them; tests read them)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "skipped_updates": self.skipped_total,
            "eval": self.last_eval,
            "log": str(self.directory / "log.jsonl"),
            "checkpoint": None if self.last_checkpoint is None else str(self.last_checkpoint),
            "images": None if self.last_images is None else str(self.last_images),
            "interrupted": interrupted,
        }


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _check_flags(H: Hyperparams) -> None:
    if H.precision not in PRECISIONS:
        raise SetupError(f"--precision must be one of {', '.join(PRECISIONS)}, got {H.precision!r}")
    for key in ("iters_per_print", "iters_per_save", "iters_per_ckpt", "iters_per_images", "epochs_per_eval"):
        if int(H[key]) < 1:
            raise SetupError(f"--{key} must be at least 1, got {H[key]}")
    if H.n_batch < 1:
        raise SetupError(f"--n_batch must be at least 1, got {H.n_batch}")
    if H.restore_path is None and H.restore_ema_path is None and H.test_eval:
        raise SetupError("--test_eval evaluates trained weights: give --restore_ema_path or --restore_path")


def run(H: Hyperparams) -> dict[str, Any]:
    """Train (or, with test_eval, evaluate) with hyperparameters H; returns the run's summary."""
    _check_flags(H)
    runtime = setup_runtime(H)
    try:
        directory = prepare_run_directory(H, runtime)
        log = RunLog(directory, enabled=runtime.is_main)
        for key in sorted(H):
            log(type="hparam", key=key, value=H[key], quiet=True)
        trainer = Trainer(H, runtime, log, directory)
        summary = trainer.test_eval() if H.test_eval else trainer.train()
        if runtime.is_main:
            _print_outputs(summary)
        return summary
    finally:
        if runtime.distributed and dist.is_initialized():
            # After a clean finish, no rank closes gloo's connections while another still uses them.
            if sys.exc_info()[0] is None:
                dist.barrier()
            dist.destroy_process_group()


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


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: parse (preset, then overrides), run, and turn errors a user can fix into one message.
    Returns the exit status: 0, 2 for such an error, 128 + the signal number after SIGINT/SIGTERM."""
    H = parse_args(argv)
    try:
        summary = run(H)
    except (SetupError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    return 128 + int(summary["interrupted"]) if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
