"""Eager calls of the fused ops run the kernels through an autograd.Function instead of the torch.library op (whose
Python dispatch costs more than a small layer's kernels): the same outputs and gradients bit for bit. torch.compile
still traces the library ops (tests/test_ops_api.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.op_cases import DEVICE, FUSED_BACKENDS
from vdvae_fast import ops

SHAPE = (2, 3, 4, 8)


def _params(fmt: torch.memory_format) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [
        (torch.randn(SHAPE, generator=gen) * 0.5).contiguous(memory_format=fmt).to(DEVICE).requires_grad_()
        for _ in range(4)
    ]


def _dmol_inputs(fmt: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 30, 4, 8, generator=gen) * 0.5).contiguous(memory_format=fmt)
    x = (torch.randint(0, 256, (2, 3, 4, 8), generator=gen) / 127.5 - 1).contiguous(memory_format=fmt)
    return logits.to(DEVICE).requires_grad_(), x.to(DEVICE)


def _library(name: str, backend: str) -> Callable:
    return getattr(torch.ops.vdvae_fast, f"{name}_triton" if backend == "triton" else name).default


LN2 = 0.6931471805599453  # softplus beta, the default
# The calls below pass non-default options, so that each argument's position is exercised. Each returns the
# outputs and the tensors that get gradients, through the public function or (library=True) the library op.


def _dmol_nll(backend: str, fmt: torch.memory_format, library: bool) -> tuple[tuple, list]:
    logits, x = _dmol_inputs(fmt)
    if library:
        return (_library("dmol_nll_forward", backend)(logits, x, 8, 1, LN2, -7.0),), [logits]
    return (ops.dmol_nll(logits, x, scale="softplus", backend=backend),), [logits]


def _gaussian_kl(backend: str, fmt: torch.memory_format, library: bool) -> tuple[tuple, list]:
    params = _params(fmt)
    if library:
        return (_library("gaussian_kl_forward", backend)(*params, 0, LN2, 1),), params
    return (ops.gaussian_kl(*params, posterior="residual", backend=backend),), params


def _sample_and_kl(backend: str, fmt: torch.memory_format, library: bool) -> tuple[tuple, list]:
    params = _params(fmt)
    if library:
        return _library("sample_and_kl_forward", backend)(*params, torch.tensor(11), 0, LN2, 0, 1), params
    return ops.sample_and_kl(*params, kl_estimator="sampled", seed=11, backend=backend), params


def _sample_gaussian(backend: str, fmt: torch.memory_format, library: bool) -> tuple[tuple, list]:
    mu, logsigma = _params(fmt)[:2]
    if library:
        return (_library("sample_gaussian_forward", backend)(mu, logsigma, 0.7, torch.tensor(11), 0, LN2),), [
            mu,
            logsigma,
        ]
    return (ops.sample_gaussian(mu, logsigma, temperature=0.7, seed=11, backend=backend),), [mu, logsigma]


CALLS = {f.__name__[1:]: f for f in (_dmol_nll, _gaussian_kl, _sample_and_kl, _sample_gaussian)}


def _outputs_and_grads(outputs: tuple, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    upstream = [torch.linspace(-1, 1, o.numel(), device=o.device).reshape(o.shape).to(o.dtype) for o in outputs]
    return [o.detach() for o in outputs] + list(torch.autograd.grad(outputs, leaves, upstream))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("op", sorted(CALLS))
@pytest.mark.parametrize("backend", FUSED_BACKENDS or ["none"])
def test_eager_calls_match_the_library_op_bit_for_bit(backend: str, op: str, fmt: torch.memory_format) -> None:
    if backend == "none":
        pytest.skip("no fused backend built")
    outputs, leaves = CALLS[op](backend, fmt, library=False)
    assert type(outputs[0].grad_fn).__name__ == f"{op}_forwardBackward"  # the eager function, not the library op
    expected_outputs, expected_leaves = CALLS[op](backend, fmt, library=True)
    assert type(expected_outputs[0].grad_fn).__name__ != f"{op}_forwardBackward"
    got, expected = _outputs_and_grads(outputs, leaves), _outputs_and_grads(expected_outputs, expected_leaves)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.stride() == e.stride()
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_an_op_without_backward_runs_its_launch_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    """dmol_sample has no gradient: an eager call is the launch itself, with no autograd node."""
    if "cpu" not in FUSED_BACKENDS:
        pytest.skip("the extension is not built")
    calls = []
    launch = ops._DMOL_SAMPLE.launch["extension"]
    monkeypatch.setitem(ops._DMOL_SAMPLE.launch, "extension", lambda *args: calls.append(args) or launch(*args))
    logits, _ = _dmol_inputs(torch.contiguous_format)
    image = ops.dmol_sample(logits.detach().cpu(), seed=3, backend="cpu")
    assert len(calls) == 1 and image.grad_fn is None
    torch.testing.assert_close(
        image,
        torch.ops.vdvae_fast.dmol_sample(logits.detach().cpu(), 0, LN2, -7.0, torch.tensor(3)),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("op", sorted(CALLS))
@pytest.mark.parametrize("backend", FUSED_BACKENDS or ["none"])
def test_a_double_backward_raises_instead_of_detaching(backend: str, op: str) -> None:
    """The backward kernels have no derivative: differentiating the gradients again must fail loudly, not give a
    gradient that silently misses the second-order terms."""
    if backend == "none":
        pytest.skip("no fused backend built")
    outputs, leaves = CALLS[op](backend, torch.contiguous_format, library=False)
    grads = torch.autograd.grad(sum(o.sum() for o in outputs), leaves, create_graph=True)
    assert any(g.requires_grad for g in grads)  # (sample_gaussian's mu gradient is the constant upstream one)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(sum(g.sum() for g in grads), leaves, allow_unused=True)
