"""Every CUDA source compiles with nvcc, even on machines without a GPU (the CPU torch wheel ships the headers)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc").glob("*.cu"))
NVCC = shutil.which("nvcc") or (
    os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
)


def _nvcc_command(source: Path, output: Path) -> list[str]:
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    includes += [f"-I{ROOT / 'csrc'}", f"-I{sysconfig.get_paths()['include']}"]
    return [
        NVCC,
        "-c",
        str(source),
        "-o",
        str(output),
        "-std=c++17",
        "-O3",
        "--use_fast_math",
        "-arch=sm_90",
        *cpp_extension.COMMON_NVCC_FLAGS,  # what torch's CUDAExtension passes: relaxed constexpr, no half operators
        "-DTORCH_EXTENSION_NAME=_C",
        "-DVDVAE_FAST_WITH_CUDA",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *_cpu_wheel_defines(),
        *includes,
    ]


def _cpu_wheel_defines() -> list[str]:
    """The CPU torch wheel ships c10/cuda without its generated config header (Windows export macros only)."""
    header = Path(cpp_extension.include_paths()[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    return [] if header.exists() else ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.skipif(not CUDA_SOURCES, reason="no CUDA sources")
def test_every_cuda_source_compiles(tmp_path: Path) -> None:
    # All files at once: nvcc on torch's headers is slow, and the compiles are independent.
    jobs = {
        source.name: subprocess.Popen(
            _nvcc_command(source, tmp_path / f"{source.stem}.o"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for source in CUDA_SOURCES
    }
    failures = {}
    for name, job in jobs.items():
        output, _ = job.communicate(timeout=900)
        if job.returncode != 0:
            failures[name] = output[-4000:]
    assert not failures, "\n\n".join(f"{name}:\n{log}" for name, log in failures.items())
