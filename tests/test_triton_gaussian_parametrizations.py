"""The Triton Gaussian kernels under every parametrization (scale x posterior x KL estimator), called through their
launchers, against the float64 reference: forward and fused backward, both layouts, float32 and bfloat16, extreme
raw values; and VDVAE's default parametrization bit for bit what the kernels computed before it existed."""

from __future__ import annotations

import hashlib
import itertools

import pytest
import torch

from tests.op_cases import DEVICE, INTERPRETED, grad_tolerance, tolerance
from vdvae_fast import philox, reference
from vdvae_fast.kernels import gaussian_kl, sample_and_kl, sample_gaussian

SEED = 99
BETA = reference.SOFTPLUS_BETA
SCALES = range(len(reference.SCALES))
POSTERIORS = range(len(reference.POSTERIORS))
ESTIMATORS = range(len(reference.KL_ESTIMATORS))
DTYPES_AND_LAYOUTS = list(itertools.product([torch.float32, torch.bfloat16], ["contiguous", "channels_last"]))


def _case_id(value: object) -> str:
    return str(value).removeprefix("torch.")


def _tensors(count: int, dtype: torch.dtype, layout: str, spread: float = 1.5, shape=(2, 3, 4, 5)) -> list:
    gen = torch.Generator().manual_seed(12)
    tensors = [torch.randn(shape, generator=gen) * spread for _ in range(count)]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return [t.contiguous(memory_format=fmt).to(DEVICE, dtype) for t in tensors]


def _names(scale: int, posterior: int | None = None, estimator: int | None = None) -> dict:
    """The reference's keyword arguments for kernel codes."""
    names = {"scale": reference.SCALES[scale], "beta": BETA}
    if posterior is not None:
        names["posterior"] = reference.POSTERIORS[posterior]
    if estimator is not None:
        names["kl_estimator"] = reference.KL_ESTIMATORS[estimator]
    return names


def _float64_leaves(tensors: list) -> list:
    return [t.detach().cpu().double().requires_grad_(True) for t in tensors]


def _reference_sample_and_kl(inputs, grad_z, grad_kl, scale, posterior, estimator):
    """(z, kl, grads of sum(grad_z z) + sum(grad_kl kl)) of the float64 reference."""
    leaves = _float64_leaves(inputs)
    z, kl = reference.sample_and_kl(*leaves, **_names(scale, posterior, estimator), seed=SEED, backend="reference")
    ((z * grad_z.cpu().double()).sum() + (kl * grad_kl.cpu().double()).sum()).backward()
    return z.detach(), kl.detach(), [leaf.grad for leaf in leaves]


def _kernel_sample_and_kl(inputs, grad_z, grad_kl, scale, posterior, estimator):
    codes = (scale, BETA, posterior, estimator)
    z, kl = sample_and_kl.sample_and_kl_forward(*inputs, SEED, *codes)
    grads = sample_and_kl.sample_and_kl_backward(grad_z, grad_kl, *inputs, SEED, *codes)
    return z, kl, grads


def _assert_outputs(z, kl, grads, ref_z, ref_kl, ref_grads, inputs) -> None:
    dtype = inputs[0].dtype
    assert z.dtype == dtype and z.stride() == inputs[0].stride()
    torch.testing.assert_close(z.cpu().double(), ref_z.to(dtype).double(), **tolerance(dtype))
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl.cpu().double(), ref_kl, rtol=2e-5, atol=1e-4)
    for grad, ref_grad, param in zip(grads, ref_grads, inputs, strict=True):
        assert grad.dtype == dtype and grad.stride() == param.stride()
        torch.testing.assert_close(grad.cpu().double(), ref_grad, **grad_tolerance(dtype, ref_grad))


@pytest.mark.parametrize("dtype,layout", DTYPES_AND_LAYOUTS, ids=_case_id)
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: reference.KL_ESTIMATORS[e])
@pytest.mark.parametrize("posterior", POSTERIORS, ids=lambda p: reference.POSTERIORS[p])
@pytest.mark.parametrize("scale", SCALES, ids=lambda s: reference.SCALES[s])
def test_sample_and_kl_matches_float64_reference(
    scale: int, posterior: int, estimator: int, dtype: torch.dtype, layout: str
) -> None:
    *inputs, grad_z = _tensors(5, dtype, layout)
    grad_kl = torch.tensor([0.7, -1.3], device=DEVICE)
    expected = _reference_sample_and_kl(inputs, grad_z, grad_kl, scale, posterior, estimator)
    _assert_outputs(*_kernel_sample_and_kl(inputs, grad_z, grad_kl, scale, posterior, estimator), *expected, inputs)


