"""Timing and environment helpers shared by the suites.

Medians of repeated runs after warm-up; on CUDA timed with events, on CPU with perf_counter.
Inputs rotate over several copies so that a cache holding the last call's data is not what is measured.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(
    fn: Callable[..., object],
    input_sets: Sequence[tuple],
    device: torch.device,
    *,
    warmup: int = 3,
    repeats: int = 20,
    min_seconds: float = 0.0,
) -> float:
    """Median milliseconds of fn(*inputs), cycling through input_sets; warm-up runs excluded."""
    for i in range(warmup):
        fn(*input_sets[i % len(input_sets)])
    synchronize(device)
    times = []
    started = time.perf_counter()
    i = 0
    while i < repeats or time.perf_counter() - started < min_seconds:
        inputs = input_sets[i % len(input_sets)]
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
        i += 1
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None) -> float:
    """Measured memory bandwidth: bytes read plus written by a large device-to-device copy, per second."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), [()], device, warmup=3, repeats=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured peak of a large matmul in `dtype`: the denominator of model FLOP utilization."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = dtype if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, [()], device, warmup=3, repeats=10)
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
