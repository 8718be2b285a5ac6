"""The cpu backend on channels_last tensors: pixel quads draw one Philox call per group of four, same bits.

With W % 4 == 0 the four elements of a logical group (w = 4k..4k+3 at fixed n, c, h) lie C apart in the 4·C
consecutive elements of the pixels (n, h, 4k..4k+3), and the CPU kernels draw them with one call per channel;
other widths take the element path. Either way eps is the reference stream's function of (seed, logical index):
the kernels' output on a channels_last tensor equals, bit for bit, their output on the same values stored
contiguously (a different path: consecutive groups), and both are within rounding of the eager reference.
Shapes are chosen so that quads straddle the tiles (256 elements in sample_and_kl, 1024 in sample_gaussian:
C = 3, 100), exceed them (C = 100 in sample_and_kl, C = 513 in both: a heap window), and images span several
16384-element KL chunks.
"""

from __future__ import annotations

import pytest
import torch

from tests.op_cases import tolerance
from vdvae_fast import ops, philox, reference

if ops._EXTENSION is None:
    pytest.skip("the compiled extension is not built", allow_module_level=True)

CPU = torch.device("cpu")
SEED = 20260
# (B, C, H, W): W % 4 == 0 takes pixel quads, W = 6 and W = 10 the element path.
QUAD_SHAPES = [(2, 1, 3, 4), (3, 3, 5, 8), (2, 100, 3, 12), (2, 513, 1, 4), (2, 3, 67, 96)]
ELEMENT_SHAPES = [(2, 3, 5, 6), (2, 100, 2, 10)]
SHAPES = QUAD_SHAPES + ELEMENT_SHAPES


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, count: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen) * 0.5).to(dtype) for _ in range(count)]


def _channels_last(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.contiguous(memory_format=torch.channels_last) for t in tensors]


def _assert_same_bits(channels_last: torch.Tensor, contiguous: torch.Tensor) -> None:
    assert channels_last.is_contiguous(memory_format=torch.channels_last) or channels_last.dim() == 1
    assert torch.equal(channels_last, contiguous)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_eps_is_the_reference_stream_in_channels_last(shape: tuple[int, ...]) -> None:
    zeros = torch.zeros(shape).contiguous(memory_format=torch.channels_last)
    expected = philox.normal(SEED, torch.Size(shape), CPU)
    eps = ops.sample_gaussian(zeros, zeros, seed=SEED, backend="cpu")  # 0 + 1·e^0·eps
    eps_q, _ = ops.sample_and_kl(zeros, zeros, zeros, zeros, seed=SEED, backend="cpu")
    torch.testing.assert_close(eps, expected, rtol=1e-6, atol=1e-6)
    _assert_same_bits(eps_q, eps)
    _assert_same_bits(eps, ops.sample_gaussian(zeros.contiguous(), zeros.contiguous(), seed=SEED, backend="cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sample_gaussian_channels_last_forward_and_backward(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    mu, raw, grad_z = _inputs(shape, dtype, 3, seed=sum(shape))
    outputs = {}
    for name, tensors in (("contiguous", [mu, raw, grad_z]), ("channels_last", _channels_last([mu, raw, grad_z]))):
        m, r, g = (t.detach().requires_grad_(i < 2) for i, t in enumerate(tensors))
        z = ops.sample_gaussian(m, r, temperature=0.7, scale="softplus", seed=SEED, backend="cpu")
        z.backward(g)
        outputs[name] = (z.detach(), m.grad, r.grad)
    for value, contiguous in zip(outputs["channels_last"], outputs["contiguous"], strict=True):
        _assert_same_bits(value, contiguous)
    expected = reference.sample_gaussian(mu.float(), raw.float(), temperature=0.7, scale="softplus", seed=SEED)
    torch.testing.assert_close(outputs["channels_last"][0].float(), expected, **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sample_and_kl_channels_last_forward_and_backward(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    params = _inputs(shape, dtype, 5, seed=3 + sum(shape))
    grad_kl = torch.linspace(0.5, 1.5, shape[0])
    outputs = {}
    for name, tensors in (("contiguous", params), ("channels_last", _channels_last(params))):
        leaves = [t.detach().requires_grad_(True) for t in tensors[:4]]
        z, kl = ops.sample_and_kl(*leaves, posterior="residual", seed=SEED, backend="cpu")
        torch.autograd.backward((z, kl), (tensors[4], grad_kl))
        outputs[name] = (z.detach(), kl.detach(), *(t.grad for t in leaves))
    cl, contiguous = outputs["channels_last"], outputs["contiguous"]
    _assert_same_bits(cl[0], contiguous[0])
    for grad, expected in zip(cl[2:], contiguous[2:], strict=True):
        _assert_same_bits(grad, expected)
    # The per-image sums differ in order between layouts only.
    torch.testing.assert_close(cl[1], contiguous[1], rtol=1e-5, atol=1e-3)
    z, kl = reference.sample_and_kl(*(p.float() for p in params[:4]), posterior="residual", seed=SEED)
    torch.testing.assert_close(cl[0].float(), z, **tolerance(dtype))
    torch.testing.assert_close(cl[1], kl, rtol=1e-4, atol=1e-2 if dtype == torch.float32 else 0.5)


def test_channels_last_kl_does_not_depend_on_the_thread_count() -> None:
    """Images of several KL chunks (C = 3: chunks of whole 12-element quads) sum in a fixed order."""
    params = _channels_last(_inputs((2, 3, 67, 96), torch.float32, 4, seed=11))
    threads = torch.get_num_threads()
    try:
        sums = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            sums.append(ops.sample_and_kl(*params, seed=SEED, backend="cpu")[1])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(sums[0], sums[1]) and torch.equal(sums[0], sums[2])
