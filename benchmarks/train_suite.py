"""Train suite: one VDVAE training step per preset and configuration, from the original's way to the leanest.

A step is the trainer's own update, ``vdvae_fast.training.update_step``: forward under autocast, backward, the
gradient norm clipped at grad_clip, AdamW, the EMA. Skipping is off (skip_threshold -1), so every update is applied;
the step still reads the gradient norm on the host, one synchronization per step, as the trainer does.

Configurations (``CONFIGS``): ``baseline`` is openai/vdvae's way (the original eager ops with torch's sampler,
fp32, no checkpointing, contiguous, eager); each ``fused...`` one adds one change; ``best`` is fused + bf16 + channels_last + checkpoint
"all". It is the leanest combination (about a tenth of the bytes saved for backward, README) that keeps the fast
bf16 and channels_last convolutions; what checkpointing costs in recompute it buys back in the larger batch that
fits. torch.compile is left out of ``best`` because the batch sweep would recompile at every batch size; the
``fused+bf16+compile`` row shows what compile adds.

Measures per row: step time (timing.time_calls: median, min, spread) and images/s; peak device memory of a step
(torch.cuda.max_memory_allocated, None on CPU); bytes saved for backward in one step (saved_bytes.SavedBytes);
model FLOPs of a step from torch.utils.flop_counter, counted once per preset on the meta device without
recompute, so that checkpointing costs MFU instead of inflating it; achieved TFLOP/s and MFU against the measured
matmul peak. On a GPU (and in a tiny run, up to its small cap) the batch is then doubled for baseline and best
until torch.cuda.OutOfMemoryError: the largest batch that fits, with its peak memory.

Sizes: ``full`` every preset and configuration; ``quick`` baseline and best on imagenet64 at batch 4 (cifar10 at
batch 2 on a CPU) with their batch sweeps; ``tiny`` the ``tiny`` preset at batch 2, a smoke run of every path.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from vdvae_fast import data, ops
from vdvae_fast.hparams import PRECISIONS, Hyperparams, preset
from vdvae_fast.model import VAE
from vdvae_fast.training import UpdateRule, make_learner, update_step

from .saved_bytes import SavedBytes
from .timing import matmul_peak_tflops, synchronize, time_calls

__all__ = ["CONFIGS", "Config", "build_step", "flops_per_image", "measure", "run"]


@dataclass(frozen=True)
class Config:
    name: str
    backend: str = "auto"  # "original": the eager ops of openai/vdvae; "auto": the fastest fused backend
    precision: str = "fp32"  # a key of hparams.PRECISIONS (the trainer's --precision values)
    grad_checkpoint: str = "none"
    channels_last: bool = False
    compile: bool = False


BASELINE = Config("baseline", backend="original")
BEST = Config("best", precision="bf16", grad_checkpoint="all", channels_last=True)
CONFIGS = (
    BASELINE,
    Config("fused"),
    Config("fused+bf16", precision="bf16"),
    Config("fused+bf16+channels_last", precision="bf16", channels_last=True),
    Config("fused+bf16+checkpoint", precision="bf16", grad_checkpoint="all"),
    Config("fused+bf16+compile", precision="bf16", compile=True),
    BEST,
)
GPU_PRESETS = ("cifar10", "imagenet32", "imagenet64", "ffhq256")  # each at its preset n_batch (ffhq256: 1)
# The order of the budgeted work (sweeps, compiles): the headline preset first.
PRIORITY = ("imagenet64", "cifar10", "imagenet32", "ffhq256", "tiny")
MAX_BATCH = 1024  # the batch sweep stops here even if memory is left
TINY_MAX_BATCH = 4  # a tiny run's sweep: the path, not the memory
SIZES = ("tiny", "quick", "full")


@dataclass(frozen=True)
class Plan:
    """How long each measurement runs: warm-up calls (after the first and the counted step) and timed repeats."""

    warmup: int
    repeats: int


GPU_PLAN, SWEEP_PLAN = Plan(warmup=2, repeats=8), Plan(warmup=0, repeats=2)
# A CPU cifar10 step takes seconds, and what the fused ops save there is a few percent: five timed steps.
CPU_PLAN, QUICK_CPU_PLAN = Plan(warmup=1, repeats=5), Plan(warmup=0, repeats=2)
TINY_PLAN = Plan(warmup=0, repeats=1)  # a smoke run: every path once
GRACE_S = 30.0  # a measurement still running this long after the budget is spent is interrupted
Step = Callable[[Tensor, Tensor], None]


@dataclass(frozen=True)
class Budget:
    """The suite's time budget: no sweep or compile starts after `deadline` (time.monotonic()), and a measurement
    still running GRACE_S later is interrupted, so that a wall-clock limit outside never loses the whole suite."""

    deadline: float = math.inf

    @property
    def spent(self) -> bool:
        return time.monotonic() > self.deadline

    @property
    def limit(self) -> float:
        return self.deadline + GRACE_S


@contextlib.contextmanager
def _time_limit(limit: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread once time.monotonic() passes `limit` (SIGALRM; a no-op elsewhere)."""
    if math.isinf(limit) or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("the suite's time budget (--budget-s) ran out during this measurement")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(limit - time.monotonic(), 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def dtype_name(config: Config) -> str:
    return str(PRECISIONS[config.precision] or torch.float32).removeprefix("torch.")


def build_step(H: Hyperparams, config: Config, device: torch.device) -> tuple[Step, VAE]:
    """A fresh VAE with its EMA copy and optimizer on `device`, and one training update over them as a closure."""
    H = H.copy()
    H.update(grad_checkpoint=config.grad_checkpoint, channels_last=config.channels_last, precision=config.precision)
    torch.manual_seed(0)
    with torch.device(device):  # initialized on the device: much faster than on the CPU for the large presets
        # no range check of the targets: it synchronizes a GPU, and the trainer also drops it after one batch
        vae = VAE(H, backend=config.backend, check_inputs=False)
    learner = make_learner(vae, H, device)
    if config.compile:
        learner.forward = torch.compile(vae)
    rule = UpdateRule(H.grad_clip, -1, H.ema_rate, config.precision)

    def step(x: Tensor, x_target: Tensor) -> None:
        update_step(learner, rule, x, x_target)

    return step, vae


def make_batches(H: Hyperparams, batch: int, device: torch.device, count: int = 2) -> list[tuple[Tensor, Tensor]]:
    """Random uint8 images through the dataset's preprocessing: (x, x_target) pairs, rotated by the timer."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch, H.image_size, H.image_size, H.image_channels)
    return [
        data.preprocess(torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8), H, device)
        for _ in range(count)
    ]


@functools.cache
def flops_per_image(name: str) -> int:
    """Model FLOPs of forward and backward for one image, counted on the meta device (no compute, any machine).

    Convolution FLOPs are linear in the batch, so one count per preset serves every batch size.
    """
    H = preset(name)
    with torch.device("meta"):
        vae = VAE(H, backend="reference", check_inputs=False)
        x = torch.zeros(1, H.image_size, H.image_size, H.image_channels)
    with FlopCounterMode(display=False) as counter:
        vae(x, x)["elbo"].backward()
    return counter.get_total_flops()


def measure(
    name: str, config: Config, batch: int, device: torch.device, plan: Plan, *, count_saved: bool = True
) -> dict:
    """One row: time, peak memory and saved bytes of a step. torch.cuda.OutOfMemoryError propagates."""
    H = preset(name)
    step, vae = build_step(H, config, device)
    batches = make_batches(H, batch, device)
    step(*batches[0])  # the first call builds cuDNN plans, Triton kernels or the compiled graph
    saved = None
    if count_saved:
        counter = SavedBytes(vae)
        with counter():
            step(*batches[1])
        saved = counter.nbytes
        del counter  # it holds the saved storages
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    timing = time_calls(step, batches, device, warmup=plan.warmup, repeats=plan.repeats)
    ms = timing.median_ms
    return {
        "suite": "train",
        "name": name,
        "config": config.name,
        "backend": ops.resolve_backend(config.backend, device),
        "batch": batch,
        "dtype": dtype_name(config),
        "grad_checkpoint": config.grad_checkpoint,
        "channels_last": config.channels_last,
        "compile": config.compile,
        **timing.fields(),
        "images_per_s": batch / (ms * 1e-3),
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "saved_bytes": saved,
        "flops": flops_per_image(name) * batch,
    }


def _free(device: torch.device, compiled: bool) -> None:
    """Release what a measurement left behind so that the next one starts from the same free memory."""
    if compiled:
        torch._dynamo.reset()  # compiled graphs keep the model's parameters alive
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _failed_row(name: str, config: Config, batch: int, note: str) -> dict:
    return {
        "suite": "train",
        "name": name,
        "config": config.name,
        "batch": batch,
        "dtype": dtype_name(config),
        "images_per_s": float("nan"),
        "note": note,
    }


def _try(
    name: str, config: Config, batch: int, device: torch.device, plan: Plan, budget: Budget, **kwargs: bool
) -> dict:
    """measure() within the budget's limit, with out-of-memory and other failures turned into a row saying so."""
    try:
        with _time_limit(budget.limit):
            row = measure(name, config, batch, device, plan, **kwargs)
    except torch.cuda.OutOfMemoryError:
        row = _failed_row(name, config, batch, "out of memory")
    except Exception as error:  # a configuration that cannot run here is reported, not fatal
        message = " ".join(str(error).split())[:200]  # one line: it becomes a markdown table cell
        row = _failed_row(name, config, batch, f"failed: {type(error).__name__}: {message}")
    _free(device, config.compile)
    ms = row.get("median_ms")
    result = f"{ms:10.1f} ms {row['images_per_s']:8.1f} images/s" if ms else row["note"]
    print(f"  {name:10s} {config.name:26s} batch {batch:4d}  {result}", flush=True)
    return row


def sweep(
    name: str, config: Config, measured: dict, device: torch.device, budget: Budget, max_batch: int = MAX_BATCH
) -> list[dict]:
    """Double the batch from the measured row's until out of memory; the last that fit is marked in its note."""
    if "median_ms" not in measured:
        return []
    rows, fits, batch, stop = [], measured, measured["batch"] * 2, "out of memory at twice this batch"
    while True:
        if batch > max_batch:
            stop = f"batch cap {max_batch} reached: at least this fits"
            break
        if budget.spent:
            stop = "time budget spent: at least this fits"
            break
        row = _try(name, config, batch, device, SWEEP_PLAN, budget, count_saved=False)
        if "median_ms" not in row:
            if row["note"] != "out of memory":
                stop = f"{row['note']} at twice this batch"
            break
        row["sweep"] = True
        rows.append(row)
        fits, batch = row, batch * 2
    fits["note"] = f"largest batch: {stop}"
    return rows


def _finish(rows: list[dict], peak_tflops: float | None) -> list[dict]:
    """Achieved TFLOP/s, MFU and speedup over baseline at the same preset and batch; rows in table order.

    peak_tflops None (on a CPU, whose bf16 convolutions outrun its fp32 matmul peak) leaves MFU out."""
    baseline = {(r["name"], r["batch"]): r["median_ms"] for r in rows if r["config"] == "baseline" and "median_ms" in r}
    for row in rows:
        if "median_ms" not in row:
            continue
        row["tflops"] = row["flops"] / (row["median_ms"] * 1e-3) / 1e12
        row["mfu"] = row["tflops"] / peak_tflops if peak_tflops else None
        row["peak_tflops"] = peak_tflops  # this run's: a results file merged from several runs shows only the last's
        reference = baseline.get((row["name"], row["batch"]))
        row["speedup_vs_baseline"] = reference / row["median_ms"] if reference else float("nan")
    order = {config.name: i for i, config in enumerate(CONFIGS)}
    presets = list(dict.fromkeys(row["name"] for row in rows))
    return sorted(rows, key=lambda r: (presets.index(r["name"]), r.get("sweep", False), order[r["config"]], r["batch"]))


def _cases(device: torch.device, size: str) -> tuple[list[tuple[str, int]], tuple[Config, ...], Plan]:
    """(preset, batch) pairs, configurations and timing plan of a run of `size`."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    if size == "tiny":
        return [("tiny", 2)], (BASELINE, BEST), TINY_PLAN
    if device.type == "cuda":
        if size == "quick":
            return [("imagenet64", 4)], (BASELINE, BEST), GPU_PLAN
        return [(name, preset(name).n_batch) for name in GPU_PRESETS], CONFIGS, GPU_PLAN
    if size == "quick":
        return [("cifar10", 2)], (BASELINE, BEST), QUICK_CPU_PLAN
    return [("cifar10", 4)], CONFIGS, CPU_PLAN


def run(
    device: torch.device,
    *,
    size: str = "full",
    with_compile: bool = True,
    peak_tflops: float | None = None,
    budget_s: float | None = None,
) -> list[dict]:
    """Every (preset, batch) × configuration of `size` on `device`, then the batch sweeps of baseline and best
    (on a GPU, or capped at TINY_MAX_BATCH in a tiny run), then the compiled configuration.

    The table's rows come first, so that a tight `budget_s` (see Budget) drops the sweeps and compiles, which
    are then reported as cut short or skipped. peak_tflops defaults to a fresh matmul measurement.
    """
    budget = Budget(time.monotonic() + budget_s) if budget_s is not None else Budget()
    peak_tflops = (peak_tflops or matmul_peak_tflops(device)) if device.type == "cuda" else None
    cases, configs, plan = _cases(device, size)
    compiled = [c for c in configs if c.compile] if with_compile else []
    rows = []
    for name, batch in cases:
        rows += [_try(name, config, batch, device, plan, budget) for config in configs if not config.compile]
    by_priority = sorted(cases, key=lambda case: PRIORITY.index(case[0]))
    if device.type == "cuda" or size == "tiny":
        max_batch = TINY_MAX_BATCH if size == "tiny" else MAX_BATCH
        for name, _ in by_priority:
            for config in (BASELINE, BEST):
                measured = next(r for r in rows if r["name"] == name and r["config"] == config.name)
                rows += sweep(name, config, measured, device, budget, max_batch)
    for name, batch in by_priority:
        for config in compiled:
            if budget.spent:
                rows.append(_failed_row(name, config, batch, "skipped: time budget spent"))
            else:
                rows.append(_try(name, config, batch, device, plan, budget))
    return _finish(rows, peak_tflops)
