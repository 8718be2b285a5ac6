"""Plain helpers the op tests share: the test device, the fused backends it runs, tolerance tables and inputs.

Importing this module sets TRITON_INTERPRET=1 when no GPU is present, before vdvae_fast (and so Triton) is
imported: the kernels are decorated as interpreted or compiled at that moment.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vdvae_fast import ops  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED_BACKENDS = [b for b in ops.available_backends(DEVICE) if b not in ops.EAGER_BACKENDS]
INTERPRETED = DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"

# Tolerances of a fused backend against the eager reference, by input dtype: (rtol, atol).
# Losses are fp32 in both; low-precision rows cover gradients rounded to the input dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


# Gradients by dtype: (rtol, atol as a fraction of the largest reference gradient). An element's gradient can be
# a cancelling sum of much larger terms (σ(plus_in) − σ(min_in) in the DMoL; g_z·σ·ε against the KL term for
# logσq), so its rounding noise scales with the largest gradient, not with itself.
GRAD_TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 2e-5),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def grad_tolerance(dtype: torch.dtype, reference_grad: torch.Tensor) -> dict[str, float]:
    rtol, scaled_atol = GRAD_TOLERANCES[dtype]
    return {"rtol": rtol, "atol": scaled_atol * max(reference_grad.abs().max().item(), 1e-6)}


def backend_cases(full: list, interpreted: list) -> list:
    """(backend, case) parameters: the full grid for compiled backends, a smaller one for interpreted Triton."""
    params = []
    for name in FUSED_BACKENDS:
        cases = interpreted if (name == "triton" and INTERPRETED) else full
        params += [pytest.param(name, case, id=f"{name}-{case}") for case in cases]
    if not params:
        params.append(pytest.param("none", None, marks=pytest.mark.skip(reason="no fused backend built")))
    return params


def random_targets(batch: int, height: int, width: int, num_bits: int, generator: torch.Generator) -> torch.Tensor:
    """Targets on the bin grid of `num_bits`, in [-1, 1], with both edge values present."""
    levels = 2**num_bits - 1
    pixels = torch.randint(0, levels + 1, (batch, 3, height, width), generator=generator)
    pixels.view(-1)[0] = 0
    pixels.view(-1)[-1] = levels
    return pixels.to(torch.float32) / levels * 2.0 - 1.0


def assert_as_accurate_as_reference(value: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, name: str) -> None:
    """value's largest error against the float64 truth is at most 8x that of the float32 reference (+3e-5 of scale).

    The oracle where float32 cancellation (σ(plus_in) − σ(min_in) of wide logistics) makes the float32
    reference itself inexact: matching its rounding noise element by element would test nothing.
    """
    truth = truth.to(value.device, torch.float64)
    error = (value.double() - truth).abs().max().item()
    ref_error = (ref.double() - truth).abs().max().item()
    allowed = 8 * ref_error + 3e-5 * (1 + truth.abs().max().item())
    assert error <= allowed, f"{name}: error {error:.3g} against float64, float32 reference's {ref_error:.3g}"
