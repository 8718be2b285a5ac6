"""sample_and_kl, gaussian_kl and sample_gaussian of every fused backend against the eager reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.op_cases import DEVICE, FUSED_BACKENDS, backend_cases, grad_tolerance, tolerance
from vdvae_fast import ops, philox

SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 16, 8, 8), (4, 33)]
FULL = list(
    itertools.product(SHAPES, [torch.float32, torch.bfloat16, torch.float16], ["contiguous", "channels_last"])
) + [((1, 16, 128, 128), torch.float32, "contiguous"), ((1, 2, 1024, 1024), torch.float32, "channels_last")]
INTERPRETED = [
    ((1, 1, 1, 1), torch.float32, "contiguous"),
    ((2, 3, 5, 7), torch.float32, "channels_last"),
    ((4, 33), torch.float16, "contiguous"),
    ((2, 3, 4, 4), torch.bfloat16, "channels_last"),
]


def _params(shape, dtype, fmt, seed=0, count=4):
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=gen) * 0.5 for _ in range(count)]
    if fmt == "channels_last" and len(shape) == 4:
        tensors = [t.contiguous(memory_format=torch.channels_last) for t in tensors]
    return [t.to(DEVICE, dtype) for t in tensors]


def _leaves(tensors):
    return [t.detach().requires_grad_(True) for t in tensors]


def _sample_and_kl_with_grads(params, backend, seed):
    leaves = _leaves(params)
    z, kl = ops.sample_and_kl(*leaves, seed=seed, backend=backend)
    gen = torch.Generator().manual_seed(1)
    upstream_z = torch.randn(z.shape, generator=gen).to(DEVICE, z.dtype)
    upstream_kl = torch.rand(kl.shape, generator=gen).to(DEVICE)
    ((z.float() * upstream_z.float()).sum() + (kl * upstream_kl).sum()).backward()
    return z.detach(), kl.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend,case", backend_cases(FULL, INTERPRETED))
def test_sample_and_kl_matches_reference(backend: str, case: tuple) -> None:
    shape, dtype, fmt = case
    params = _params(shape, dtype, fmt)
    z, kl, grads = _sample_and_kl_with_grads(params, backend, seed=1234)
    ref_z, ref_kl, ref_grads = _sample_and_kl_with_grads(params, "reference", seed=1234)
    assert z.dtype == dtype and kl.dtype == torch.float32 and kl.shape == (shape[0],)
    assert z.stride() == params[0].stride()
    torch.testing.assert_close(z.float(), ref_z.float(), **tolerance(dtype))
    torch.testing.assert_close(kl, ref_kl, rtol=2e-5, atol=1e-4)
    for grad, ref_grad, param in zip(grads, ref_grads, params, strict=True):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.float(), ref_grad.float(), **grad_tolerance(dtype, ref_grad.float()))
        assert grad.stride() == param.stride()


@pytest.mark.parametrize("backend,case", backend_cases(FULL, INTERPRETED))
def test_gaussian_kl_matches_reference(backend: str, case: tuple) -> None:
    shape, dtype, fmt = case
    params = _params(shape, dtype, fmt, seed=2)
    results = {}
    for name in (backend, "reference"):
        leaves = _leaves(params)
        kl = ops.gaussian_kl(*leaves, backend=name)
        upstream = torch.randn(kl.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        (kl * upstream).sum().backward()
        results[name] = (kl.detach(), [leaf.grad for leaf in leaves])
    kl, grads = results[backend]
    ref_kl, ref_grads = results["reference"]
    assert kl.dtype == torch.float32 and kl.shape == shape
    torch.testing.assert_close(kl, ref_kl, **tolerance(torch.float32))
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad.float(), ref_grad.float(), **grad_tolerance(dtype, ref_grad.float()))


@pytest.mark.parametrize("temperature", [0.0, 0.6, 1.0])
def test_sample_gaussian_matches_reference(backend: str, temperature: float) -> None:
    params = _params((2, 4, 6, 6), torch.float32, "contiguous", seed=4, count=2)
    results = {}
    for name in (backend, "reference"):
        mu, logsigma = _leaves(params)
        z = ops.sample_gaussian(mu, logsigma, temperature=temperature, seed=77, backend=name)
        (z * torch.linspace(-1, 1, z.numel(), device=DEVICE).reshape(z.shape)).sum().backward()
        results[name] = (z.detach(), mu.grad, logsigma.grad)
    for value, ref in zip(results[backend], results["reference"], strict=True):
        torch.testing.assert_close(value, ref, **tolerance(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_sample_gaussian_passes_the_upstream_gradient_to_mu(backend: str, dtype: torch.dtype, fmt: str) -> None:
    """dz/dmu = 1: mu's gradient is the upstream gradient itself, bit for bit, in mu's dtype and memory format,
    also when the upstream comes in the other layout; in mu's layout it is handed through without a copy."""
    mu, logsigma = _leaves(_params((2, 3, 4, 4), dtype, fmt, seed=6, count=2))
    z = ops.sample_gaussian(mu, logsigma, temperature=0.8, seed=11, backend=backend)
    other = "channels_last" if fmt == "contiguous" else "contiguous"
    for layout in (fmt, other):
        upstream = _params(z.shape, dtype, layout, seed=7, count=1)[0]
        (grad_mu,) = torch.autograd.grad(z, mu, upstream, retain_graph=True)
        assert torch.equal(grad_mu, upstream)
        assert grad_mu.dtype == mu.dtype and grad_mu.stride() == mu.stride()
        assert (grad_mu.data_ptr() == upstream.data_ptr()) == (layout == fmt)


