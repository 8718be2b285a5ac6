"""The quick parity subset: every op of each fused backend against the eager reference at M = 10, in float32 and
bfloat16, contiguous and channels_last, at a handful of shapes (one tiny shape on a CPU).

The first thing a GPU check runs (benchmarks/run_gpu.sh: Triton before any build, cuda once the extension is
built), so it is small enough to compile in parallel in a minute. VDVAE_FAST_QUICK_BACKENDS=triton,cuda limits it
to those backends; by default it runs every fused backend of this machine.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from tests.op_cases import (
    DEVICE,
    FUSED_BACKENDS,
    assert_as_accurate_as_reference,
    grad_tolerance,
    random_targets,
    tolerance,
)
from vdvae_fast import ops

pytestmark = pytest.mark.gpu_quick

NUM_MIXTURES = 10
LATENT_CHANNELS = 16
# (B, H, W): a single pixel, odd sides (no vector width divides them), an imagenet64 batch.
SIDES = [(1, 1, 1), (3, 7, 9), (4, 64, 64)] if DEVICE.type == "cuda" else [(2, 3, 5)]
DTYPES = [torch.float32, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last"]
OPS = ["dmol_nll", "dmol_sample", "sample_and_kl", "gaussian_kl", "sample_gaussian"]


def quick_backends() -> list[str]:
    """The fused backends this run tests: VDVAE_FAST_QUICK_BACKENDS, or every one built here."""
    requested = [b for b in os.environ.get("VDVAE_FAST_QUICK_BACKENDS", "").split(",") if b]
    unknown = [b for b in requested if b not in FUSED_BACKENDS]
    if unknown:
        raise ValueError(
            f"VDVAE_FAST_QUICK_BACKENDS names {', '.join(unknown)}, which cannot run on {DEVICE.type} here; "
            f"choose from {', '.join(FUSED_BACKENDS) or 'nothing (no fused backend is built)'}"
        )
    return requested or FUSED_BACKENDS


def _params() -> list:
    """(backend, op, dtype, layout, sides) with the sides last: a test id without its sides names one kernel
    variant, which the parallel runner keeps in one process so that it is compiled once."""
    found = []
    for backend, op, dtype, layout, sides in itertools.product(quick_backends(), OPS, DTYPES, LAYOUTS, SIDES):
        dtype_name = str(dtype).removeprefix("torch.")
        case_id = f"{backend}-{op}-{dtype_name}-{layout}-{'x'.join(map(str, sides))}"
        found.append(pytest.param(backend, op, dtype, layout, sides, id=case_id))
    return found or [pytest.param(None, None, None, None, None, marks=pytest.mark.skip(reason="no fused backend"))]


def _place(t: torch.Tensor, dtype: torch.dtype, layout: str) -> torch.Tensor:
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return t.to(DEVICE, dtype).contiguous(memory_format=memory_format)


def _outputs_and_grads(call, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """call(*leaves)'s outputs and the gradients of its leaves under dense random upstream gradients (the same
    for every backend), as a layer inside a model gets them."""
    leaves = [t.detach().requires_grad_(True) for t in params]
    outputs = call(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    gen = torch.Generator().manual_seed(3)
    upstream = [torch.randn(o.shape, generator=gen).to(DEVICE, o.dtype) for o in outputs]
    torch.autograd.backward(outputs, upstream)
    return [o.detach() for o in outputs], [leaf.grad for leaf in leaves]


def _check_dmol_nll(backend: str, dtype: torch.dtype, layout: str, sides: tuple[int, int, int]) -> None:
    batch, height, width = sides
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, 10 * NUM_MIXTURES, height, width, generator=gen)
    logits[:, NUM_MIXTURES:] *= 0.5  # scales in the range a trained model produces
    logits = _place(logits, dtype, layout)
    x = _place(random_targets(batch, height, width, 8, gen), torch.float32, layout)

    def run(name: str, logits: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (nll,), (grad,) = _outputs_and_grads(lambda leaf: ops.dmol_nll(leaf, x, backend=name), [logits])
        return nll, grad

    nll, grad = run(backend, logits, x)
    ref_nll, ref_grad = run("reference", logits, x)
    assert nll.dtype == torch.float32 and nll.shape == (batch,)
    assert grad.dtype == dtype and grad.stride() == logits.stride()
    torch.testing.assert_close(nll, ref_nll, **tolerance(torch.float32))
    if dtype == torch.float32:  # σ(plus) − σ(min) cancels in float32: float64 is the oracle (tests/test_dmol_nll.py)
        truth_nll, truth_grad = run("reference", logits.double(), x.double())
        assert_as_accurate_as_reference(nll, ref_nll, truth_nll, "nll")
        assert_as_accurate_as_reference(grad, ref_grad, truth_grad, "grad")
    else:
        torch.testing.assert_close(grad.float(), ref_grad.float(), **grad_tolerance(dtype, ref_grad.float()))


def _check_dmol_sample(backend: str, dtype: torch.dtype, layout: str, sides: tuple[int, int, int]) -> None:
    batch, height, width = sides
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(batch, 10 * NUM_MIXTURES, height, width, generator=gen)
    logits[:, NUM_MIXTURES:] *= 0.5
    logits = _place(logits, dtype, layout)
    image = ops.dmol_sample(logits, seed=99, backend=backend)
    expected = ops.dmol_sample(logits, seed=99, backend="reference")
    assert image.shape == (batch, 3, height, width) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    # The same integer draws: mixture and logistic noise agree; a Gumbel near-tie may flip in float rounding.
    assert ((image - expected).abs() <= 1e-4).float().mean() >= 0.99


def _gaussians(count: int, dtype: torch.dtype, layout: str, sides: tuple[int, int, int], seed: int) -> list:
    batch, height, width = sides
    gen = torch.Generator().manual_seed(seed)
    return [
        _place(torch.randn(batch, LATENT_CHANNELS, height, width, generator=gen) * 0.5, dtype, layout)
        for _ in range(count)
    ]


def _assert_grads_close(grads: list, ref_grads: list, params: list, dtype: torch.dtype) -> None:
    for grad, ref_grad, param in zip(grads, ref_grads, params, strict=True):
        assert grad.dtype == dtype and grad.stride() == param.stride()
        torch.testing.assert_close(grad.float(), ref_grad.float(), **grad_tolerance(dtype, ref_grad.float()))


def _check_sample_and_kl(backend: str, dtype: torch.dtype, layout: str, sides: tuple[int, int, int]) -> None:
    params = _gaussians(4, dtype, layout, sides, seed=2)
    (z, kl), grads = _outputs_and_grads(lambda *p: ops.sample_and_kl(*p, seed=1234, backend=backend), params)
    (ref_z, ref_kl), ref_grads = _outputs_and_grads(
        lambda *p: ops.sample_and_kl(*p, seed=1234, backend="reference"), params
    )
    assert z.dtype == dtype and z.stride() == params[0].stride() and kl.dtype == torch.float32
    torch.testing.assert_close(z.float(), ref_z.float(), **tolerance(dtype))
    torch.testing.assert_close(kl, ref_kl, rtol=2e-5, atol=1e-4)
    _assert_grads_close(grads, ref_grads, params, dtype)


def _check_gaussian_kl(backend: str, dtype: torch.dtype, layout: str, sides: tuple[int, int, int]) -> None:
    params = _gaussians(4, dtype, layout, sides, seed=4)
    (kl,), grads = _outputs_and_grads(lambda *p: ops.gaussian_kl(*p, backend=backend), params)
    (ref_kl,), ref_grads = _outputs_and_grads(lambda *p: ops.gaussian_kl(*p, backend="reference"), params)
    assert kl.dtype == torch.float32 and kl.shape == params[0].shape
    torch.testing.assert_close(kl, ref_kl, **tolerance(torch.float32))
    _assert_grads_close(grads, ref_grads, params, dtype)


def _check_sample_gaussian(backend: str, dtype: torch.dtype, layout: str, sides: tuple[int, int, int]) -> None:
    params = _gaussians(2, dtype, layout, sides, seed=6)
    sample = ops.sample_gaussian
    (z,), grads = _outputs_and_grads(lambda *p: sample(*p, temperature=0.8, seed=77, backend=backend), params)
    (ref_z,), ref_grads = _outputs_and_grads(
        lambda *p: sample(*p, temperature=0.8, seed=77, backend="reference"), params
    )
    assert z.dtype == dtype and z.stride() == params[0].stride()
    torch.testing.assert_close(z.float(), ref_z.float(), **tolerance(dtype))
    _assert_grads_close(grads, ref_grads, params, dtype)


CHECKS = {
    "dmol_nll": _check_dmol_nll,
    "dmol_sample": _check_dmol_sample,
    "sample_and_kl": _check_sample_and_kl,
    "gaussian_kl": _check_gaussian_kl,
    "sample_gaussian": _check_sample_gaussian,
}


@pytest.mark.parametrize("backend,op,dtype,layout,sides", _params())
def test_op_matches_the_reference(backend: str, op: str, dtype: torch.dtype, layout: str, sides: tuple) -> None:
    CHECKS[op](backend, dtype, layout, sides)
