"""The CUDA kernels' per-pixel and per-packet bodies, run on the host, against the eager reference.

csrc/cuda_bodies_on_host.cpp loops the very `__host__ __device__` functions the CUDA kernels call per pixel
(dmol_math.h's dmol_nll_forward_pixel, dmol_nll_backward_pixel, dmol_sample_pixel) over CPU tensors, so the
kernels' math is checked without a GPU; only their indexing and the MUFU math functions wait for one.
M = 10 runs the unrolled instantiation the kernels use for it, the other M the run-time loop.
The Gaussian kernels' per-packet bodies (gaussian_packets.h) run the same way in every parametrization, with
packets of 4 floats (the kernels' 16 bytes) and of single elements, eps and its indexing included, and the
random ops' pixel-quad work items on channels_last tensors with W % 4 == 0.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.op_cases import grad_tolerance, tolerance
from vdvae_fast import ops, reference

if ops._EXTENSION is None:
    pytest.skip("the compiled extension is not built", allow_module_level=True)

BODIES = torch.ops.vdvae_fast_C
EXP_SCALES = (0, reference.SOFTPLUS_BETA, reference.LOG_SCALE_MIN)  # VDVAE's scales: (scale, beta, log_scale_min)


def _case(batch: int, mixtures: int, height: int, width: int, bits: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, 10 * mixtures, height, width, generator=gen, dtype=torch.float64)
    logits[:, mixtures:] *= 0.5  # scales a trained model produces
    levels = 2**bits - 1
    x = torch.randint(0, levels + 1, (batch, 3, height, width), generator=gen).double() / levels * 2 - 1
    x.view(-1)[0], x.view(-1)[-1] = -1.0, 1.0  # both edge bins
    return logits, x


def _reference_value_and_grad(logits: torch.Tensor, x: torch.Tensor, bits: int, upstream: torch.Tensor):
    leaf = logits.detach().requires_grad_(True)
    nll = reference.dmol_nll(leaf, x, num_bits=bits)
    (nll * upstream).sum().backward()
    return nll.detach(), leaf.grad


@pytest.mark.parametrize("mixtures", [1, 3, 10])
@pytest.mark.parametrize("bits", [8, 5])
def test_dmol_nll_bodies_match_the_float64_reference(mixtures: int, bits: int) -> None:
    logits64, x64 = _case(2, mixtures, 5, 7, bits, seed=mixtures + bits)
    upstream = torch.tensor([0.7, 1.3], dtype=torch.float64)
    truth_nll, truth_grad = _reference_value_and_grad(logits64, x64, bits, upstream)
    ref_nll, ref_grad = _reference_value_and_grad(logits64.float(), x64.float(), bits, upstream.float())
    logits, x = logits64.float(), x64.float()

    nll = BODIES.dmol_nll_forward_cuda_body_on_host(logits, x, bits, *EXP_SCALES)
    grad = BODIES.dmol_nll_backward_cuda_body_on_host(upstream.float(), logits, x, bits, *EXP_SCALES)

    torch.testing.assert_close(nll, ref_nll, rtol=2e-5, atol=2e-6)
    # no further from float64 than the float32 reference is, up to rounding noise of the largest gradient
    for value, ref, truth in ((nll, ref_nll, truth_nll), (grad, ref_grad, truth_grad)):
        error = (value.double() - truth).abs().max().item()
        ref_error = (ref.double() - truth).abs().max().item()
        assert error <= 8 * ref_error + 1e-6 * truth.abs().max().item(), (error, ref_error)


def test_dmol_nll_bodies_keep_nan_and_edge_semantics() -> None:
    logits64, x64 = _case(2, 10, 3, 3, 8, seed=5)
    logits, x = logits64.float(), x64.float()
    logits[1, 37, 1, 2] = float("nan")
    logits[0, 25, 0, 0] = -40.0  # log-scale of mixture 5, colour 0: below the clamp at -7
    nll = BODIES.dmol_nll_forward_cuda_body_on_host(logits, x, 8, *EXP_SCALES)
    grad = BODIES.dmol_nll_backward_cuda_body_on_host(torch.ones(2), logits, x, 8, *EXP_SCALES)
    assert torch.isfinite(nll[0]) and torch.isnan(nll[1])
    assert torch.isfinite(grad[0]).all() and torch.isnan(grad[1, :, 1, 2]).all()
    assert torch.isfinite(grad[1, :, 0, 0]).all()  # other pixels of the image keep their gradient
    assert grad[0, 25, 0, 0] == 0.0  # clamped: no gradient below -7
    torch.testing.assert_close(nll[0], reference.dmol_nll(logits, x, num_bits=8)[0], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("mixtures", [1, 4, 10])
def test_dmol_sample_body_draws_the_reference_image(mixtures: int) -> None:
    logits64, _ = _case(2, mixtures, 9, 11, 8, seed=mixtures)
    logits = logits64.float()
    image = BODIES.dmol_sample_forward_cuda_body_on_host(logits, *EXP_SCALES, 1234)
    expected = ops.dmol_sample(logits, seed=1234, backend="reference")
    assert image.shape == expected.shape and image.min() >= -1.0 and image.max() <= 1.0
    # Same integer draws: the mixture choice and the logistic noise agree; a Gumbel near-tie may flip in rounding.
    close = (image - expected).abs() <= 1e-4
    assert close.float().mean() >= 0.995
    assert not torch.equal(image, BODIES.dmol_sample_forward_cuda_body_on_host(logits, *EXP_SCALES, 1235))


def test_bodies_refuse_other_dtypes_with_a_clear_error() -> None:
    logits64, x64 = _case(1, 1, 2, 2, 8, seed=0)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        BODIES.dmol_nll_forward_cuda_body_on_host(logits64, x64, 8, *EXP_SCALES)


# --------------------------------------------------------------------------------------------
# The Gaussian kernels' packet bodies
# --------------------------------------------------------------------------------------------

GAUSSIAN_FORMS = list(itertools.product(range(len(reference.SCALES)), range(len(reference.POSTERIORS))))
BETA = reference.SOFTPLUS_BETA


def _gaussian_params(fmt: torch.memory_format, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 4, 5, generator=gen) * 0.5).contiguous(memory_format=fmt) for _ in range(4)]


def _names(scale: int, posterior: int, estimator: int = 0) -> dict:
    return {
        "scale": reference.SCALES[scale],
        "beta": BETA,
        "posterior": reference.POSTERIORS[posterior],
        "kl_estimator": reference.KL_ESTIMATORS[estimator],
    }


def _truth_with_grads(function, inputs, upstreams):
    leaves = [t.double().requires_grad_(True) for t in inputs]
    outputs = function(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    loss = sum((o * u.double()).sum() for o, u in zip(outputs, upstreams, strict=True))
    return [o.detach() for o in outputs], list(torch.autograd.grad(loss, leaves))


def _assert_float64_close(values, truths, grads, truth_grads) -> None:
    for value, truth in zip(values, truths, strict=True):
        torch.testing.assert_close(value.double(), truth, rtol=2e-5, atol=1e-4 if value.dim() == 1 else 2e-6)
    for grad, truth in zip(grads, truth_grads, strict=True):
        torch.testing.assert_close(grad.double(), truth, **grad_tolerance(torch.float32, truth))


LAYOUT_IDS = ["contiguous", "channels_last"]


@pytest.mark.parametrize("vec", [4, 1])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=LAYOUT_IDS)
@pytest.mark.parametrize("estimator", range(len(reference.KL_ESTIMATORS)))
@pytest.mark.parametrize("scale,posterior", GAUSSIAN_FORMS)
def test_sample_and_kl_packet_bodies_match_the_float64_reference(scale, posterior, estimator, fmt, vec) -> None:
    params = _gaussian_params(fmt, seed=scale + 3 * posterior)
    codes = (scale, BETA, posterior, estimator)
    grad_z = torch.randn(params[0].shape, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=fmt)
    grad_kl = torch.tensor([0.7, 1.3])
    z, kl = BODIES.sample_and_kl_forward_cuda_body_on_host(*params, 42, *codes, vec)
    grads = BODIES.sample_and_kl_backward_cuda_body_on_host(grad_z, grad_kl, *params, 42, *codes, vec)
    names = _names(scale, posterior, estimator)
    truths, truth_grads = _truth_with_grads(
        lambda *p: reference.sample_and_kl(*p, **names, seed=42), params, (grad_z, grad_kl)
    )
    assert z.stride() == params[0].stride()
    _assert_float64_close((z, kl), truths, grads, truth_grads)


@pytest.mark.parametrize("vec", [4, 1])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=LAYOUT_IDS)
@pytest.mark.parametrize("scale,posterior", GAUSSIAN_FORMS)
def test_gaussian_kl_packet_bodies_match_the_float64_reference(scale, posterior, fmt, vec) -> None:
    params = _gaussian_params(fmt, seed=7 + scale + 3 * posterior)
    upstream = torch.randn(params[0].shape, generator=torch.Generator().manual_seed(2)).contiguous(memory_format=fmt)
    kl = BODIES.gaussian_kl_forward_cuda_body_on_host(*params, scale, BETA, posterior, vec)
    grads = BODIES.gaussian_kl_backward_cuda_body_on_host(upstream, *params, scale, BETA, posterior, vec)
    names = _names(scale, posterior)
    names.pop("kl_estimator")
    truths, truth_grads = _truth_with_grads(lambda *p: reference.gaussian_kl(*p, **names), params, (upstream,))
    torch.testing.assert_close(kl.double(), truths[0], **tolerance(torch.float32))
    _assert_float64_close((), (), grads, truth_grads)


@pytest.mark.parametrize("vec", [4, 1])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=LAYOUT_IDS)
@pytest.mark.parametrize("scale", range(len(reference.SCALES)))
def test_sample_gaussian_packet_bodies_match_the_float64_reference(scale, fmt, vec) -> None:
    mu, raw = _gaussian_params(fmt, seed=20 + scale)[:2]
    grad_z = torch.randn(mu.shape, generator=torch.Generator().manual_seed(3)).contiguous(memory_format=fmt)
    z = BODIES.sample_gaussian_forward_cuda_body_on_host(mu, raw, 0.6, 9, scale, BETA, vec)
    grad_raw = BODIES.sample_gaussian_backward_cuda_body_on_host(grad_z, mu, raw, 0.6, 9, scale, BETA, vec)
    name = reference.SCALES[scale]
    truths, truth_grads = _truth_with_grads(
        lambda m, r: reference.sample_gaussian(m, r, temperature=0.6, scale=name, seed=9), (mu, raw), (grad_z,)
    )
    torch.testing.assert_close(z.double(), truths[0], **tolerance(torch.float32))
    _assert_float64_close((), (), (grad_raw,), truth_grads[1:])


# channels_last with W % 4 == 0: the random ops' work items are pixel quads, one Philox call per channel, of
# 4 pixels × the packet's channels where C is a multiple of the packet width (C = 4, 8 with vec = 4, and
# every C with vec = 1), else of 4 pixels × 1 channel (C = 1, 3 with vec = 4).
QUAD_SHAPES = [(2, 4, 3, 8), (2, 3, 2, 4), (2, 8, 1, 12), (1, 1, 2, 4)]


@pytest.mark.parametrize("vec", [4, 1])
@pytest.mark.parametrize("shape", QUAD_SHAPES, ids=str)
def test_random_bodies_on_pixel_quads_draw_the_reference_stream(shape, vec) -> None:
    """eps bit for bit what the cpu backend draws (itself checked against the reference stream), and the
    outputs and gradients of sample_and_kl and sample_gaussian within rounding of float64."""
    gen = torch.Generator().manual_seed(sum(shape) + vec)
    params = [(torch.randn(shape, generator=gen) * 0.5).contiguous(memory_format=torch.channels_last) for _ in range(5)]
    zeros = torch.zeros_like(params[0])
    drawn = ops.sample_gaussian(zeros, zeros, seed=42, backend="cpu")
    assert torch.equal(BODIES.sample_gaussian_forward_cuda_body_on_host(zeros, zeros, 1.0, 42, 0, BETA, vec), drawn)
    eps_q, _ = BODIES.sample_and_kl_forward_cuda_body_on_host(zeros, zeros, zeros, zeros, 42, 0, BETA, 0, 0, vec)
    assert torch.equal(eps_q, drawn)

    codes = (1, BETA, 1, 1)  # softplus, residual, sampled: every branch of the math
    grad_z, grad_kl = params.pop(), torch.tensor([0.7, 1.3])[: shape[0]]
    z, kl = BODIES.sample_and_kl_forward_cuda_body_on_host(*params, 42, *codes, vec)
    grads = BODIES.sample_and_kl_backward_cuda_body_on_host(grad_z, grad_kl, *params, 42, *codes, vec)
    truths, truth_grads = _truth_with_grads(
        lambda *p: reference.sample_and_kl(*p, **_names(1, 1, 1), seed=42), params, (grad_z, grad_kl)
    )
    assert z.stride() == params[0].stride()
    _assert_float64_close((z, kl), truths, grads, truth_grads)

    mu, raw = params[:2]
    z = BODIES.sample_gaussian_forward_cuda_body_on_host(mu, raw, 0.6, 9, 1, BETA, vec)
    grad_raw = BODIES.sample_gaussian_backward_cuda_body_on_host(grad_z, mu, raw, 0.6, 9, 1, BETA, vec)
    truths, truth_grads = _truth_with_grads(
        lambda m, r: reference.sample_gaussian(m, r, temperature=0.6, scale="softplus", seed=9), (mu, raw), (grad_z,)
    )
    torch.testing.assert_close(z.double(), truths[0], **tolerance(torch.float32))
    _assert_float64_close((), (), (grad_raw,), truth_grads[1:])


def test_gaussian_bodies_refuse_packets_that_do_not_divide() -> None:
    params = [torch.zeros(2, 3) for _ in range(4)]
    with pytest.raises(RuntimeError, match="vec = 4 floats need a multiple of 4"):
        BODIES.gaussian_kl_forward_cuda_body_on_host(*params, 0, BETA, 0, 4)
