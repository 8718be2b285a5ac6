"""dmol_nll gradients where both edges of a pixel's bin sit far in a logistic's right tail.

There sigmoid(plus_in) and sigmoid(min_in) are both within 1e-3 of 1 and cdf_delta, their difference, keeps
only a few correct bits in float32. The float32 reference's gradient is still accurate: autograd forms each
sigmoid' as s (1 - s) from the same rounded s, and that rounding cancels against cdf_delta's. A kernel that
takes sigmoid' in another form (e.g. exp(-|v|) / (1 + exp(-|v|))**2, exact as it is) divides an exact
numerator by the inexact cdf_delta and lands orders of magnitude further from float64.
"""

from __future__ import annotations

import pytest
import torch

from tests.op_cases import DEVICE, FUSED_BACKENDS
from vdvae_fast import ops, reference

# channel offsets inside colour c's block of 3M channels (M = 1): mean, raw log-scale, raw coefficient
PARAMETERS = {"mean": 1, "log_scale": 2, "coeff": 3}


def _right_tail_case(bits: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One logistic per pixel (M = 1), targets in interior bins, means placed so that min_in lies in [3, 10]:
    from cdf_delta around 1e-3 down to the 1e-5 threshold of the bulk form."""
    gen = torch.Generator().manual_seed(0)
    batch, height, width = 1, 16, 16
    levels = 2**bits - 1
    half, _ = reference.bin_constants(bits)
    x = torch.randint(1, levels - 1, (batch, 3, height, width), generator=gen) * (2.0 / levels) - 1.0
    log_scale = torch.rand(batch, 3, height, width, generator=gen) * 1.5 - 1.0
    min_in = torch.rand(batch, 3, height, width, generator=gen) * 7.0 + 3.0
    logits = torch.zeros(batch, 10, height, width)
    for c in range(3):
        logits[:, 1 + 3 * c] = x[:, c] - half - min_in[:, c] * log_scale[:, c].exp()
        logits[:, 2 + 3 * c] = log_scale[:, c]
        logits[:, 3 + 3 * c] = 0.1 * (c - 1)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return logits.contiguous(memory_format=memory_format), x.float().contiguous(memory_format=memory_format)


def _grad(logits: torch.Tensor, x: torch.Tensor, bits: int, backend: str) -> torch.Tensor:
    leaf = logits.detach().requires_grad_(True)
    ops.dmol_nll(leaf, x, num_bits=bits, backend=backend).sum().backward()
    return leaf.grad.double().cpu()


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bits", [5, 8])
def test_gradients_in_the_far_right_tail_are_as_accurate_as_the_reference(backend: str, layout: str, bits: int):
    logits, x = _right_tail_case(bits, layout)
    truth = _grad(logits.double(), x.double(), bits, "reference")
    ref = _grad(logits, x, bits, "reference")
    fused = _grad(logits.to(DEVICE), x.to(DEVICE), bits, backend)
    for name, offset in PARAMETERS.items():
        channels = [offset + 3 * c for c in range(3)]
        error = (fused[:, channels] - truth[:, channels]).abs().max().item()
        ref_error = (ref[:, channels] - truth[:, channels]).abs().max().item()
        scale = truth[:, channels].abs().max().item()
        assert error <= 2 * ref_error + 1e-7 * scale, f"{name}: error {error:.3g}, reference's {ref_error:.3g}"