@pytest.mark.parametrize("dtype,layout", DTYPES_AND_LAYOUTS, ids=_case_id)
@pytest.mark.parametrize("posterior", POSTERIORS, ids=lambda p: reference.POSTERIORS[p])
@pytest.mark.parametrize("scale", SCALES, ids=lambda s: reference.SCALES[s])
def test_gaussian_kl_matches_float64_reference(scale: int, posterior: int, dtype: torch.dtype, layout: str) -> None:
    *inputs, upstream = _tensors(5, dtype, layout)
    upstream = upstream.float()
    leaves = _float64_leaves(inputs)
    ref_kl = reference.gaussian_kl(*leaves, **_names(scale, posterior))
    (ref_kl * upstream.cpu().double()).sum().backward()
    kl = gaussian_kl.gaussian_kl_forward(*inputs, scale, BETA, posterior)
    grads = gaussian_kl.gaussian_kl_backward(upstream, *inputs, scale, BETA, posterior)
    assert kl.dtype == torch.float32 and kl.stride() == inputs[0].stride()
    torch.testing.assert_close(kl.cpu().double(), ref_kl.detach(), **tolerance(torch.float32))
    for grad, leaf, param in zip(grads, leaves, inputs, strict=True):
        assert grad.dtype == dtype and grad.stride() == param.stride()
        torch.testing.assert_close(grad.cpu().double(), leaf.grad, **grad_tolerance(dtype, leaf.grad))


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 2, 8)], ids=["width5", "width8"])  # see DEFAULT_DIGESTS
@pytest.mark.parametrize("dtype,layout", DTYPES_AND_LAYOUTS, ids=_case_id)
@pytest.mark.parametrize("scale", SCALES, ids=lambda s: reference.SCALES[s])
def test_sample_gaussian_matches_float64_reference(scale: int, dtype: torch.dtype, layout: str, shape: tuple) -> None:
    mu, raw, upstream = _tensors(3, dtype, layout, shape=shape)
    leaves = _float64_leaves([mu, raw])
    ref_z = reference.sample_gaussian(*leaves, temperature=0.7, **_names(scale), seed=SEED, backend="reference")
    (ref_z * upstream.cpu().double()).sum().backward()
    z = sample_gaussian.sample_gaussian_forward(mu, raw, 0.7, SEED, scale, BETA)
    grad_raw = sample_gaussian.sample_gaussian_backward(upstream, mu, raw, 0.7, SEED, scale, BETA)
    assert z.dtype == dtype and z.stride() == mu.stride()
    torch.testing.assert_close(z.cpu().double(), ref_z.detach().to(dtype).double(), **tolerance(dtype))
    assert grad_raw.dtype == dtype and grad_raw.stride() == mu.stride()
    torch.testing.assert_close(grad_raw.cpu().double(), leaves[1].grad, **grad_tolerance(dtype, leaves[1].grad))


# Raw values around every branch point: softplus's t = beta * raw at -20 (log sigma turns linear), 20 (softplus
# turns linear), where 1 + exp(t) rounds to 1 in float32 (t < -17), and far beyond (sigma below float32's range);
# for exp, scales from e^-40 to e^12 (beyond, the float64 reference's own autograd cancels terms of sigma_q^2 /
# sigma_p^2 ~ e^24 under the residual posterior and is no oracle). The means are a few prior standard deviations
# (from 0 and apart), so that the scales, not the means, are what is extreme: a mean of 1 beside a difference of
# 1e-12 would make the reference's own z - mu_p inexact.
_EDGE = 20.0 / BETA
EXTREME_RAW = {
    "softplus": ([-200.0, -40.0, -_EDGE - 0.5, -_EDGE - 0.05, -_EDGE + 0.05, -26.0, -5.0, 0.0, 5.0, _EDGE - 0.05,
                  _EDGE + 0.05, 40.0, 200.0], [-_EDGE - 0.5, -_EDGE + 0.05, -3.0, 0.0, 3.0, _EDGE + 0.05, 60.0]),
    "exp": ([-40.0, -20.0, -5.0, 0.0, 5.0, 12.0], [-10.0, -3.0, 0.0, 3.0, 10.0]),
}  # fmt: skip


