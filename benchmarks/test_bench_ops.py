"""pytest-benchmark view of the op suite: `pytest benchmarks --benchmark-only`.

The same cases and functions as `python -m benchmarks --suite ops`, timed by pytest-benchmark's own loop
(statistics across rounds); torch.compile of the original ops is left to the CLI, whose results are committed.
"""

from __future__ import annotations

import pytest
import torch

from . import ops_suite
from .timing import synchronize

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ops_suite.default_backends(DEVICE, with_compile=False)
CASES = ops_suite.cases(DEVICE, size="quick")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c).replace(" ", "-"))
def test_op(benchmark, case: ops_suite.Case, backend: str) -> None:
    inputs = ops_suite.make_inputs(case, DEVICE, torch.Generator().manual_seed(0))
    step = ops_suite.make_step(case, ops_suite.make_forward(case, backend))

    def run() -> None:
        step(*inputs)
        synchronize(DEVICE)

    benchmark(run)
