"""Shared pytest fixtures. Plain helpers (tolerances, cases, targets) live in tests/op_cases.py."""

from __future__ import annotations

import pytest
import torch

from tests.op_cases import FUSED_BACKENDS


@pytest.fixture
def one_thread():
    """Training tests run small models whose steps are faster on one thread than split across two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(
    params=FUSED_BACKENDS or [pytest.param("none", marks=pytest.mark.skip(reason="no fused backend built"))]
)
def backend(request: pytest.FixtureRequest) -> str:
    """Every fused backend that can run on this machine's test device."""
    return request.param
