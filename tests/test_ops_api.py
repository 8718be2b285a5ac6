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


# Triton is left out: under the CPU interpreter its launchers cannot run on the fake tensors torch.compile traces
# with (tests/test_op_registration.py traces the Triton ops with real kernels instead).
@pytest.mark.parametrize("name", [*ops.EAGER_BACKENDS, *(b for b in FUSED_BACKENDS if b != "triton")])
def test_ops_trace_under_torch_compile_without_graph_breaks(name: str) -> None:
    logits = torch.randn(2, 30, 4, 4, device=DEVICE, requires_grad=True)
    x = torch.rand(2, 3, 4, 4, device=DEVICE) * 2 - 1
    params = [torch.randn(2, 4, 4, 4, device=DEVICE, requires_grad=True) for _ in range(4)]
    seeds = [None] * 3 if name == "original" else [5, 6, 7]

    def loss_fn(logits, x, mu_q, ls_q, mu_p, ls_p):
        z, kl = ops.sample_and_kl(mu_q, ls_q, mu_p, ls_p, seed=seeds[0], backend=name)
        prior = ops.sample_gaussian(mu_p, ls_p, temperature=0.5, seed=seeds[1], backend=name)
        elementwise = ops.gaussian_kl(mu_q, ls_q, mu_p, ls_p, backend=name)
        nll = ops.dmol_nll(logits, x, backend=name, check_inputs=False)
        image = ops.dmol_sample(logits, seed=seeds[2], backend=name)
        return nll.sum() + kl.sum() + z.square().sum() + prior.sum() + elementwise.mean(), image

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    compiled_loss, compiled_image = compiled(logits, x, *params)
    compiled_grads = torch.autograd.grad(compiled_loss, [logits, *params])
    if name == "original":  # torch's generator draws other numbers inside a compiled graph than eagerly
        assert compiled_image.shape == (2, 3, 4, 4) and all(torch.isfinite(g).all() for g in compiled_grads)
        return
    eager_loss, eager_image = loss_fn(logits, x, *params)
    eager_grads = torch.autograd.grad(eager_loss, [logits, *params])
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_image, eager_image)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)


def _gaussian_pair(shape=(2, 3, 4, 4)):
    return torch.zeros(shape), torch.zeros(shape)


@pytest.mark.parametrize("seed", [1.7, 1.0, True, "abc", float("nan"), torch.tensor([1, 2])])
def test_seeds_that_are_not_ints_are_rejected_naming_the_valid_range(seed) -> None:
    mu, logsigma = _gaussian_pair()
    with pytest.raises(TypeError, match=r"seed must be an int in \[0, 2\*\*62\)"):
        ops.sample_gaussian(mu, logsigma, seed=seed, backend="reference")
    with pytest.raises(TypeError, match=r"seed must be an int in \[0, 2\*\*62\)"):
        ops.dmol_sample(torch.zeros(1, 10, 2, 2), seed=seed, backend="reference")


@pytest.mark.parametrize("seed", [-1, 2**62, 2**63 - 1, 2**64])
def test_seeds_outside_the_philox_key_range_are_rejected(seed: int) -> None:
    mu, logsigma = _gaussian_pair()
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*62\)"):
        ops.sample_and_kl(mu, logsigma, mu, logsigma, seed=seed, backend="reference")


def test_integer_seeds_of_any_integral_type_reproduce_the_same_draw() -> None:
    np = pytest.importorskip("numpy")
    mu, logsigma = _gaussian_pair()
    largest = 2**62 - 1
    z = ops.sample_gaussian(mu, logsigma, seed=largest, backend="reference")
    assert torch.equal(ops.sample_gaussian(mu, logsigma, seed=np.int64(largest), backend="reference"), z)
    assert not torch.equal(ops.sample_gaussian(mu, logsigma, seed=1, backend="reference"), z)


@pytest.mark.parametrize(
    "temperature, error",
    [
        (float("inf"), ValueError),
        (float("nan"), ValueError),
        (-0.5, ValueError),
        ("0.5", TypeError),
        (None, TypeError),
        (True, TypeError),
        (torch.tensor([0.5, 0.5]), TypeError),
    ],
)
def test_sample_gaussian_rejects_temperatures_that_are_not_finite_non_negative_numbers(temperature, error) -> None:
    mu, logsigma = _gaussian_pair()
    with pytest.raises(error, match="temperature"):
        ops.sample_gaussian(mu, logsigma, temperature=temperature, seed=1)


