"""The DMoL scale options of Efficient-VDVAE in every backend: softplus scales (gradient smoothing) and the
log-scale floor (log_scale_min, -inf for none), in dmol_nll (values, fused gradients) and dmol_sample.

Oracles: the eager reference in float64 (and its gradcheck), a one-mixture case computed by hand, the
reference's sample with the same seed and the logistic's known spread; the defaults stay VDVAE's, bit for bit.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch

from tests.op_cases import (
    DEVICE,
    FUSED_BACKENDS,
    INTERPRETED,
    assert_as_accurate_as_reference,
    grad_tolerance,
    random_targets,
    tolerance,
)
from vdvae_fast import ops, reference
from vdvae_fast.hparams import FIELDS, Hyperparams, parse_args, preset, validate
from vdvae_fast.model import DmolNet

ROOT = Path(__file__).resolve().parents[1]
INF = float("inf")
# (scale, beta, log_scale_min): each option alone and together, floors that bind and floors that do not
OPTIONS = [
    ("exp", reference.SOFTPLUS_BETA, -INF),
    ("exp", reference.SOFTPLUS_BETA, -1.5),
    ("softplus", reference.SOFTPLUS_BETA, reference.LOG_SCALE_MIN),
    ("softplus", 0.4, -INF),
    ("softplus", 2.0, -2.0),
]
OPTION_IDS = [f"{scale}-beta{beta:.2g}-min{floor:g}" for scale, beta, floor in OPTIONS]
# (batch, height, width, mixtures, dtype, layout, bits)
CASES = [
    (2, 5, 7, 3, torch.float32, "contiguous", 8),
    (2, 5, 7, 3, torch.float32, "channels_last", 5),
    (1, 4, 6, 10, torch.float32, "channels_last", 8),
    (2, 5, 7, 3, torch.bfloat16, "contiguous", 5),
    (1, 4, 6, 10, torch.bfloat16, "channels_last", 8),
]
INTERPRETED_CASES = [CASES[1], CASES[3]]


def _kw(options: tuple[str, float, float]) -> dict:
    scale, beta, log_scale_min = options
    return {"scale": scale, "beta": beta, "log_scale_min": log_scale_min}


def _inputs(batch, height, width, num_mix, dtype, layout, bits, seed=0, spread=6.0):
    """Logits whose raw log-scales spread uniformly over [-spread, spread]: both sides of softplus' bend."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, 10 * num_mix, height, width, generator=gen)
    logits[:, num_mix:] *= 0.5
    for c in range(3):
        block = num_mix + 3 * num_mix * c
        raw = torch.rand(batch, num_mix, height, width, generator=gen) * (2 * spread) - spread
        logits[:, block + num_mix : block + 2 * num_mix] = raw
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = random_targets(batch, height, width, bits, gen)
    return logits.to(DEVICE, dtype).contiguous(memory_format=fmt), x.to(DEVICE).contiguous(memory_format=fmt)


# Where a bin lies several scales out in a logistic's tail, sigma(plus_in) - sigma(min_in) cancels in float32, and
# the Triton kernel's gradient (sigmoid' from exp(-|v|), where the reference and the C++ kernels form it from the
# rounded sigmoids, whose rounding then cancels) misses the 8x float64 oracle with VDVAE's default scales as well:
# on the float32 channels_last 5-bit case below with raw log-scales in [-3, 3], its gradient is 18.5x further from
# float64 than the reference's. Its parity runs where that bin math is accurate (3 standard deviations of
# test_dmol_nll's raw log-scales); test_triton_options_add_no_error_to_its_bin_math covers the rest of the range.
TRITON_SPREAD = 1.5


def _value_and_grad(logits, x, bits, backend, upstream, options):
    leaf = logits.detach().requires_grad_(True)
    nll = ops.dmol_nll(leaf, x, num_bits=bits, backend=backend, **_kw(options))
    (nll * upstream).sum().backward()
    return nll.detach(), leaf.grad


