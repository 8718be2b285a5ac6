"""The trainer: builds a run from its hyperparameters and runs the paper's loop, delegating each piece.

The update is training.step's, the evaluation training.evaluate's, the record training.log's, the checkpoint
format vdvae_fast.checkpoint's; the trainer decides only what happens when: every iters_per_print updates a
train_loss record, every iters_per_images a sample grid, every iters_per_save latest.pt, every iters_per_ckpt
iter-N.pt, every epochs_per_eval epochs an evaluation of the EMA weights, and at the end all of them.
A write that fails (a full disk) ends the run with an OutputError naming the file and the last good checkpoint.
After skip_watchdog_iters consecutive skipped updates the skip watchdog (training.watchdog) warns and acts.
"""

from __future__ import annotations

import contextlib
import errno
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .. import ops
from ..checkpoint import (
    LATEST,
    CheckpointError,
    Position,
    capture_rng_state,
    load_module_state,
    load_weights,
    make_checkpoint,
    read_weights,
    restore_rng_state,
    restore_training,
    save_checkpoint,
)
from ..data import DataError, DataSplits, load_dataset, make_loader, set_epoch
from ..hparams import Hyperparams, changed_since
from ..model import VAE
from ..runtime import Runtime, all_gather_objects
from ..sample import reconstruction_rows, save_png, stack_rows
from .errors import OutputError, SetupError
from .evaluate import evaluate, evaluation_subset
from .log import LN2, Progress, RunLog, status_line, summarize, throughput
from .signals import StopRequest
from .step import UpdateRule, make_learner, update_step
from .watchdog import SkipWatchdog, StalledRunError, scale_learning_rate

__all__ = ["Restored", "Trainer", "with_data_properties"]

# read_weights' answer for --restore_path: (state dict, our whole checkpoint or None for an official file)
Restored = tuple[dict[str, Any], dict[str, Any] | None]
# What a failed write of log lines or images reports (a checkpoint's write reports any OSError).
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def with_data_properties(H: Hyperparams, splits: DataSplits) -> Hyperparams:
    """H with the image size and DMoL bit depth the data has (folder/builtin sizes, FFHQ-256's 5-bit targets):
    a new dict, adopted before the hyperparameters are logged."""
    adopted = H.copy()
    adopted.update(image_size=splits.image_size, num_bits=splits.preprocessing.num_bits)
    return adopted


