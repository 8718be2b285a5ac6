"""The public API's contract: backend selection, bad input errors, torch.compile tracing."""

from __future__ import annotations

import pytest
import torch

from tests.op_cases import DEVICE, FUSED_BACKENDS
from vdvae_fast import ops


def _dmol_inputs(num_mix: int = 2, batch: int = 2, side: int = 3):
    return torch.randn(batch, 10 * num_mix, side, side), torch.zeros(batch, 3, side, side)


@pytest.mark.parametrize(
    "logits_shape, x_shape, message",
    [
        ((2, 25, 3, 3), (2, 3, 3, 3), "25 channels"),
        ((2, 330, 3, 3), (2, 3, 3, 3), "1 <= M <= 32"),
        ((2, 20, 3, 3), (2, 3, 4, 3), "to match logits"),
        ((2, 20, 3, 3), (1, 3, 3, 3), "to match logits"),
        ((2, 20, 3), (2, 3, 3, 3), "(B, 10*M, H, W)"),
    ],
)
def test_dmol_nll_rejects_bad_shapes_with_a_message_naming_them(logits_shape, x_shape, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        ops.dmol_nll(torch.randn(logits_shape), torch.zeros(x_shape))


def test_dmol_nll_rejects_integer_tensors() -> None:
    logits, x = _dmol_inputs()
    with pytest.raises(TypeError, match="x must be float"):
        ops.dmol_nll(logits, x.to(torch.uint8))
    with pytest.raises(TypeError, match="logits must be float"):
        ops.dmol_nll(logits.to(torch.int32), x)


def test_dmol_nll_rejects_tensors_on_different_devices() -> None:
    logits, x = _dmol_inputs()
    with pytest.raises(ValueError, match="one device"):
        ops.dmol_nll(logits, x.to("meta"))


def test_dmol_nll_rejects_unsupported_num_bits_and_backends() -> None:
    logits, x = _dmol_inputs()
    with pytest.raises(ValueError, match="num_bits"):
        ops.dmol_nll(logits, x, num_bits=7)
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        ops.dmol_nll(logits, x, backend="fastest")
    with pytest.raises(ValueError, match="cuda backend takes CUDA tensors"):
        ops.dmol_nll(logits, x, backend="cuda")


def test_targets_outside_the_unit_interval_are_rejected_unless_checks_are_off() -> None:
    logits, x = _dmol_inputs()
    x[0, 0, 0, 0] = 2.0  # an uint8 image that was not rescaled
    with pytest.raises(ValueError, match=r"x must lie in \[-1, 1\]"):
        ops.dmol_nll(logits, x)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x must lie in \[-1, 1\]"):
        ops.dmol_nll(logits, x)
    x[0, 0, 0, 0] = 0.0
    assert torch.isfinite(ops.dmol_nll(logits, x, check_inputs=False)).all()


def test_gaussian_ops_reject_mismatched_parameters() -> None:
    a, b = torch.zeros(2, 3), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="share one shape"):
        ops.sample_and_kl(a, a, a, b)
    with pytest.raises(TypeError, match="share one dtype"):
        ops.gaussian_kl(a, a, a, a.double())
    with pytest.raises(TypeError, match="logsigma must be float"):
        ops.sample_gaussian(a, a.long())
    with pytest.raises(ValueError, match="temperature"):
        ops.sample_gaussian(a, a, temperature=-1.0)
    with pytest.raises(ValueError, match="seed"):
        ops.sample_gaussian(a, a, seed=-3)


def test_env_var_overrides_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VDVAE_FAST_BACKEND", "reference")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("VDVAE_FAST_BACKEND", "quick")
    with pytest.raises(ValueError, match="VDVAE_FAST_BACKEND='quick'"):
        ops.resolve_backend("auto", torch.device("cpu"))
    monkeypatch.delenv("VDVAE_FAST_BACKEND")
    assert ops.resolve_backend("auto", torch.device("cpu")) == ops.available_backends("cpu")[0]


def test_auto_prefers_a_compiled_backend_when_built() -> None:
    expected = "cpu" if ops.extension_built() else "reference"
    assert ops.available_backends("cpu")[0] == expected


@pytest.mark.parametrize("name", [b for b in FUSED_BACKENDS if b != "triton"] or ["reference"])
def test_ops_trace_under_torch_compile_without_graph_breaks(name: str) -> None:
    logits = torch.randn(2, 30, 4, 4, device=DEVICE, requires_grad=True)
    x = torch.rand(2, 3, 4, 4, device=DEVICE) * 2 - 1
    params = [torch.randn(2, 4, 4, 4, device=DEVICE, requires_grad=True) for _ in range(4)]

    def loss_fn(logits, x, mu_q, ls_q, mu_p, ls_p):
        z, kl = ops.sample_and_kl(mu_q, ls_q, mu_p, ls_p, seed=5, backend=name)
        prior = ops.sample_gaussian(mu_p, ls_p, temperature=0.5, seed=6, backend=name)
        elementwise = ops.gaussian_kl(mu_q, ls_q, mu_p, ls_p, backend=name)
        nll = ops.dmol_nll(logits, x, backend=name, check_inputs=False)
        return nll.sum() + kl.sum() + z.square().sum() + prior.sum() + elementwise.mean()

    if name == "reference":
        pytest.skip("no compiled backend built: the custom ops are not exercised")
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    eager_loss = loss_fn(logits, x, *params)
    eager_grads = torch.autograd.grad(eager_loss, [logits, *params])
    compiled_loss = compiled(logits, x, *params)
    compiled_grads = torch.autograd.grad(compiled_loss, [logits, *params])
    torch.testing.assert_close(compiled_loss, eager_loss)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)