def test_same_seed_gives_the_same_z_in_every_backend_and_layout() -> None:
    mu, logsigma = (torch.zeros(2, 3, 5, 4, device=DEVICE) for _ in range(2))
    reference_z = ops.sample_gaussian(mu, logsigma, seed=2024, backend="reference")
    for backend in FUSED_BACKENDS:
        for fmt in (torch.contiguous_format, torch.channels_last):
            z = ops.sample_gaussian(
                mu.contiguous(memory_format=fmt), logsigma.contiguous(memory_format=fmt), seed=2024, backend=backend
            )
            # The integer Philox stream is bit-exact; log/cos of different math libraries differ by an ulp or two.
            torch.testing.assert_close(z, reference_z, rtol=1e-6, atol=1e-6)
            zq, _ = ops.sample_and_kl(mu, logsigma, mu, logsigma, seed=2024, backend=backend)
            torch.testing.assert_close(zq, reference_z, rtol=1e-6, atol=1e-6)
    other = ops.sample_gaussian(mu, logsigma, seed=2025, backend="reference")
    assert not torch.allclose(other, reference_z)


def test_kernel_eps_is_within_4_ulp_of_float64_box_muller(backend: str) -> None:
    """The float log, cos, sin and sqrt of csrc/gaussian_math.h against float64 Box-Muller of the same float32 uniforms."""
    if backend == "triton":
        pytest.skip("Triton draws eps with tl.log and tl.cos, not gaussian_math.h")
    n, seed = 1 << 20, 11
    zeros = torch.zeros(1, n, device=DEVICE)
    eps = ops.sample_gaussian(zeros, zeros, seed=seed, backend=backend)[0].cpu().double()  # 0 + 1·e^0·eps
    u1, u2, sine = philox.normal_uniforms(seed, n, torch.device("cpu"))
    angle = (torch.tensor(6.283185307179586, dtype=torch.float32) * u2).double()
    exact = torch.sqrt(-2.0 * torch.log(u1.double())) * torch.where(sine, torch.sin(angle), torch.cos(angle))
    _, exponent = torch.frexp(exact.float())
    ulp = torch.ldexp(torch.ones_like(exact), exponent.double() - 24)
    assert ((eps - exact).abs() / ulp).max().item() <= 4.0


def test_default_seed_follows_torch_manual_seed(backend: str) -> None:
    mu, logsigma = torch.zeros(64, device=DEVICE).reshape(2, 32), torch.zeros(2, 32, device=DEVICE)
    torch.manual_seed(9)
    first = ops.sample_gaussian(mu, logsigma, backend=backend)
    second = ops.sample_gaussian(mu, logsigma, backend=backend)
    torch.manual_seed(9)
    assert torch.equal(ops.sample_gaussian(mu, logsigma, backend=backend), first)
    assert not torch.equal(first, second)


def test_fused_samples_have_the_requested_moments(backend: str) -> None:
    n = 1 << 16 if (backend == "triton" and DEVICE.type == "cpu") else 1 << 19
    mu = torch.full((1, n), -0.4, device=DEVICE)
    logsigma = torch.full((1, n), math.log(2.0), device=DEVICE)
    z, _ = ops.sample_and_kl(mu, logsigma, mu, logsigma, seed=5, backend=backend)
    z = z.double()
    assert abs(z.mean().item() + 0.4) < 4.0 * 2.0 / math.sqrt(n)
    assert z.std().item() == pytest.approx(2.0, rel=6.0 / math.sqrt(n))


def test_nan_propagates_to_that_images_kl(backend: str) -> None:
    params = _params((2, 3, 4, 4), torch.float32, "contiguous", seed=6)
    params[2][1, 0, 0, 0] = float("nan")
    _, kl = ops.sample_and_kl(*params, seed=1, backend=backend)
    assert torch.isfinite(kl[0]) and torch.isnan(kl[1])


def test_cpu_backend_gradcheck_float64() -> None:
    if "cpu" not in FUSED_BACKENDS:
        pytest.skip("the C++ extension is not built")
    params = [t.double().requires_grad_(True) for t in _params((2, 3, 2, 2), torch.float32, "contiguous", seed=8)]

    def both(*p):
        z, kl = ops.sample_and_kl(*p, seed=3, backend="cpu")
        return z, kl

    assert torch.autograd.gradcheck(both, tuple(params))
    assert torch.autograd.gradcheck(lambda *p: ops.gaussian_kl(*p, backend="cpu"), tuple(params))
    assert torch.autograd.gradcheck(
        lambda m, s: ops.sample_gaussian(m, s, temperature=0.7, seed=3, backend="cpu"), tuple(params[:2])
    )


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_sample_and_kl_saves_only_its_inputs(backend: str, fmt: str) -> None:
    params = [t.requires_grad_(True) for t in _params((4, 8, 6, 6), torch.float32, fmt, seed=9)]
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.sample_and_kl(*params, backend=backend)
    input_bytes = sum(t.numel() * t.element_size() for t in params)
    assert sum(saved) <= input_bytes + 64 * params[0].shape[0]