@pytest.mark.parametrize("shape", [(3, 5, 12, 8), (2, 5, 13, 7)], ids=["groups", "per_element"])
def test_eps_is_the_reference_stream_bit_for_bit_in_both_layouts(shape: tuple) -> None:
    """Over several blocks, with blocks and images starting mid-row: in channels_last tensors of width 8 each
    four w-neighbours are one Philox group, of width 7 (and images of 7 * 13 * 5 elements) each element draws
    alone; every path gives the same eps bit for bit, and the reference stream's to float32 rounding."""
    expected = philox.normal(SEED, torch.Size(shape), torch.device("cpu")).double()
    drawn = []
    for layout in ("contiguous", "channels_last"):
        zeros = _tensors(1, torch.float32, layout, shape=shape)[0] * 0.0
        drawn.append(sample_gaussian.sample_gaussian_forward(zeros, zeros, 1.0, SEED))  # 0 + 1 * e^0 * eps
        drawn.append(sample_and_kl.sample_and_kl_forward(zeros, zeros, zeros, zeros, SEED)[0])
    for eps in drawn:
        assert torch.equal(eps, drawn[0])
    torch.testing.assert_close(drawn[0].cpu().double(), expected, rtol=1e-6, atol=1e-6)


# The interpreter evaluates both sides of a tl.where: the side discarded for far-negative raw values divides by 0.
@pytest.mark.filterwarnings("ignore:.* encountered in:RuntimeWarning")
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: reference.KL_ESTIMATORS[e])
@pytest.mark.parametrize("posterior", POSTERIORS, ids=lambda p: reference.POSTERIORS[p])
@pytest.mark.parametrize("scale", SCALES, ids=lambda s: reference.SCALES[s])
def test_extreme_raw_values_stay_finite_and_accurate(scale: int, posterior: int, estimator: int) -> None:
    """Every element, however small or large its scale, within float32 rounding of the float64 reference."""
    raw_b, raw_p = (torch.tensor(v) for v in EXTREME_RAW[reference.SCALES[scale]])
    b, raw_p = (t.reshape(-1) for t in torch.meshgrid(raw_b, raw_p, indexing="ij"))
    mu_p, gap, grad_z = _tensors(3, torch.float32, "contiguous", shape=b.shape)
    sigma_p, _ = reference.scale_and_log(raw_p.double(), reference.SCALES[scale], BETA)
    mu_p = mu_p * sigma_p
    a = gap * sigma_p + (0.0 if reference.POSTERIORS[posterior] == "residual" else mu_p)
    inputs = [t.float().reshape(1, -1).to(DEVICE) for t in (a, b, mu_p, raw_p)]
    grad_z = grad_z.reshape(1, -1)
    grad_kl = torch.tensor([0.7], device=DEVICE)
    z, kl, grads = _kernel_sample_and_kl(inputs, grad_z, grad_kl, scale, posterior, estimator)
    ref_z, ref_kl, ref_grads = _reference_sample_and_kl(inputs, grad_z, grad_kl, scale, posterior, estimator)
    assert torch.isfinite(kl).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(z.cpu().double(), ref_z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl.cpu().double(), ref_kl, rtol=1e-5, atol=1e-4)
    for name, grad, ref_grad in zip(("a", "b", "mu_p", "raw_p"), grads, ref_grads, strict=True):
        torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-4, atol=1e-5, msg=name)


