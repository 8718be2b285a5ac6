"""Timing and environment helpers shared by the suites.

Repeated runs after warm-up, summarized as median, minimum and spread; on CUDA timed with events, on CPU with
perf_counter. Inputs rotate over several copies so that a cache holding the last call's data is not what is measured.
"""

from __future__ import annotations

import datetime
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# A row whose interquartile range exceeds this share of its median is flagged as unstable, not reported as a fact.
UNSTABLE_SPREAD_PCT = 10.0


@dataclass(frozen=True)
class Timing:
    """Statistics of repeated timed calls, in milliseconds; spread_pct is the interquartile range over the median."""

    median_ms: float
    min_ms: float
    spread_pct: float
    repeats: int

    @property
    def unstable(self) -> bool:
        return self.spread_pct > UNSTABLE_SPREAD_PCT

    def fields(self) -> dict[str, object]:
        """The row fields of this timing; an unstable one says so in a note."""
        found: dict[str, object] = {
            "median_ms": self.median_ms,
            "min_ms": self.min_ms,
            "spread_pct": self.spread_pct,
            "repeats": self.repeats,
        }
        if self.unstable:
            found["unstable"] = True
        return found


def summarize(times_ms: Sequence[float]) -> Timing:
    """Median, minimum and relative interquartile range of a list of call times."""
    if not times_ms:
        raise ValueError("no timed calls to summarize")
    median = statistics.median(times_ms)
    if len(times_ms) >= 4:
        q1, _, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    else:  # too few calls for quartiles: the whole range
        q1, q3 = min(times_ms), max(times_ms)
    spread = 100.0 * (q3 - q1) / median if median > 0 else math.inf
    return Timing(median_ms=median, min_ms=min(times_ms), spread_pct=spread, repeats=len(times_ms))


def time_calls(
    fn: Callable[..., object],
    input_sets: Sequence[tuple],
    device: torch.device,
    *,
    warmup: int = 3,
    repeats: int = 20,
    min_seconds: float = 0.0,
    max_repeats: int = 10_000,
) -> Timing:
    """Times fn(*inputs), cycling through input_sets, after `warmup` untimed calls.

    At least `repeats` calls and at least `min_seconds` of them (a stable median needs both: many calls of a
    fast op, a few of a slow one), at most `max_repeats`.
    """
    for i in range(warmup):
        fn(*input_sets[i % len(input_sets)])
    synchronize(device)
    times = []
    started = time.perf_counter()
    while len(times) < max_repeats and (len(times) < repeats or time.perf_counter() - started < min_seconds):
        inputs = input_sets[len(times) % len(input_sets)]
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(*inputs)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            begin_s = time.perf_counter()
            fn(*inputs)
            times.append((time.perf_counter() - begin_s) * 1e3)
    return summarize(times)


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None) -> float:
    """Measured memory bandwidth: bytes read plus written by a large device-to-device copy, per second."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_calls(lambda: dst.copy_(src), [()], device, warmup=3, repeats=10).median_ms
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured peak of a large matmul in `dtype`: the denominator of model FLOP utilization."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = dtype if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_calls(lambda: a @ b, [()], device, warmup=3, repeats=10).median_ms
    return 2 * n**3 / (ms * 1e-3) / 1e12


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the tensors autograd saves for backward while fn runs (any device)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict[str, object]:
    """What a results file records about where and when it was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