def _parity_params() -> list:
    params = []
    for backend in FUSED_BACKENDS:
        cases = INTERPRETED_CASES if (backend == "triton" and INTERPRETED) else CASES
        params += [pytest.param(backend, case, id=f"{backend}-{case}") for case in cases]
    return params or [pytest.param("none", None, marks=pytest.mark.skip(reason="no fused backend built"))]


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("backend,case", _parity_params())
def test_fused_values_and_gradients_match_the_reference(backend: str, case: tuple, options: tuple) -> None:
    """float32: no further from the float64 reference than the float32 reference is (test_dmol_nll's oracle);
    bfloat16 input: the reference's tolerances for that dtype. Gradients keep the logits' dtype and strides."""
    batch, height, width, num_mix, dtype, layout, bits = case
    logits, x = _inputs(*case, spread=TRITON_SPREAD if backend == "triton" else 6.0)
    upstream = torch.rand(batch, device=DEVICE) + 0.5
    nll, grad = _value_and_grad(logits, x, bits, backend, upstream, options)
    ref_nll, ref_grad = _value_and_grad(logits, x, bits, "reference", upstream, options)
    assert nll.dtype == torch.float32 and grad.dtype == dtype and grad.stride() == logits.stride()
    torch.testing.assert_close(nll, ref_nll, **tolerance(torch.float32))
    if dtype == torch.float32:
        truth = _value_and_grad(
            logits.double().cpu(), x.double().cpu(), bits, "reference", upstream.double().cpu(), options
        )
        assert_as_accurate_as_reference(nll, ref_nll, truth[0], "nll")
        assert_as_accurate_as_reference(grad, ref_grad, truth[1], "grad")
    else:
        torch.testing.assert_close(grad.float(), ref_grad.float(), **grad_tolerance(dtype, ref_grad.float()))


@pytest.mark.parametrize("options", OPTIONS[2:4], ids=OPTION_IDS[2:4])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_float64_gradients_pass_gradcheck(backend: str, options: tuple) -> None:
    if backend not in ops.available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    gen = torch.Generator().manual_seed(11)
    logits = (torch.randn(2, 20, 3, 2, dtype=torch.float64, generator=gen) * 2).requires_grad_(True)
    x = random_targets(2, 3, 2, 8, gen).double()
    assert torch.autograd.gradcheck(lambda t: ops.dmol_nll(t, x, backend=backend, **_kw(options)), (logits,))


