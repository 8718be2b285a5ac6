"""The Gaussian stream: four normals per Philox call, the same in every backend, with independent moments."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from tests.op_cases import DEVICE, FUSED_BACKENDS, INTERPRETED
from vdvae_fast import ops, philox


@triton.jit
def _triton_randn4x(out, seed, groups, BLOCK: tl.constexpr):
    group = tl.arange(0, BLOCK)
    first, second, third, fourth = tl.randn4x(seed, group)
    keep = group < groups
    tl.store(out + 4 * group, first, mask=keep)
    tl.store(out + 4 * group + 1, second, mask=keep)
    tl.store(out + 4 * group + 2, third, mask=keep)
    tl.store(out + 4 * group + 3, fourth, mask=keep)


@triton.jit
def _triton_randint4x(out, seed, groups, BLOCK: tl.constexpr):
    group = tl.arange(0, BLOCK)
    first, second, third, fourth = tl.randint4x(seed, group)
    keep = group < groups
    tl.store(out + 4 * group, first.to(tl.int32, bitcast=True), mask=keep)
    tl.store(out + 4 * group + 1, second.to(tl.int32, bitcast=True), mask=keep)
    tl.store(out + 4 * group + 2, third.to(tl.int32, bitcast=True), mask=keep)
    tl.store(out + 4 * group + 3, fourth.to(tl.int32, bitcast=True), mask=keep)


@pytest.mark.parametrize("seed", [7, 2**40 + 12345])
def test_reference_stream_is_tritons_randn4x(seed: int) -> None:
    """Element i is tl.randn4x(seed, i // 4)[i % 4]: the same Philox words, the same Box-Muller branches."""
    groups = 256
    words = torch.empty(4 * groups, dtype=torch.int32, device=DEVICE)
    _triton_randint4x[(1,)](words, seed, groups, BLOCK=groups)
    v0, v1, v2, v3 = philox.philox(seed, torch.arange(groups))
    expected_words = torch.stack([v0, v1, v2, v3], dim=-1).reshape(-1)
    assert torch.equal(words.cpu().to(torch.int64) & 0xFFFFFFFF, expected_words)

    normals = torch.empty(4 * groups, device=DEVICE)
    _triton_randn4x[(1,)](normals, seed, groups, BLOCK=groups)
    reference = philox.normal(seed, torch.Size([4 * groups]), torch.device("cpu"))
    torch.testing.assert_close(normals.cpu(), reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(3, 3, 5, 7), (2, 4, 6, 6), (1, 1, 3, 3)])
def test_every_backend_draws_the_reference_stream(
    backend: str, shape: tuple[int, ...], fmt: torch.memory_format
) -> None:
    """Images of 105 and 9 elements start mid-group, so the kernels' partial groups at tile edges are covered."""
    mu, logsigma = (torch.zeros(shape, device=DEVICE).contiguous(memory_format=fmt) for _ in range(2))
    reference = philox.normal(2024, torch.Size(shape), DEVICE)
    eps = ops.sample_gaussian(mu, logsigma, seed=2024, backend=backend)  # 0 + 1·e^0·eps
    torch.testing.assert_close(eps, reference, rtol=1e-6, atol=1e-6)
    eps_q, _ = ops.sample_and_kl(mu, logsigma, mu, logsigma, seed=2024, backend=backend)
    torch.testing.assert_close(eps_q, reference, rtol=1e-6, atol=1e-6)


def _eps(backend: str, n: int, seed: int) -> torch.Tensor:
    zeros = torch.zeros(1, n, device=DEVICE)
    return ops.sample_gaussian(zeros, zeros, seed=seed, backend=backend)[0].double().cpu()


@pytest.mark.parametrize("name", ["reference", *FUSED_BACKENDS])
def test_eps_moments_and_independence_of_the_four_lanes(name: str) -> None:
    """Mean 0, variance 1, fourth moment 3; neighbours, and the squares of the two Box-Muller branches of one
    uniform pair (which share their radius), uncorrelated. Bounds are 5 standard errors."""
    n = 1 << 16 if (name == "triton" and INTERPRETED) else 1 << 20
    eps = _eps(name, n, seed=31)
    assert abs(eps.mean().item()) < 5.0 / math.sqrt(n)
    assert abs(eps.pow(2).mean().item() - 1.0) < 5.0 * math.sqrt(2.0 / n)
    assert abs(eps.pow(4).mean().item() - 3.0) < 5.0 * math.sqrt(96.0 / n)
    assert abs((eps[1:] * eps[:-1]).mean().item()) < 5.0 / math.sqrt(n)
    lanes = eps.reshape(-1, 4)
    groups = lanes.shape[0]
    for a, b in [(0, 1), (2, 3), (0, 2), (1, 3)]:
        assert abs((lanes[:, a] * lanes[:, b]).mean().item()) < 5.0 / math.sqrt(groups)
        squares = torch.corrcoef(torch.stack([lanes[:, a].pow(2), lanes[:, b].pow(2)]))[0, 1]
        assert abs(squares.item()) < 5.0 / math.sqrt(groups)