class Trainer:
    """One run: data, VAE and its EMA copy, optimizer, schedule and loss scaler, and the loop around them.

    `splits` are the loaded data whose properties H already holds (see with_data_properties); without them
    the trainer loads H's dataset itself. `restored` is H.restore_path already read (see Restored); without
    it the trainer reads the file itself.
    """

    def __init__(
        self,
        H: Hyperparams,
        runtime: Runtime,
        log: RunLog,
        directory: Path,
        splits: DataSplits | None = None,
        restored: Restored | None = None,
    ) -> None:
        if splits is None:
            splits = load_dataset(H)
            H = with_data_properties(H, splits)
        self.H, self.runtime, self.log, self.directory, self.splits = H, runtime, log, directory, splits
        self.device = runtime.device
        self.position = Position()
        self.last_images: Path | None = None
        self.last_checkpoint: Path | None = None
        self.last_good: tuple[Path, int] | None = None  # the newest checkpoint known whole, and its step
        self.last_eval: dict[str, Any] | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self.backend = ops.resolve_backend(H.backend, self.device)
        self.rule = UpdateRule.from_hparams(H)
        self.watchdog = SkipWatchdog.from_hparams(H)
        self._build_learner(restored)
        self._build_loaders()
        self.progress = Progress(enabled=runtime.is_main)
        self.window: list[dict[str, float]] = []

    # ---------------------------------------------------------------- setup

    def _build_learner(self, restored: Restored | None) -> None:
        """The same initial weights on every rank, restored state if asked, then independent noise per rank."""
        H = self.H
        random.seed(H.seed)
        np.random.seed(H.seed)
        torch.manual_seed(H.seed)
        self.model = VAE(H).to(self.device)
        self.learner = make_learner(self.model, H, self.device)
        self.ema = self.learner.ema
        self._restore(restored)
        if self.runtime.rank > 0 and self._rng_to_restore is None:
            torch.manual_seed(H.seed + self.runtime.rank)
        if self.runtime.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.learner.forward = DistributedDataParallel(self.model, device_ids=device_ids)
        if H.compile:
            self.learner.forward = torch.compile(self.learner.forward)

    def _build_loaders(self) -> None:
        H, runtime, splits = self.H, self.runtime, self.splits
        num_workers = H.num_workers if H.num_workers is not None else (4 if self.device.type == "cuda" else 0)
        options = dict(
            distributed=runtime.distributed, seed=H.seed, num_workers=num_workers, pin_memory=self.device.type == "cuda"
        )
        self.train_loader = make_loader(splits.train, H.n_batch, shuffle=True, drop_last=True, **options)
        self.batches_per_epoch = len(self.train_loader)
        if self.batches_per_epoch == 0:
            raise SetupError(
                f"the training split has {len(splits.train)} images: too few for one batch of n_batch "
                f"{H.n_batch} on each of {runtime.world_size} process(es)"
            )
        self.eval_loaders = {
            name: make_loader(split, H.n_batch, shuffle=False, even_shards=False, **options)
            for name, split in (("valid", evaluation_subset(splits.valid, H.eval_max_images)), ("test", splits.test))
        }
        count = min(int(H.num_images_visualize), len(splits.valid))
        spread = np.linspace(0, len(splits.valid) - 1, count).round().astype(int)  # not just neighbours
        self.viz_batch = torch.stack([splits.valid[int(i)] for i in spread]) if count else None

    def _restore(self, restored: Restored | None) -> None:
        """--restore_path: a vdvae_fast checkpoint resumes everything; an official *-model.th state dict only
        initializes the weights. --restore_ema_path: EMA weights (our checkpoint's, or an official file)."""
        H = self.H
        if H.restore_path:
            weights, checkpoint = restored or read_weights(H.restore_path, prefer_ema=False)
            if checkpoint is None:
                load_module_state(self.model, weights, str(H.restore_path), "the model weights")
                self.ema.load_state_dict(self.model.state_dict())
                self.log(f"initialized the weights from {H.restore_path} (a state dict: training starts at step 0)")
            else:
                self._resume(checkpoint)
        if H.restore_ema_path:
            load_weights(self.ema, H.restore_ema_path, prefer_ema=True)
            self.log(f"EMA weights from {H.restore_ema_path}")
        ignored = [f"--{key}" for key in ("restore_log_path", "restore_optimizer_path") if H[key]]
        if ignored and not H.test_eval:
            self.log(
                f"note: {' and '.join(ignored)} (openai/vdvae's separate files) are not read: training continues "
                "from the restored weights at step 0 with a fresh optimizer"
            )

    def _resume(self, checkpoint: dict[str, Any]) -> None:
        path = checkpoint["path"]
        saved_optimizer = checkpoint["hparams"].get("optimizer", "adamw")
        if saved_optimizer != self.H.optimizer:
            raise CheckpointError(
                f"{path} was trained with --optimizer {saved_optimizer} and holds its state (moment estimates): it "
                f"cannot continue as --optimizer {self.H.optimizer}; resume with --optimizer {saved_optimizer}"
            )
        architecture, others = changed_since(checkpoint["hparams"], self.H)
        if architecture:
            details = ", ".join(f"{key} {old!r} in the file, {new!r} now" for key, (old, new) in architecture.items())
            self.log(f"warning: {path} was trained with other architecture hyperparameters: {details}")
        if not checkpoint["verified"]:
            self.log(f"note: {path} was written before checkpoints carried checksums: its tensors are not verified")
        self.position = restore_training(checkpoint, self.learner)
        self._restore_trainer_state(checkpoint)
        self.last_good = (Path(path), self.position.step)
        if checkpoint.get("world_size", 1) != self.runtime.world_size:
            self.log(
                f"warning: {path} was written by {checkpoint.get('world_size')} process(es), this run has "
                f"{self.runtime.world_size}: it continues at the same epoch and batch of the new sharding, with "
                "new random streams"
            )
        else:
            self._rng_to_restore = checkpoint["rng"][self.runtime.rank]
        if others:
            self.log(
                "changed since the checkpoint: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in others.items())
            )
        p = self.position
        self.log(f"resuming from {path} at step {p.step} (epoch {p.epoch}, batch {p.batch_in_epoch})")

    def _trainer_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the trainer itself: the skip watchdog's count, the skip threshold in force
        (the watchdog may have raised it) and the spectral regularization's vectors."""
        state: dict[str, Any] = {
            "consecutive_skips": self.watchdog.consecutive,
            "skip_threshold": self.rule.skip_threshold,
        }
        if self.learner.spectral is not None:
            state["spectral"] = self.learner.spectral.state_dict()
        return state

    def _restore_trainer_state(self, checkpoint: dict[str, Any]) -> None:
        """Put back _trainer_state (absent from older checkpoints: then nothing changes). A threshold the
        watchdog raised is kept unless this run gives another --skip_threshold than the checkpoint's run."""
        state, path = checkpoint.get("trainer_state", {}), checkpoint["path"]
        self.watchdog.consecutive = int(state.get("consecutive_skips", 0))
        threshold = state.get("skip_threshold", self.rule.skip_threshold)
        same_flag = checkpoint["hparams"].get("skip_threshold") == self.H.skip_threshold
        if threshold != self.rule.skip_threshold and same_flag:
            self.rule = replace(self.rule, skip_threshold=float(threshold))
            self.log(f"skip threshold {threshold:g}, as the skip watchdog had raised it before {path}")
        if self.learner.spectral is not None and "spectral" in state:
            try:
                self.learner.spectral.load_state_dict(state["spectral"])
            except ValueError as err:
                raise CheckpointError(f"the spectral regularization state in {path!r} does not match: {err}") from err

    def _set_check_inputs(self, enabled: bool) -> None:
        """The loss checks that targets lie in [-1, 1] (a GPU sync per step); once the data pipeline has passed
        the check on a real batch, the trainer turns it off."""
        for model in (self.model, self.ema):
            model.check_inputs = enabled

    # ---------------------------------------------------------------- the loop

    @property
    def total_steps(self) -> int:
        total = int(self.H.num_epochs) * self.batches_per_epoch
        return min(total, int(self.H.max_iters)) if self.H.max_iters else total

    @property
    def finished(self) -> bool:
        return self.position.epoch >= self.H.num_epochs or self.position.step >= self.total_steps

    def train(self) -> dict[str, Any]:
        """Train to num_epochs or max_iters, or until SIGINT/SIGTERM; returns a summary of the run."""
        self._start()
        with StopRequest() as stop, self._reporting_failed_writes(), self._saving_on_bad_data():
            while not self.finished:
                for batch, data_time in self._epoch_batches():
                    stats = self.update(batch, data_time, stop.requested)
                    self._after_update(stats)
                    if stats["stop"]:
                        return self._stop(stop)
                    if self.position.step >= self.total_steps:
                        break
                if not self._end_epoch():
                    return self._stop(stop)
            return self._finish(stop)

    @contextlib.contextmanager
    def _reporting_failed_writes(self) -> Iterator[None]:
        """A log line or image grid that cannot be written (a full disk) ends the run in one line."""
        try:
            yield
        except OSError as err:
            if err.errno not in _WRITE_ERRNOS:
                raise
            raise self._write_failure(err.filename or self.directory, err) from err

    @contextlib.contextmanager
    def _saving_on_bad_data(self) -> Iterator[None]:
        """An image that fails to decode mid-epoch (damage the start-up check cannot see) ends the run in one
        line, after saving where it stands."""
        try:
            yield
        except DataError as err:
            path = self.save(LATEST)
            raise DataError(
                f"{err}; saved {path} at step {self.position.step}: fix or remove the file, then resume"
            ) from err

    def _share_write_failure(self, failure: OutputError | None) -> None:
        """Raise rank 0's write failure on every rank: the others would otherwise train on into their next
        collective and wait there for a rank that has ended."""
        messages = [m for m in all_gather_objects(None if failure is None else str(failure), self.runtime) if m]
        if failure is not None:
            raise failure
        if messages:
            raise OutputError(f"rank 0 {messages[0]}")

    def _write_failure(self, path: str | Path, err: OSError) -> OutputError:
        if self.last_good is None:
            good = "no checkpoint of this run was written yet"
        else:
            good = f"the last good checkpoint is {self.last_good[0]} (step {self.last_good[1]})"
        return OutputError(f"cannot write {path}: {err.strerror or err}; {good}")

    def _start(self) -> None:
        H, splits, p = self.H, self.splits, self.position
        self.log(
            f"training {H.desc}: {sum(q.numel() for q in self.model.parameters()):,} parameters, dataset "
            f"{splits.dataset} ({len(splits.train)} train / {len(splits.valid)} valid images of "
            f"{splits.image_size}x{splits.image_size}), {self.runtime.world_size} process(es) x batch "
            f"{H.n_batch} on {self.device}, backend {self.backend}, precision {H.precision}, "
            f"step {p.step}/{self.total_steps}"
        )
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore, self.device)
        self._set_check_inputs(True)
        self._first_step = p.step + 1

    def _epoch_batches(self) -> Iterator[tuple[torch.Tensor, float]]:
        """This epoch's batches in their (seed, epoch) order, minus those consumed before a resume, each with
        the seconds spent loading it (evaluation, image grids and checkpoints between batches left out)."""
        set_epoch(self.train_loader, self.position.epoch, self.position.batch_in_epoch)
        ready = time.perf_counter()
        for batch in self.train_loader:
            yield batch, time.perf_counter() - ready
            ready = time.perf_counter()

    def update(self, batch: torch.Tensor, data_time: float, stop: bool) -> dict[str, float]:
        """One update on a uint8 batch; its statistics (update_step's) with the seconds it took."""
        start = time.perf_counter()
        x, target = self.splits.preprocessing(batch, self.device)
        stats = update_step(self.learner, self.rule, x, target, self.runtime, stop)
        stats["iter_time"] = time.perf_counter() - start
        stats["data_time"] = data_time
        return stats

    def _after_update(self, stats: dict[str, float]) -> None:
        """Count the update, then the periodic actions due at this step, then the skip watchdog's."""
        H, p = self.H, self.position
        first = p.step + 1 == self._first_step
        if first:
            self._set_check_inputs(False)  # the first batch passed the loss's input check
        p.step += 1
        p.batch_in_epoch += 1
        p.skipped_updates += int(stats["skipped_updates"])
        stalled = self.watchdog.observe(bool(stats["skipped_updates"]))
        self.window.append(stats)
        if p.step % H.iters_per_print == 0 or first:
            self._log_window()
        elif self.progress.tty:
            self.progress.show(self._status(summarize(self.window)), permanent=False)
        if p.step % H.iters_per_images == 0:
            self.write_images(f"samples-{p.step}")
        if p.step % H.iters_per_save == 0:
            self.save(LATEST)
        if p.step % H.iters_per_ckpt == 0:
            self.save(f"iter-{p.step}.pt")
        if stalled:
            self._act_on_skips(stats)

    def _act_on_skips(self, stats: dict[str, float]) -> None:
        """The skip watchdog fired: record it, warn, and take its action."""
        count, threshold, p = self.watchdog.consecutive, self.rule.skip_threshold, self.position
        if self.window:
            self._log_window()
        self.progress.clear()
        self.log(
            type="skip_watchdog", step=p.step, consecutive_skips=count, skip_threshold=threshold,
            action=self.watchdog.action, grad_norm=stats["grad_norm"], quiet=True,
        )  # fmt: skip
        why = f"skip_threshold {threshold:g}, the last gradient norm {stats['grad_norm']:.4g}"
        if stats["distortion_nans"] or stats["rate_nans"]:
            why += ", a non-finite loss"
        self.log(f"warning: the last {count} updates were all skipped (step {p.step}; {why})")
        if self.watchdog.action == "raise_threshold":
            self._raise_skip_threshold(threshold)
        elif self.watchdog.action == "lower_lr":
            scale_learning_rate(self.learner, self.watchdog.lr_factor)
            lr = self.learner.optimizer.param_groups[0]["lr"]
            self.log(f"skip watchdog: learning rate times {self.watchdog.lr_factor:g} from now on ({lr:.4g} next)")
        elif self.watchdog.action == "stop":
            self._stop_stalled(f"after {count} consecutive skipped updates at step {p.step} ({why})")

    def _raise_skip_threshold(self, threshold: float) -> None:
        if threshold == -1:
            self.log("skip watchdog: skip_threshold -1 already skips only non-finite gradients; nothing to raise")
            return
        self.rule = replace(self.rule, skip_threshold=threshold * self.watchdog.threshold_factor)
        self.log(f"skip watchdog: skip_threshold raised from {threshold:g} to {self.rule.skip_threshold:g}")

    def _stop_stalled(self, why: str) -> None:
        """Save latest.pt, then end the run with StalledRunError saying what to try."""
        self.save(LATEST)
        raise StalledRunError(
            f"stopped {why}; saved {self.directory / LATEST}. Try a higher --skip_threshold (log.jsonl's grad_norm "
            "shows the usual range), a lower --lr, --optimizer adamax, or --skip_watchdog_action raise_threshold or "
            f"lower_lr, and continue with --restore_path {self.directory}"
        )

    def _end_epoch(self) -> bool:
        """At the end of a complete epoch: evaluate every epochs_per_eval epochs, and move to the next. False if
        a stop request ended the evaluation: the epoch stays unfinished, so a resumed run evaluates again."""
        p = self.position
        if p.batch_in_epoch >= self.batches_per_epoch:
            if p.epoch % self.H.epochs_per_eval == 0 and self.run_eval("valid")["stopped"]:
                return False
            p.epoch += 1
            p.batch_in_epoch = 0
        return True

    def _stop(self, stop: StopRequest) -> dict[str, Any]:
        """Save where the run stands and say how to continue. A stop another rank asked for (no signal here)
        counts as SIGTERM."""
        signum = stop.signum if stop.signum is not None else signal.SIGTERM
        self.progress.clear()
        path = self.save(LATEST)
        self.log(f"stopped by {signal.Signals(signum).name} at step {self.position.step}: saved {path}")
        return self.summary(interrupted=signum)

    def _finish(self, stop: StopRequest) -> dict[str, Any]:
        """The last record, latest.pt, an evaluation at the final step and a sample grid."""
        if self.window:
            self._log_window()
        self.progress.clear()
        self.save(LATEST)
        if self.last_eval is None or self.last_eval["step"] != self.position.step:
            if self.run_eval("valid")["stopped"]:
                return self._stop(stop)
        self.write_images(f"samples-{self.position.step}")
        return self.summary()

    def _status(self, stats: dict[str, float]) -> str:
        p = self.position
        speed = throughput(self.window, self.H.n_batch * self.runtime.world_size)
        return status_line(stats, p.step, self.total_steps, p.epoch, p.skipped_updates, speed)

    def _log_window(self) -> None:
        """The train_loss record and the progress line of the updates since the last one."""
        self.progress.clear()
        stats = summarize(self.window)
        images_per_sec = throughput(self.window, self.H.n_batch * self.runtime.world_size)[0]
        line = self._status(stats)
        stats.pop("stop")
        lr = stats.pop("lr")
        p = self.position
        self.log(
            model=self.H.desc, type="train_loss", lr=lr, epoch=p.epoch, step=p.step, images_per_sec=images_per_sec,
            skipped_total=p.skipped_updates, consecutive_skips=self.watchdog.consecutive,
            skip_threshold=self.rule.skip_threshold, quiet=True, **stats,
        )  # fmt: skip
        self.progress.show(line, permanent=True)
        self.window = []

    def test_eval(self) -> dict[str, Any]:
        """--test_eval: the EMA weights on the test split, once."""
        self._set_check_inputs(True)
        with self._reporting_failed_writes():
            self.run_eval("test")
            self.write_images("samples-test")
        return self.summary()

    # ---------------------------------------------------------------- evaluation, images, checkpoints

    def evaluate(self, split: str = "valid") -> dict[str, Any]:
        """The EMA model's ELBO over the whole split, and with --iw_samples its importance-weighted -log p(x)
        (training.evaluate)."""
        loader, H = self.eval_loaders[split], self.H
        return evaluate(
            self.ema, loader, self.splits.preprocessing, self.runtime, H.precision, H.seed, split, H.iw_samples
        )

    def run_eval(self, split: str) -> dict[str, Any]:
        """Evaluate, write the eval_loss/test_loss record and the readable line; remembered for the summary."""
        self.progress.clear()
        stats = self.evaluate(split)
        kind = "eval_loss" if split == "valid" else "test_loss"
        p = self.position
        if stats["stopped"]:
            self.log(f"{split} evaluation stopped by a signal after {stats['n_images']} images: not recorded")
            return stats
        self.log(model=self.H.desc, type=kind, epoch=p.epoch, step=p.step, quiet=True, **stats)
        self.log.say(
            f"{split} (EMA) step {p.step}: elbo {stats['elbo_bpd']:.4f} bits/dim = {stats['filtered_elbo']:.4f} "
            f"nats/dim (rate {stats['rate'] / LN2:.4f}, distortion {stats['distortion'] / LN2:.4f} bits/dim), "
            f"{stats['n_images']} images, {stats['nonfinite_batches']} non-finite batches"
        )
        if "iw_nll" in stats:
            self.log.say(
                f"{split} (EMA) step {p.step}: importance-weighted -log p(x) {stats['iw_bpd']:.4f} bits/dim = "
                f"{stats['iw_nll']:.4f} nats/dim ({stats['iw_samples']} samples, {stats['iw_images']} images)"
            )
        self.last_eval = {"step": p.step, **stats}
        return stats

    @torch.no_grad()
    def write_images(self, name: str) -> Path | None:
        """VDVAE's grid from the EMA model on rank 0: originals, partial reconstructions, samples. Every rank
        calls it at the same point, so that a failed write ends every rank (see _share_write_failure)."""
        if self.viz_batch is None:
            return None
        path, failure = None, None
        if self.runtime.is_main:
            self.progress.clear()
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(self.H.seed)
                x, _ = self.splits.preprocessing(self.viz_batch, self.device)
                rows = reconstruction_rows(self.ema, self.viz_batch, x, self.H)
            target = self.directory / f"{name}.png"
            try:
                path = save_png(stack_rows(rows), target)
            except OSError as err:
                failure = self._write_failure(target, err)
                failure.__cause__ = err
        self._share_write_failure(failure)
        if path is not None:
            self.last_images = path
            self.log(f"wrote images {path}", quiet=True)
        return path

    def save(self, name: str = LATEST) -> Path | None:
        """Write a checkpoint atomically (rank 0); every rank must call it at the same point, since it gathers
        every rank's random generator states."""
        rng = all_gather_objects(capture_rng_state(self.device), self.runtime)
        path, failure = None, None
        if self.runtime.is_main:
            target = self.directory / name
            try:
                state = make_checkpoint(self.learner, self.position, rng, self.H, self._trainer_state())
                path = save_checkpoint(state, target)
            except OSError as err:
                failure = self._write_failure(target, err)
                failure.__cause__ = err
        self._share_write_failure(failure)
        if path is None:
            return None
        self.last_checkpoint = self.directory / LATEST if name == LATEST else path
        self.last_good = (path, self.position.step)
        self.log(f"saved checkpoint {path} at step {self.position.step}", quiet=True)
        return path

    def summary(self, interrupted: int | None = None) -> dict[str, Any]:
        """Where the run stands and where its outputs are (the CLI prints them; tests read them)."""
        p = self.position
        return {
            "step": p.step,
            "epoch": p.epoch,
            "skipped_updates": p.skipped_updates,
            "eval": self.last_eval,
            "folder": str(self.directory),
            "log": str(self.directory / "log.jsonl"),
            "checkpoint": None if self.last_checkpoint is None else str(self.last_checkpoint),
            "images": None if self.last_images is None else str(self.last_images),
            "interrupted": interrupted,
        }
