"""Every CUDA source compiles with nvcc for sm_90, even on machines without a GPU (the CPU torch wheel ships the
headers), with no register spills in any kernel and every dmol kernel within 128 registers.

The files compile to device code only (-cubin): nvcc's front end still checks the whole file, host code included,
and instantiates every kernel the host code launches, but the host compiler's pass over torch's headers (more than
half of nvcc's time) is left to the real build."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from benchmarks.cuda_sass import ROOT, nvcc_command, nvcc_path

CUDA_SOURCES = sorted((ROOT / "csrc").glob("*.cu"))
NVCC = nvcc_path()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.skipif(not CUDA_SOURCES, reason="no CUDA sources")
def test_every_cuda_source_compiles_without_spills(tmp_path: Path) -> None:
    # All files at once: nvcc on torch's headers is slow, and the compiles are independent.
    jobs = {
        source.name: subprocess.Popen(
            nvcc_command(source, tmp_path / f"{source.stem}.cubin", "-cubin", "-Xptxas", "-v"),
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
            continue
        spills = [int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", output)]
        registers = [int(r) for r in re.findall(r"Used (\d+) registers", output)]
        if not registers or any(spills) or (name.startswith("dmol_") and max(registers) > 128):
            failures[name] = f"registers {registers}, spill bytes {spills}"
    assert not failures, "\n\n".join(f"{name}:\n{log}" for name, log in failures.items())
