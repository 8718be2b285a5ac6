"""Where a process runs: its device, its rank among torchrun's processes, and the collectives between them.

Collectives take and return named values (``all_reduce_sum({"elbo": ..., "grad_norm": ...})``), so a caller
reads results by name rather than by position in a packed tensor. In a single process they return the values
as they are, and no process group is needed.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "Runtime",
    "all_gather_objects",
    "all_reduce_sum",
    "check_device_name",
    "resolve_device",
    "setup_runtime",
    "teardown_runtime",
]


_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: Any) -> None:
    """Raise ValueError unless `name` is one of the device names the programs take: auto, cpu, cuda, cuda:N."""
    if not isinstance(name, str) or _DEVICE_NAME.fullmatch(name) is None:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N (N a GPU index), got {name!r}")


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda' (this process's GPU under torchrun) or 'cuda:N'."""
    name = name or "auto"
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r} asks for a GPU, but this torch has no usable CUDA GPU: use cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name!r} asks for GPU {device.index}, but this machine has "
                f"{torch.cuda.device_count()} (cuda:0 to cuda:{torch.cuda.device_count() - 1})"
            )
    return device


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


def setup_runtime(device: str | None = "auto", num_threads: int | None = None) -> Runtime:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK, pick the device, set torch's CPU threads (None: torch's
    default) and join the process group: NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"--num_threads must be an integer at least 1, got {num_threads!r}")
        torch.set_num_threads(num_threads)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return Runtime(rank, world_size, local_rank, resolved)


# Process groups left by teardown_runtime, released at exit. DDP's reducer holds the group too; were the reducer
# its last holder, releasing it (as an error's traceback goes) would destroy the group holding the GIL and wait for
# gloo's worker threads, one of which may need the GIL to drop a finished collective's tensors: a hang
# (pytorch/pytorch#56297). Released through its Python object, the group is destroyed without the GIL.
_LEFT_GROUPS: list[Any] = []
atexit.register(_LEFT_GROUPS.clear)


def teardown_runtime(runtime: Runtime) -> None:
    """Leave the process group. After a clean finish the ranks first meet, so that none closes gloo's
    connections while another still uses them; after an error they leave at once."""
    if runtime.distributed and dist.is_initialized():
        _LEFT_GROUPS.append(dist.group.WORLD)
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(
    values: Mapping[str, torch.Tensor | float], runtime: Runtime, dtype: torch.dtype = torch.float64
) -> dict[str, float]:
    """Each named value summed over the ranks (one collective for all of them), as Python floats: the one
    host synchronization of the caller's step."""
    names = list(values)
    stacked = torch.stack([torch.as_tensor(values[name], dtype=dtype, device=runtime.device) for name in names])
    if runtime.distributed:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return dict(zip(names, stacked.tolist(), strict=True))


def all_gather_objects(value: Any, runtime: Runtime) -> list[Any]:
    """Every rank's `value`, in rank order (a list of one in a single process)."""
    if not runtime.distributed:
        return [value]
    gathered: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(gathered, value)
    return gathered