def test_temperature_zero_and_integers_are_valid() -> None:
    mu, logsigma = torch.full((2, 8), 0.25), torch.zeros(2, 8)
    assert torch.equal(ops.sample_gaussian(mu, logsigma, temperature=0, seed=3), mu)
    one = ops.sample_gaussian(mu, logsigma, temperature=1, seed=3, backend="reference")
    assert torch.equal(one, ops.sample_gaussian(mu, logsigma, temperature=1.0, seed=3, backend="reference"))


@pytest.mark.parametrize("num_bits, error", [(8.0, TypeError), (True, TypeError), ("8", TypeError), (7, ValueError)])
def test_num_bits_must_be_the_int_5_or_8(num_bits, error) -> None:
    logits, x = _dmol_inputs()
    with pytest.raises(error, match=r"num_bits must be"):
        ops.dmol_nll(logits, x, num_bits=num_bits)


@pytest.mark.parametrize("height, width", [(0, 3), (3, 0), (0, 0)])
def test_dmol_nll_of_images_without_pixels_is_an_error_not_nan(height: int, width: int) -> None:
    logits, x = torch.zeros(2, 20, height, width), torch.zeros(2, 3, height, width)
    for backend in ops.available_backends("cpu"):
        with pytest.raises(ValueError, match=rf"at least one pixel.*H={height}, W={width}"):
            ops.dmol_nll(logits, x, backend=backend)


def test_dmol_nll_of_an_empty_batch_is_empty() -> None:
    for backend in ops.available_backends("cpu"):
        nll = ops.dmol_nll(torch.zeros(0, 20, 3, 3), torch.zeros(0, 3, 3, 3), backend=backend)
        assert nll.shape == (0,) and nll.dtype == torch.float32


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_dmol_sample_refuses_non_finite_logits_unless_checks_are_off(value: float) -> None:
    logits = torch.zeros(2, 20, 3, 3)
    logits[1, 7, 2, 0] = value
    for backend in ops.available_backends("cpu"):
        with pytest.raises(ValueError, match="logits has 1 non-finite values"):
            ops.dmol_sample(logits, seed=0 if backend != "original" else None, backend=backend)
    image = ops.dmol_sample(logits, seed=0, backend="reference", check_inputs=False)
    assert image.shape == (2, 3, 3, 3) and torch.isfinite(image[0]).all()


def test_meta_tensors_run_through_the_eager_formulas_for_shapes_and_flop_counts() -> None:
    """Meta tensors have shapes and no values: the eager backends compute the outputs' metadata (as a FLOP
    count of the model needs), the checks that read values are skipped, kernels are refused."""
    meta = {"device": "meta"}
    logits, x = torch.zeros(2, 20, 3, 3, **meta), torch.zeros(2, 3, 3, 3, **meta)
    gaussian = [torch.zeros(2, 4, 3, 3, **meta, dtype=torch.bfloat16) for _ in range(4)]
    assert ops.available_backends("meta") == list(ops.EAGER_BACKENDS)
    nll = ops.dmol_nll(logits, x)
    image = ops.dmol_sample(logits.contiguous(memory_format=torch.channels_last), seed=1)
    kl = ops.gaussian_kl(*gaussian)
    z, kl_sum = ops.sample_and_kl(*gaussian, seed=1)
    prior = ops.sample_gaussian(*gaussian[:2], backend="original")
    assert all(t.is_meta for t in (nll, image, kl, z, kl_sum, prior))
    assert (nll.shape, nll.dtype) == ((2,), torch.float32)
    assert image.shape == (2, 3, 3, 3) and ops.layout_of(image) == "channels_last"
    assert (kl.shape, kl.dtype, z.dtype, kl_sum.shape) == ((2, 4, 3, 3), torch.float32, torch.bfloat16, (2,))
    assert prior.shape == (2, 4, 3, 3)
    with pytest.raises(ValueError, match="backend 'cpu' cannot run on meta tensors here: meta tensors hold no"):
        ops.dmol_nll(logits, x, backend="cpu")