# sha256 (first 16 hex digits) of the default parametrization's outputs (forward, then backward) on _tensors(6,
# dtype, layout, spread=0.7, shape) by the kernels as they were before the parametrizations (commit 0ef2dce), under
# the interpreter: (contiguous, channels_last). Contiguous tensors of these shapes, and channels_last ones of width
# 8, draw four normals per Philox call; channels_last ones of width 5 one per element: both paths are held to it.
# sample_and_kl's channels_last width-8 digests are instead of the kernels since they draw four w-neighbours per
# Philox call there too: z and the gradients are the bits they were, the per-image KL (about 89 and 228) is summed
# in another order and moved by 1 ulp (1.5e-5).
DEFAULT_DIGESTS = {
    ("sample_and_kl", torch.float32, (2, 3, 4, 5)): ("ea9cafbe817a6405", "ea9cafbe817a6405"),
    ("gaussian_kl", torch.float32, (2, 3, 4, 5)): ("52a2e5ac640405ac", "52a2e5ac640405ac"),
    ("sample_gaussian", torch.float32, (2, 3, 4, 5)): ("787380a70d84fdb9", "787380a70d84fdb9"),
    ("sample_and_kl", torch.bfloat16, (2, 3, 4, 5)): ("821f3dded5c359d5", "821f3dded5c359d5"),
    ("gaussian_kl", torch.bfloat16, (2, 3, 4, 5)): ("755e6051a2551ac4", "755e6051a2551ac4"),
    ("sample_gaussian", torch.bfloat16, (2, 3, 4, 5)): ("f53c73c24171de86", "f53c73c24171de86"),
    ("sample_and_kl", torch.float32, (2, 3, 2, 8)): ("a7f9bea971e7ed7c", "61f318227abfc1f2"),
    ("gaussian_kl", torch.float32, (2, 3, 2, 8)): ("afc70df753ce3f08", "afc70df753ce3f08"),
    ("sample_gaussian", torch.float32, (2, 3, 2, 8)): ("eb026139b127c8dc", "eb026139b127c8dc"),
    ("sample_and_kl", torch.bfloat16, (2, 3, 2, 8)): ("2ca80cddcf40008d", "2ca80cddcf40008d"),
    ("gaussian_kl", torch.bfloat16, (2, 3, 2, 8)): ("9e60e5d9f9f13428", "9e60e5d9f9f13428"),
    ("sample_gaussian", torch.bfloat16, (2, 3, 2, 8)): ("65415ec8c81a8494", "65415ec8c81a8494"),
}


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _default_outputs(op: str, dtype: torch.dtype, layout: str, shape: tuple) -> list:
    a, b, mu_p, raw_p, grad_z, grad_kl = _tensors(6, dtype, layout, spread=0.7, shape=shape)
    defaults = (0, BETA, 0, 0)  # exp, direct, analytic
    if op == "sample_and_kl":
        per_image = grad_kl.float().reshape(-1)[:2].contiguous()
        outputs = sample_and_kl.sample_and_kl_forward(a, b, mu_p, raw_p, SEED, *defaults)
        return [*outputs, *sample_and_kl.sample_and_kl_backward(grad_z, per_image, a, b, mu_p, raw_p, SEED, *defaults)]
    if op == "gaussian_kl":
        kl = gaussian_kl.gaussian_kl_forward(a, b, mu_p, raw_p, *defaults[:3])
        return [kl, *gaussian_kl.gaussian_kl_backward(grad_kl.float(), a, b, mu_p, raw_p, *defaults[:3])]
    z = sample_gaussian.sample_gaussian_forward(a, b, 0.8, SEED, *defaults[:2])
    grad_raw = sample_gaussian.sample_gaussian_backward(grad_z, a, b, 0.8, SEED, *defaults[:2])
    return [z, grad_z, grad_raw]  # mu's gradient is grad_z itself (ops._sample_gaussian_grad passes it through)


@pytest.mark.skipif(not INTERPRETED, reason="the digests are of the interpreter's float32 arithmetic (numpy)")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op,dtype,shape", list(DEFAULT_DIGESTS), ids=_case_id)
def test_default_parametrization_is_bit_identical_to_before(op: str, dtype: torch.dtype, shape: tuple, layout: str):
    expected = DEFAULT_DIGESTS[(op, dtype, shape)][layout == "channels_last"]
    assert _digest(_default_outputs(op, dtype, layout, shape)) == expected


@pytest.mark.parametrize(
    "codes,message",
    [((2, BETA, 0, 0), "scale code"), ((0, BETA, 3, 0), "posterior code"), ((0, BETA, 0, -1), "kl_estimator code"),
     ((1, 0.0, 0, 0), "beta")],
)  # fmt: skip
def test_an_unknown_code_or_bad_beta_is_refused(codes: tuple, message: str) -> None:
    inputs = _tensors(4, torch.float32, "contiguous")
    with pytest.raises(ValueError, match=message):
        sample_and_kl.sample_and_kl_forward(*inputs, SEED, *codes)
