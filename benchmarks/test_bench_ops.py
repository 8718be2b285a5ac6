"""pytest-benchmark view of the op suite: `pytest benchmarks --benchmark-only`.

The same cases and functions as `python -m benchmarks --suite ops`, timed by pytest-benchmark's own loop
(statistics across rounds); torch.compile of the original ops is left to the CLI, whose results are committed.
"""

from __future__ import annotations

import pytest
import torch

from vdvae_fast import ops

from . import ops_suite

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [
    b for b in ops.available_backends(DEVICE) if b != "reference" and not (b == "triton" and DEVICE.type == "cpu")
]
CASES = ops_suite.cases(DEVICE, quick=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.mode}-{'x'.join(map(str, c.shape))}-{c.dtype}")
def test_op(benchmark, case: ops_suite.Case, backend: str) -> None:
    inputs = ops_suite.make_inputs(case, DEVICE, torch.Generator().manual_seed(0))
    step = ops_suite.make_step(case, ops_suite.make_forward(case, backend, compiled=False))

    def run() -> None:
        step(*inputs)
        ops_suite.synchronize(DEVICE)

    benchmark(run)