@pytest.mark.parametrize("backend", [*ops.EAGER_BACKENDS, *FUSED_BACKENDS])
def test_sample_and_kl_of_an_empty_batch_gives_empty_results(backend: str) -> None:
    params = [torch.zeros(0, 3, 4, 4, device=DEVICE, requires_grad=True) for _ in range(4)]
    seed = None if backend == "original" else 5
    z, kl = ops.sample_and_kl(*params, seed=seed, backend=backend)
    assert z.shape == (0, 3, 4, 4) and kl.shape == (0,) and kl.dtype == torch.float32
    grads = torch.autograd.grad(z.sum() + kl.sum(), params)
    assert all(g.shape == p.shape for g, p in zip(grads, params, strict=True))


def test_only_ops_that_draw_noise_are_limited_to_2_32_elements(monkeypatch: pytest.MonkeyPatch) -> None:
    huge = torch.zeros(1).expand(2**32)  # 2**32 elements in 4 bytes: the checks run, no kernel does
    with pytest.raises(ValueError, match="exceed the 2\\*\\*32 counters"):
        ops.sample_gaussian(huge, huge, seed=1, backend="reference")
    with pytest.raises(ValueError, match="exceed the 2\\*\\*32 counters"):
        ops.sample_and_kl(huge, huge, huge, huge, seed=1, backend="reference")
    reached = []
    monkeypatch.setattr(
        ops.reference, "gaussian_kl", lambda *params, **parametrization: reached.append(params[0].numel())
    )
    ops.gaussian_kl(huge, huge, huge, huge, backend="reference")
    assert reached == [2**32]


def test_eager_dmol_nll_gives_the_targets_no_gradient() -> None:
    logits, x = _dmol_inputs()
    x.requires_grad_(True)
    for backend in ops.available_backends("cpu"):
        assert not ops.dmol_nll(logits, x, backend=backend).requires_grad, backend


def test_no_backend_is_listed_for_cuda_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ops.available_backends("cuda") == []
    with pytest.raises(ValueError, match=r"no CUDA GPU is usable"):
        ops.resolve_backend("auto", "cuda")
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run on cuda tensors here: no CUDA GPU"):
        ops.resolve_backend("triton", "cuda")


def _pretend_cuda(monkeypatch: pytest.MonkeyPatch, cuda_built: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ops, "cuda_kernels_built", lambda: cuda_built)
    monkeypatch.setattr(ops, "_TRITON_FOUND", True)


def test_auto_on_cuda_follows_the_table_by_op_layout_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend_cuda(monkeypatch, cuda_built=True)
    monkeypatch.setitem(ops.AUTO_TABLE, ("dmol_nll", "channels_last", "bfloat16"), "triton")
    monkeypatch.setitem(ops.AUTO_TABLE, ("dmol_nll", "contiguous", "bfloat16"), "cuda")
    pick = ops.resolve_backend
    assert pick("auto", "cuda", torch.bfloat16, op="dmol_nll", layout="channels_last") == "triton"
    assert pick("auto", "cuda", torch.bfloat16, op="dmol_nll", layout="contiguous") == "cuda"
    assert pick("auto", "cuda", torch.float64, op="dmol_nll", layout="channels_last") == "reference"
    _pretend_cuda(monkeypatch, cuda_built=False)  # the table names a backend that is not built: the other one
    assert pick("auto", "cuda", torch.bfloat16, op="dmol_nll", layout="contiguous") == "triton"


def test_the_auto_table_names_a_compiled_backend_for_every_case() -> None:
    table = ops.auto_table()
    ops_with_kernels = {"dmol_nll", "dmol_sample", "gaussian_kl", "sample_and_kl", "sample_gaussian"}
    expected = {
        (op, layout, dtype)
        for op in ops_with_kernels
        for layout in ("contiguous", "channels_last")
        for dtype in ("float32", "bfloat16", "float16")
    }
    assert set(table) == expected
    assert set(table.values()) <= {"cuda", "triton"}
    table[("dmol_nll", "contiguous", "float32")] = "changed"
    assert ops.auto_table()[("dmol_nll", "contiguous", "float32")] != "changed"  # a copy


def test_layout_names_follow_the_one_channels_last_test() -> None:
    assert ops.layout_of(torch.zeros(2, 3, 4, 5)) == "contiguous"
    assert ops.layout_of(torch.zeros(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)) == "channels_last"
    assert ops.layout_of(torch.zeros(2, 3, 1, 1).contiguous(memory_format=torch.channels_last)) == "contiguous"
