"""The Triton Gaussian kernels on channels_last tensors, where W % 4 == 0 lets four w-neighbours share one Philox
call (and W % 4 != 0 falls back to one call per element): the eps they draw is the stream of vdvae_fast/philox.py
at every awkward shape, bit for bit the eps of contiguous tensors, and z, the KL and the gradients hold against the
float64 reference under every parametrization and dtype."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.op_cases import DEVICE, grad_tolerance, tolerance
from vdvae_fast import philox, reference
from vdvae_fast.kernels import sample_and_kl, sample_gaussian

SEED = 4242
BETA = reference.SOFTPLUS_BETA
# (B, C, H, W): one channel, three, seventeen (slots of four w-neighbours straddle channel runs); W = 4, 8, 12
# group, W = 6 draws per element; (2, 17, 6, 12) has images of 1224 elements, two sample_and_kl programs each,
# and sample_gaussian blocks that start inside an image.
SHAPES = [(3, 1, 5, 4), (2, 3, 3, 8), (2, 17, 2, 12), (2, 17, 6, 12), (2, 3, 5, 6), (1, 17, 3, 6)]
CODES = list(
    itertools.product(
        range(len(reference.SCALES)), range(len(reference.POSTERIORS)), range(len(reference.KL_ESTIMATORS))
    )
)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _float64_box_muller(shape: tuple) -> torch.Tensor:
    """The stream's eps in float64 from its bit-exact float32 uniforms (philox.normal_uniforms)."""
    numel = torch.Size(shape).numel()
    u1, u2, sine = philox.normal_uniforms(SEED, numel, torch.device("cpu"))
    angle = (torch.tensor(6.283185307179586, dtype=torch.float32) * u2).double()
    radius = torch.sqrt(-2.0 * torch.log(u1.double()))
    return (radius * torch.where(sine, torch.sin(angle), torch.cos(angle))).reshape(shape)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_eps_is_the_stream_bit_for_bit_in_channels_last(shape: tuple) -> None:
    """eps = z at mu = 0, sigma = e^0 = 1: sample_and_kl and sample_gaussian, forward and (through grad_logsigma at
    grad_z = 1, which is eps * sigma) backward, in channels_last equal the contiguous draw bit for bit, and the
    float64 Box-Muller of the stream's uniforms to float32 rounding of Triton's log, sqrt and cos/sin."""
    zeros = torch.zeros(shape, device=DEVICE)
    ones = torch.ones(shape, device=DEVICE)
    drawn = {}
    for layout, convert in (("contiguous", torch.Tensor.contiguous), ("channels_last", _channels_last)):
        z0, o1 = convert(zeros), convert(ones)
        z, _ = sample_and_kl.sample_and_kl_forward(z0, z0, z0, z0, SEED)
        grad_kl = torch.zeros(shape[0], device=DEVICE)
        _, grad_b, _, _ = sample_and_kl.sample_and_kl_backward(o1, grad_kl, z0, z0, z0, z0, SEED)
        grad_logsigma = sample_gaussian.sample_gaussian_backward(o1, z0, z0, 1.0, SEED)
        drawn[layout] = [z, grad_b, sample_gaussian.sample_gaussian_forward(z0, z0, 1.0, SEED), grad_logsigma]
        for eps in drawn[layout]:
            assert eps.stride() == z0.stride()
    for eps in drawn["contiguous"][1:] + drawn["channels_last"]:
        assert torch.equal(eps, drawn["contiguous"][0])
    exact = _float64_box_muller(shape)
    torch.testing.assert_close(drawn["channels_last"][0].cpu().double(), exact, rtol=1e-6, atol=2e-6)


def _inputs(shape: tuple, dtype: torch.dtype) -> list:
    """(a, b, mu_p, raw_p, grad_z) in channels_last, and a grad_kl per image."""
    gen = torch.Generator().manual_seed(7)
    tensors = [_channels_last(torch.randn(shape, generator=gen)).to(DEVICE, dtype) for _ in range(5)]
    return tensors, torch.linspace(-1.1, 0.9, shape[0]).to(DEVICE)


def _kernel_outputs(inputs, grad_z, grad_kl, codes) -> tuple:
    scale, posterior, estimator = codes
    args = (SEED, scale, BETA, posterior, estimator)
    z, kl = sample_and_kl.sample_and_kl_forward(*inputs, *args)
    return z, kl, sample_and_kl.sample_and_kl_backward(grad_z, grad_kl, *inputs, *args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("codes", CODES, ids=lambda c: "-".join(n[i] for n, i in zip(
    (reference.SCALES, reference.POSTERIORS, reference.KL_ESTIMATORS), c, strict=True)))  # fmt: skip
def test_grouped_channels_last_matches_contiguous_and_the_float64_reference(codes: tuple, dtype: torch.dtype) -> None:
    """Every parametrization in channels_last with W % 4 == 0: z and the four gradients are elementwise, so they
    equal the contiguous tensors' bit for bit; the per-image KL (summed in another order) and all of them match
    the float64 reference."""
    shape = (2, 17, 2, 12)
    (*inputs, grad_z), grad_kl = _inputs(shape, dtype)
    z, kl, grads = _kernel_outputs(inputs, grad_z, grad_kl, codes)
    contiguous = [t.contiguous() for t in inputs]
    z_c, kl_c, grads_c = _kernel_outputs(contiguous, grad_z.contiguous(), grad_kl, codes)
    assert z.stride() == inputs[0].stride() and all(g.stride() == inputs[0].stride() for g in grads)
    assert torch.equal(z, z_c)
    for grad, grad_c in zip(grads, grads_c, strict=True):
        assert torch.equal(grad, grad_c)
    torch.testing.assert_close(kl, kl_c, rtol=1e-6, atol=1e-5)

    leaves = [t.detach().cpu().double().requires_grad_(True) for t in inputs]
    names = dict(zip(("scale", "posterior", "kl_estimator"), (reference.SCALES[codes[0]],
                 reference.POSTERIORS[codes[1]], reference.KL_ESTIMATORS[codes[2]]), strict=True))  # fmt: skip
    ref_z, ref_kl = reference.sample_and_kl(*leaves, beta=BETA, **names, seed=SEED, backend="reference")
    ((ref_z * grad_z.cpu().double()).sum() + (ref_kl * grad_kl.cpu().double()).sum()).backward()
    torch.testing.assert_close(z.cpu().double(), ref_z.detach().to(dtype).double(), **tolerance(dtype))
    torch.testing.assert_close(kl.cpu().double(), ref_kl.detach(), rtol=2e-5, atol=1e-4)
    for grad, leaf in zip(grads, leaves, strict=True):
        torch.testing.assert_close(grad.cpu().double(), leaf.grad, **grad_tolerance(dtype, leaf.grad))