def test_log_scales_of_softplus_are_stable_far_below_the_bend() -> None:
    """log softplus_beta(raw) by hand in float64, including raw values whose softplus underflows float32
    (Efficient-VDVAE's max(softplus, exp(-250)) would give log 0 there); the floor is a max in the log domain."""

    def log_softplus(t: float) -> float:  # float64 math where it neither underflows nor overflows, else its limit
        if t < -700:
            return t
        return math.log(math.log1p(math.exp(t))) if t < 700 else math.log(t)

    raw = torch.tensor([-1e4, -300.0, -40.0, -25.0, -1.0, 0.0, 1.0, 30.0, 1e4], dtype=torch.float64)
    beta = 0.5
    by_hand = [log_softplus(beta * r) - math.log(beta) for r in raw.tolist()]
    unfloored = reference.dmol_log_scales(raw, scale="softplus", beta=beta, log_scale_min=-INF)
    torch.testing.assert_close(unfloored, torch.tensor(by_hand, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert reference.dmol_log_scales(torch.tensor([0.0]), scale="softplus").item() == pytest.approx(0.0, abs=1e-7)
    floored = reference.dmol_log_scales(raw.float(), scale="softplus", beta=beta, log_scale_min=-250.0)
    torch.testing.assert_close(floored, torch.tensor(by_hand).clamp_min(-250.0))
    assert torch.isfinite(floored).all()


def _one_mixture_closed_form(means, raws, x, scale, beta, log_scale_min):
    """-log p(x) / 3 of one logistic per colour, no coupling, in float64 by hand: each bin's probability is a
    difference of two sigmoids (the first bin's lower end is -inf); differentiable in the raw log-scales."""
    half = 1.0 / 255
    terms = []
    for mean, raw, value in zip(means, raws, x, strict=True):
        if scale == "softplus":
            s = torch.log1p(torch.exp(beta * raw)) / beta
        else:
            s = torch.exp(raw)
        s = torch.clamp_min(s, math.exp(log_scale_min))

        def sigmoid(v):
            return 1.0 / (1.0 + torch.exp(-v))

        upper = sigmoid((value + half - mean) / s)
        lower = 0.0 if value == -1.0 else sigmoid((value - half - mean) / s)
        terms.append(torch.log(upper - lower))
    return -sum(terms) / 3


@pytest.mark.parametrize(
    "scale,beta,log_scale_min",
    [("softplus", reference.SOFTPLUS_BETA, -7.0), ("softplus", 0.4, -3.0), ("exp", 1.0, -3.0)],
)
def test_one_mixture_matches_the_closed_form(scale: str, beta: float, log_scale_min: float) -> None:
    """Colour 0 on the first bin, 1 inside, 2 with a raw log-scale far below the floor (the floor binds)."""
    means, raws = [0.05, -0.1, 0.3], [-2.0, 0.7, -30.0]
    x = [-1.0, 10 / 127.5 - 1.0 + 0.9, 0.3 + 0.0005]
    raw_leaves = [torch.tensor(r, dtype=torch.float64, requires_grad=True) for r in raws]
    expected = _one_mixture_closed_form(means, raw_leaves, x, scale, beta, log_scale_min)
    expected.backward()
    logits = torch.zeros(1, 10, 1, 1)
    for c in range(3):
        logits[0, 1 + 3 * c], logits[0, 2 + 3 * c] = means[c], raws[c]
    targets = torch.tensor(x).reshape(1, 3, 1, 1).to(DEVICE)
    for backend in ["reference", *FUSED_BACKENDS]:
        leaf = logits.to(DEVICE).clone().requires_grad_(True)
        nll = ops.dmol_nll(leaf, targets, scale=scale, beta=beta, log_scale_min=log_scale_min, backend=backend)
        nll.sum().backward()
        assert nll.item() == pytest.approx(expected.item(), rel=1e-5), backend
        for c in range(3):
            grad = leaf.grad[0, 2 + 3 * c].item()
            assert grad == pytest.approx(raw_leaves[c].grad.item(), rel=1e-4, abs=1e-6), (backend, c)


@pytest.mark.parametrize("options", OPTIONS[2:], ids=OPTION_IDS[2:])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sample_matches_the_reference_with_the_same_seed(backend: str, options: tuple, layout: str) -> None:
    side = 4 if (backend == "triton" and INTERPRETED) else 12
    logits, _ = _inputs(2, side, side + 1, 5, torch.float32, layout, 8, seed=3)
    logits[:, 5:] *= 0.4  # raw log-scales in [-3.6, 3.6]: samples mostly inside [-1, 1]
    expected = ops.dmol_sample(logits, seed=99, backend="reference", **_kw(options))
    image = ops.dmol_sample(logits, seed=99, backend=backend, **_kw(options))
    assert image.shape == expected.shape and image.dtype == torch.float32
    assert reference.memory_format_of(image) == reference.memory_format_of(logits)
    # Same integer draws: the mixture choice and the logistic noise agree; a Gumbel near-tie may flip in rounding.
    assert ((image - expected).abs() <= 1e-4).float().mean() >= 0.995
    bf16 = ops.dmol_sample(logits.bfloat16(), seed=99, backend=backend, **_kw(options))
    from_bf16 = ops.dmol_sample(logits.bfloat16().float(), seed=99, backend="reference", **_kw(options))
    assert ((bf16 - from_bf16).abs() <= 1e-4).float().mean() >= 0.995


@pytest.mark.parametrize(
    "raw,options,scale",
    [
        (-6.0, ("softplus", reference.SOFTPLUS_BETA, -7.0), math.log1p(math.exp(-6.0 * math.log(2))) / math.log(2)),
        (-30.0, ("softplus", 0.5, -3.0), math.exp(-3.0)),  # the floor binds under softplus
        (-30.0, ("exp", 0.5, -3.0), math.exp(-3.0)),
    ],
)
def test_samples_spread_as_the_logistic_of_the_chosen_scale(raw: float, options: tuple, scale: float) -> None:
    side = 64
    logits = torch.zeros(1, 30, side, side)
    logits[:, 2] = 50.0  # mixture 2 always wins
    for c, mean in enumerate([0.3, -0.2, 0.1]):
        logits[:, 3 + 9 * c + 2] = mean
        logits[:, 3 + 9 * c + 3 + 2] = raw
    for backend in ["reference", *FUSED_BACKENDS]:
        n = 8 if (backend == "triton" and INTERPRETED) else side
        image = ops.dmol_sample(logits[..., :n, :n].to(DEVICE), seed=8, backend=backend, **_kw(options)).double()
        # logistic std = s·π/√3; the mean within 5 standard errors
        assert abs(image[0, 0].mean().item() - 0.3) < 5.0 * scale * 1.8138 / n, backend
        assert image[0, 0].std().item() == pytest.approx(scale * 1.8138, rel=0.35 if n == 8 else 0.06), backend


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
def test_defaults_are_vdvae_bit_for_bit(backend: str) -> None:
    """The defaults are exp scales floored at -7; beta is unused by them; a floor of -inf changes only the
    log-scales below -7; softplus scales change the loss."""
    logits, x = _inputs(2, 4, 5, 3, torch.float32, "contiguous", 8)
    upstream = torch.ones(2, device=DEVICE)
    leaf = logits.detach().requires_grad_(True)
    nll = ops.dmol_nll(leaf, x, backend=backend)
    nll.sum().backward()
    for options in [("exp", 0.3, -7.0), ("exp", reference.SOFTPLUS_BETA, -7.0)]:
        again, grad = _value_and_grad(logits, x, 8, backend, upstream, options)
        assert torch.equal(again, nll) and torch.equal(grad, leaf.grad)
    above = logits.clone()
    above[:, 3:] = above[:, 3:].clamp_min(-6.5)
    no_floor = _value_and_grad(above, x, 8, backend, upstream, ("exp", 1.0, -INF))
    assert all(map(torch.equal, no_floor, _value_and_grad(above, x, 8, backend, upstream, ("exp", 1.0, -7.0))))
    softplus = _value_and_grad(logits, x, 8, backend, upstream, ("softplus", reference.SOFTPLUS_BETA, -7.0))
    assert not torch.equal(softplus[0], nll)
    image = ops.dmol_sample(logits, seed=5, backend=backend)
    assert torch.equal(
        image, ops.dmol_sample(logits, seed=5, backend=backend, scale="exp", beta=2.0, log_scale_min=-7.0)
    )


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"scale": "log"}, ValueError, "scale must be one of"),
        ({"scale": None}, ValueError, "scale must be one of"),
        ({"beta": 0.0}, ValueError, "beta"),
        ({"beta": -1.0}, ValueError, "beta"),
        ({"beta": INF}, ValueError, "beta"),
        ({"beta": float("nan")}, ValueError, "beta"),
        ({"beta": True}, TypeError, "beta"),
        ({"beta": torch.tensor(1.0)}, TypeError, "beta"),
        ({"log_scale_min": float("nan")}, ValueError, "log_scale_min"),
        ({"log_scale_min": 0.5}, ValueError, "log_scale_min"),
        ({"log_scale_min": INF}, ValueError, "log_scale_min"),
        ({"log_scale_min": "-7"}, TypeError, "log_scale_min"),
    ],
)
def test_bad_options_are_refused_with_a_message_naming_them(kwargs: dict, error: type, message: str) -> None:
    logits, x = torch.zeros(1, 10, 2, 2), torch.zeros(1, 3, 2, 2)
    with pytest.raises(error, match=message):
        ops.dmol_nll(logits, x, backend="reference", **kwargs)
    with pytest.raises(error, match=message):
        ops.dmol_sample(logits, seed=0, backend="reference", **kwargs)


