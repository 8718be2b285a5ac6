"""dmol_sample of every fused backend against the eager reference drawing with the same seed."""

from __future__ import annotations

import pytest
import torch

from tests.op_cases import DEVICE, INTERPRETED
from vdvae_fast import ops


def _logits(batch: int, num_mix: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, 10 * num_mix, height, width, generator=gen)
    logits[:, num_mix:] *= 0.5
    return logits.to(DEVICE)


@pytest.mark.parametrize("num_mix", [1, 3, 5, 10, 32])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_matches_reference_with_the_same_seed(backend: str, num_mix: int, fmt: torch.memory_format) -> None:
    size = 4 if (backend == "triton" and INTERPRETED) else 12
    logits = _logits(2, num_mix, size, size + 1, seed=num_mix)
    expected = ops.dmol_sample(logits, seed=99, backend="reference")
    image = ops.dmol_sample(logits.contiguous(memory_format=fmt), seed=99, backend=backend)
    assert image.shape == expected.shape and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    # Same integer draws: the mixture choice and the logistic noise agree; a Gumbel near-tie may flip in float rounding.
    close = (image - expected).abs() <= 1e-4
    assert close.float().mean() >= 0.995


def test_lower_precision_logits_sample_the_same_image(backend: str) -> None:
    logits = _logits(1, 3, 4, 4, seed=1).to(torch.bfloat16)
    expected = ops.dmol_sample(logits.float(), seed=3, backend="reference")
    torch.testing.assert_close(ops.dmol_sample(logits, seed=3, backend=backend), expected, rtol=1e-4, atol=1e-4)


def test_same_seed_same_image_different_seed_different_image(backend: str) -> None:
    logits = _logits(2, 4, 5, 5, seed=2)
    first = ops.dmol_sample(logits, seed=1, backend=backend)
    assert torch.equal(first, ops.dmol_sample(logits, seed=1, backend=backend))
    assert not torch.equal(first, ops.dmol_sample(logits, seed=2, backend=backend))


def test_draws_follow_the_logistic_of_the_dominant_mixture(backend: str) -> None:
    side = 8 if (backend == "triton" and INTERPRETED) else 64
    num_mix = 3
    logits = torch.zeros(1, 10 * num_mix, side, side)
    logits[:, 2] = 50.0  # mixture 2 always wins
    for c, mean in enumerate([0.3, -0.2, 0.1]):
        block = num_mix + 3 * num_mix * c
        logits[:, block + 2] = mean
        logits[:, block + num_mix + 2] = -3.0  # scale e^-3: the clamp to [-1, 1] never binds
    image = ops.dmol_sample(logits.to(DEVICE), seed=8, backend=backend).double()
    scale = torch.tensor(-3.0).exp().item()
    tolerance = 5.0 * scale * 1.8138 / side  # 5 standard errors of the mean (logistic std = s·π/√3)
    assert abs(image[0, 0].mean().item() - 0.3) < tolerance
    assert abs(image[0, 1].mean().item() + 0.2) < tolerance
    assert image[0, 0].std().item() == pytest.approx(scale * 1.8138, rel=0.35 if side == 8 else 0.06)