def test_kernels_refuse_bad_options_when_called_directly() -> None:
    if "cpu" not in FUSED_BACKENDS:
        pytest.skip("the C++ extension is not built")
    logits, x = torch.zeros(1, 10, 2, 2), torch.zeros(1, 3, 2, 2)
    kernels = torch.ops.vdvae_fast_C
    for scale, beta, floor, message in [
        (2, 1.0, -7.0, "scale"),
        (1, 0.0, -7.0, "beta"),
        (0, 1.0, 1.0, "log_scale_min"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            kernels.dmol_nll_forward(logits, x, 8, scale, beta, floor)
        with pytest.raises(RuntimeError, match=message):
            kernels.dmol_sample(logits, scale, beta, floor, 0)


@pytest.mark.parametrize("mixtures", [3, 10])
def test_cuda_bodies_on_the_host_match_the_float64_reference(mixtures: int) -> None:
    """The CUDA kernels' per-pixel functions (dmol_math.h), run on the host, with softplus scales."""
    if "cpu" not in FUSED_BACKENDS:
        pytest.skip("the C++ extension is not built")
    options = ("softplus", 0.4, -5.0)
    scale_args = (reference.SCALES.index(options[0]), options[1], options[2])
    logits, x = _inputs(2, 4, 5, mixtures, torch.float32, "contiguous", 8, seed=mixtures)
    upstream = torch.tensor([0.7, 1.3])
    ref = _value_and_grad(logits, x, 8, "reference", upstream, options)
    truth = _value_and_grad(logits.double(), x.double(), 8, "reference", upstream.double(), options)
    bodies = torch.ops.vdvae_fast_C
    nll = bodies.dmol_nll_forward_cuda_body_on_host(logits, x, 8, *scale_args)
    grad = bodies.dmol_nll_backward_cuda_body_on_host(upstream, logits, x, 8, *scale_args)
    assert_as_accurate_as_reference(nll, ref[0], truth[0], "nll")
    assert_as_accurate_as_reference(grad, ref[1], truth[1], "grad")
    image = bodies.dmol_sample_forward_cuda_body_on_host(logits, *scale_args, 77)
    expected = ops.dmol_sample(logits, seed=77, backend="reference", **_kw(options))
    assert ((image - expected).abs() <= 1e-4).float().mean() >= 0.995


def test_model_output_layer_reads_the_options_from_the_hyperparameters() -> None:
    H = preset("tiny")
    assert (H.dmol_gradient_smoothing, H.dmol_log_scale_min) == (False, -7.0)
    assert H.gradient_smoothing_beta == pytest.approx(math.log(2.0))
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = DmolNet(H)
    px_z = torch.randn(2, H.width, 4, 4, generator=gen)
    x = random_targets(2, 4, 4, 8, gen)
    default = net.nll(px_z, x, backend="reference")
    saved_before_the_options = Hyperparams({k: v for k, v in H.items() if not k.startswith(("dmol_", "gradient_sm"))})
    old = DmolNet(saved_before_the_options)
    old.load_state_dict(net.state_dict())
    assert torch.equal(old.nll(px_z, x, backend="reference"), default)
    H.update(dmol_gradient_smoothing=True, gradient_smoothing_beta=0.5, dmol_log_scale_min=-INF)
    smoothed = DmolNet(H)
    smoothed.load_state_dict(net.state_dict())
    expected = ops.dmol_nll(net(px_z), x, scale="softplus", beta=0.5, log_scale_min=-INF, backend="reference")
    assert torch.equal(smoothed.nll(px_z, x, backend="reference"), expected)
    assert not torch.equal(expected, default)
    torch.manual_seed(1)
    image = smoothed.sample(px_z, backend="reference")
    torch.manual_seed(1)
    drawn = ops.dmol_sample(net(px_z), scale="softplus", beta=0.5, log_scale_min=-INF, backend="reference")
    assert torch.equal(image, ((drawn + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8).permute(0, 2, 3, 1))


def test_hyperparameter_rows_follow_the_options() -> None:
    rows = list(FIELDS)
    at = rows.index("num_mixtures")
    assert rows[at + 1 : at + 3] == ["dmol_gradient_smoothing", "dmol_log_scale_min"]
    assert FIELDS["gradient_smoothing_beta"].default == 0.6931471805599453  # shared with the latent scales
    valid = FIELDS["dmol_log_scale_min"].valid
    assert all(v in valid for v in (-INF, -1000.0, -250.0, -7.0, 0.0))
    assert not any(v in valid for v in (-1001.0, 0.5, INF, float("nan")))
    H = parse_args(["--hps", "tiny", "--dmol_gradient_smoothing", "true", "--dmol_log_scale_min=-inf"])
    assert (H.dmol_gradient_smoothing, H.dmol_log_scale_min) == (True, -INF)
    validate(H)
    H.dmol_log_scale_min = 1.0
    with pytest.raises(ValueError, match="dmol_log_scale_min"):
        validate(H)


_SM90 = """
import json, sys
from benchmarks import triton_sass
triton_sass._install_compile_only_sm90()
import torch
from vdvae_fast import ops
rows = []
for dtype, fmt, num_mix, bits in [(torch.float32, torch.contiguous_format, 10, 8), (torch.bfloat16, torch.channels_last, 32, 5)]:
    triton_sass._LAUNCHES.clear()
    logits = torch.zeros(2, 10 * num_mix, 64, 64, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
    x = torch.zeros(2, 3, 64, 64).contiguous(memory_format=fmt)
    ops.dmol_nll(logits, x, num_bits=bits, scale="softplus", log_scale_min=-250.0, backend="triton").sum().backward()
    ops.dmol_sample(logits.detach(), scale="softplus", backend="triton")
    kernels = [triton_sass.describe(name, kernel, kwargs) for name, kernel, kwargs in triton_sass._LAUNCHES]
    rows.append({"label": f"softplus {dtype} M={num_mix}", "error": "", "kernels": kernels})
print(json.dumps(rows))
"""


def test_softplus_triton_kernels_compile_for_sm90_within_registers() -> None:
    """The softplus variants of the three Triton kernels, compiled for sm_90 as tests/test_triton_compile.py
    compiles the default ones: within 128 registers, no spills."""
    from benchmarks import triton_sass

    missing = triton_sass.ptxas_missing()
    if missing is not None:
        pytest.skip(f"cannot compile Triton for sm_90: {missing}")
    for row in triton_sass.run_compile_script(textwrap.dedent(_SM90), str(ROOT)):
        names = {k["kernel"] for k in row["kernels"]}
        assert names == {"_dmol_nll_forward_kernel", "_dmol_nll_backward_kernel", "_dmol_sample_kernel"}, row
        assert triton_sass.problems(row) == [], row


def _log_scale_channels(num_mix: int) -> list[int]:
    return [num_mix + 3 * num_mix * c + num_mix + k for c in range(3) for k in range(num_mix)]


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_triton_options_add_no_error_to_its_bin_math(options: tuple) -> None:
    """Raw log-scales over [-9, 9] (the floors bind, softplus runs deep into its linear part) through the Triton
    kernel with the options, against the same kernel with exp scales on the float64 log-scales: the values, and
    the gradients after the chain rule through d log-scale / d raw (float64 autograd of the reference)."""
    if "triton" not in FUSED_BACKENDS:
        pytest.skip("triton cannot run here")
    num_mix = 3
    logits, x = _inputs(2, 4, 5, num_mix, torch.float32, "channels_last", 8, spread=9.0)
    channels = _log_scale_channels(num_mix)
    raw = logits[:, channels].double().requires_grad_(True)
    log_scales = reference.dmol_log_scales(raw, **{k: v for k, v in _kw(options).items()})
    (slope,) = torch.autograd.grad(log_scales.sum(), raw)
    equivalent = logits.clone()
    equivalent[:, channels] = log_scales.detach().float()
    upstream = torch.ones(2, device=DEVICE)
    nll, grad = _value_and_grad(logits, x, 8, "triton", upstream, options)
    exp_nll, exp_grad = _value_and_grad(equivalent, x, 8, "triton", upstream, ("exp", 1.0, -INF))
    exp_grad[:, channels] *= slope.float()
    torch.testing.assert_close(nll, exp_nll, **tolerance(torch.float32))
    torch.testing.assert_close(grad, exp_grad, **grad_tolerance(torch.float32, exp_grad))
