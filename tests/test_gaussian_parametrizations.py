"""The Gaussian parametrizations (softplus scales, residual and precision-weighted posteriors, the sampled KL
estimate): the reference against closed forms in float64, then every fused backend against the float64
reference in every combination, at extreme raw values, under gradcheck; VDVAE's default path bit for bit as
before, and nothing more saved for backward."""

from __future__ import annotations

import hashlib
import itertools
import math
import platform
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.op_cases import (
    DEVICE,
    FUSED_BACKENDS,
    INTERPRETED,
    assert_as_accurate_as_reference,
    grad_tolerance,
    tolerance,
)
from vdvae_fast import ops, reference

FORMS = list(itertools.product(reference.SCALES, reference.POSTERIORS, reference.KL_ESTIMATORS))
KL_FORMS = list(itertools.product(reference.SCALES, reference.POSTERIORS))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "channels_last"]
SHAPE = (2, 3, 5, 7)  # 105 elements per image: ragged heads and tails of the groups of four


def _form_id(form: tuple) -> str:
    return "-".join(form)


def _inputs(shape, dtype=torch.float64, fmt="contiguous", seed=0, device=DEVICE) -> list[torch.Tensor]:
    """(a, b, mu_p, raw_p): means around 0, raw scales in about [-1.5, 1.5] (sigmas of a trained model)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5 for _ in range(4)]
    if fmt == "channels_last":
        tensors = [t.contiguous(memory_format=torch.channels_last) for t in tensors]
    return [t.to(device, dtype) for t in tensors]


def _options(form: tuple, beta: float = reference.SOFTPLUS_BETA) -> dict:
    scale, posterior, *estimator = form
    return {
        "scale": scale,
        "beta": beta,
        "posterior": posterior,
        **({"kl_estimator": estimator[0]} if estimator else {}),
    }


# --------------------------------------------------------------------------------------------
# (a) The reference against closed forms, float64
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [reference.SOFTPLUS_BETA, 1.0, 3.0])
def test_softplus_scale_is_torch_softplus_with_that_beta(beta: float) -> None:
    raw = torch.linspace(-40.0, 40.0, 2001, dtype=torch.float64)
    sigma, log_sigma = reference.scale_and_log(raw, "softplus", beta)
    expected = F.softplus(raw, beta=beta)
    torch.testing.assert_close(sigma, expected, rtol=1e-14, atol=0.0)
    # log σ: finite everywhere; below beta·raw = -20 it is beta·raw - log beta, which differs from the exact
    # log softplus by log(1 + e^t / 2 + ...) < e^-20 / 2 = 1.03e-9
    torch.testing.assert_close(log_sigma, torch.log(expected), rtol=1e-12, atol=1.1e-9)
    assert reference.scale_and_log(torch.tensor(0.0, dtype=torch.float64), "softplus")[0].item() == pytest.approx(1.0)


def test_residual_kl_is_nvaes_closed_form() -> None:
    delta_mu, raw_delta, mu_p, raw_p = _inputs((3, 50), device="cpu")
    kl = reference.gaussian_kl(delta_mu, raw_delta, mu_p, raw_p, posterior="residual")
    sigma_p, delta_sigma = raw_p.exp(), raw_delta.exp()
    expected = 0.5 * (delta_mu**2 / sigma_p**2 + delta_sigma**2 - 1.0) - torch.log(delta_sigma)
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", reference.SCALES)
def test_precision_weighting_is_ladder_vae_eq_21(scale: str) -> None:
    mu_b, raw_b, mu_p, raw_p = _inputs((3, 50), device="cpu")
    mu_q, sigma_q, log_sigma_q, *_ = reference.posterior_and_prior(
        mu_b, raw_b, mu_p, raw_p, scale=scale, posterior="precision_weighted"
    )
    sigma_b = reference.scale_and_log(raw_b, scale)[0]
    sigma_p = reference.scale_and_log(raw_p, scale)[0]
    precision_b, precision_p = sigma_b**-2, sigma_p**-2
    torch.testing.assert_close(mu_q, (mu_b * precision_b + mu_p * precision_p) / (precision_b + precision_p))
    torch.testing.assert_close(sigma_q, (precision_b + precision_p) ** -0.5, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(log_sigma_q, sigma_q.log(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", KL_FORMS, ids=_form_id)
def test_sampled_estimate_is_the_log_density_difference_at_z(form: tuple) -> None:
    params = _inputs((3, 4, 5), device="cpu")
    options = _options(form)
    z, kl = reference.sample_and_kl(*params, **options, kl_estimator="sampled", seed=5)
    mu_q, sigma_q, _, mu_p, sigma_p, _ = reference.posterior_and_prior(*params, **options)
    normal = torch.distributions.Normal
    expected = (normal(mu_q, sigma_q).log_prob(z) - normal(mu_p, sigma_p).log_prob(z)).flatten(1).sum(1)
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-11)


def test_sampled_estimate_averages_to_the_analytic_kl() -> None:
    """Rows of n identical coordinates: the mean of n sampled estimates against the analytic KL.

    Per coordinate the estimate is const + ε·(μq − μp)σq/σp² + ε²(σq²/σp² − 1)/2 with ε standard normal, so its
    variance is ((μq − μp)σq/σp²)² + (σq²/σp² − 1)²/2 exactly; the bound is 5 standard errors of the mean (a
    random seed would fail it with probability below 1e-6; the seed here is fixed).
    """
    n = 1 << 16
    rows = torch.tensor([[0.3, -0.2, 0.0, 0.1], [-1.0, 0.4, 0.5, -0.3], [0.0, 0.0, 0.0, 0.0], [2.0, -1.0, -1.0, 0.5]])
    a, b, mu_p, raw_p = (rows[:, k : k + 1].double().expand(-1, n).contiguous() for k in range(4))
    for scale, posterior in KL_FORMS:
        options = {"scale": scale, "posterior": posterior}
        _, sampled = reference.sample_and_kl(a, b, mu_p, raw_p, **options, kl_estimator="sampled", seed=17)
        analytic = reference.gaussian_kl(a, b, mu_p, raw_p, **options)[:, 0]
        mu_q, sigma_q, _, _, sigma_p, _ = (t[:, 0] for t in reference.posterior_and_prior(a, b, mu_p, raw_p, **options))
        ratio = sigma_q**2 / sigma_p**2
        std = torch.sqrt(((mu_q - mu_p[:, 0]) * sigma_q / sigma_p**2) ** 2 + 0.5 * (ratio - 1.0) ** 2)
        assert ((sampled / n - analytic).abs() <= 5.0 * std / math.sqrt(n) + 1e-12).all(), (scale, posterior)


# --------------------------------------------------------------------------------------------
# (b) Every fused backend against the float64 reference
# --------------------------------------------------------------------------------------------


def _grid(forms: list, interpreted_dtypes: list) -> list:
    """(backend, form, dtype, layout): the full grid for compiled backends; interpreted Triton takes every form
    once, alternating layouts, in float32, and the low-precision dtypes on the default form."""
    params = []
    for name in FUSED_BACKENDS:
        if name == "triton" and INTERPRETED:
            cases = [(form, torch.float32, LAYOUTS[i % 2]) for i, form in enumerate(forms)]
            cases += [(forms[0], dtype, "channels_last") for dtype in interpreted_dtypes]
        else:
            cases = list(itertools.product(forms, DTYPES, LAYOUTS))
        ids = [f"{name}-{_form_id(f)}-{str(d)[6:]}-{fmt}" for f, d, fmt in cases]
        params += [pytest.param(name, *case, id=i) for case, i in zip(cases, ids, strict=True)]
    if not params:
        params.append(pytest.param("none", None, None, None, marks=pytest.mark.skip(reason="no fused backend")))
    return params


def _upstream(like: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=gen, dtype=torch.float64).to(like.device)


def _sample_and_kl_run(params, backend: str, options: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    leaves = [t.detach().requires_grad_(True) for t in params]
    z, kl = ops.sample_and_kl(*leaves, **options, seed=1234, backend=backend)
    loss = (z.double() * _upstream(z, 1)).sum() + (kl.double() * _upstream(kl, 2).abs()).sum()
    return [z.detach(), kl.detach()], list(torch.autograd.grad(loss, leaves))


def _check_against_float64(values, grads, truth_values, truth_grads, dtype: torch.dtype, params) -> None:
    z, kl = values
    assert z.dtype == dtype and z.stride() == params[0].stride() and kl.dtype == torch.float32
    torch.testing.assert_close(z.double(), truth_values[0].to(z.device), **tolerance(dtype))
    torch.testing.assert_close(kl.double(), truth_values[1].to(z.device), rtol=2e-5, atol=1e-4)
    for grad, truth, param in zip(grads, truth_grads, params, strict=True):
        assert grad.dtype == dtype and grad.stride() == param.stride()
        torch.testing.assert_close(grad.double(), truth.to(grad.device), **grad_tolerance(dtype, truth))


@pytest.mark.parametrize("backend,form,dtype,fmt", _grid(FORMS, [torch.bfloat16, torch.float16]))
def test_sample_and_kl_matches_the_float64_reference(backend: str, form: tuple, dtype, fmt: str) -> None:
    params = _inputs(SHAPE, dtype, fmt, seed=1)
    options = _options(form)
    values, grads = _sample_and_kl_run(params, backend, options)
    truth_values, truth_grads = _sample_and_kl_run([t.double() for t in params], "reference", options)
    _check_against_float64(values, grads, truth_values, truth_grads, dtype, params)


@pytest.mark.parametrize("backend,form,dtype,fmt", _grid(KL_FORMS, [torch.float16]))
def test_gaussian_kl_matches_the_float64_reference(backend: str, form: tuple, dtype, fmt: str) -> None:
    params = _inputs(SHAPE, dtype, fmt, seed=2)
    results = {}
    for name, inputs in ((backend, params), ("reference", [t.double() for t in params])):
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        kl = ops.gaussian_kl(*leaves, **_options(form), backend=name)
        grads = torch.autograd.grad((kl.double() * _upstream(kl, 3)).sum(), leaves)
        results[name] = (kl.detach(), grads)
    kl, grads = results[backend]
    truth, truth_grads = results["reference"]
    assert kl.dtype == torch.float32 and kl.stride() == params[0].stride()
    torch.testing.assert_close(kl.double(), truth, **tolerance(torch.float32))
    for grad, truth_grad in zip(grads, truth_grads, strict=True):
        torch.testing.assert_close(grad.double(), truth_grad, **grad_tolerance(dtype, truth_grad))


@pytest.mark.parametrize("backend,form,dtype,fmt", _grid([(s,) for s in reference.SCALES], [torch.bfloat16]))
def test_sample_gaussian_matches_the_float64_reference(backend: str, form: tuple, dtype, fmt: str) -> None:
    mu, raw = _inputs(SHAPE, dtype, fmt, seed=3)[:2]
    results = {}
    for name, inputs in ((backend, (mu, raw)), ("reference", (mu.double(), raw.double()))):
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        z = ops.sample_gaussian(*leaves, temperature=0.7, scale=form[0], seed=99, backend=name)
        grads = torch.autograd.grad((z.double() * _upstream(z, 4)).sum(), leaves)
        results[name] = (z.detach(), grads)
    z, grads = results[backend]
    truth, truth_grads = results["reference"]
    assert z.dtype == dtype and z.stride() == mu.stride()
    torch.testing.assert_close(z.double(), truth, **tolerance(dtype))
    for grad, truth_grad in zip(grads, truth_grads, strict=True):
        torch.testing.assert_close(grad.double(), truth_grad, **grad_tolerance(dtype, truth_grad))


# Interpreted Triton (slow) runs forms that take each scale, posterior and estimator at least once.
INTERPRETED_FORMS = [
    ("exp", "direct", "analytic"),
    ("exp", "residual", "sampled"),
    ("softplus", "precision_weighted", "analytic"),
]


def _interpreted(backend: str) -> bool:
    return backend == "triton" and INTERPRETED


EXTREME_RAWS = [-200.0, -30.0, 0.0, 30.0]  # softplus underflows to 0 at -200 (beta·raw < -104), exp at -200 too


def test_extreme_raw_values_stay_finite_where_the_reference_is(backend: str) -> None:
    """One coordinate per image, b and raw_p over EXTREME_RAWS: the fused outputs and gradients are finite
    wherever the float32 reference's are, and no further from float64 there than 8x the float32 reference."""
    pairs = list(itertools.product(EXTREME_RAWS, EXTREME_RAWS))
    b = torch.tensor([p[0] for p in pairs], device=DEVICE).reshape(-1, 1)
    raw_p = torch.tensor([p[1] for p in pairs], device=DEVICE).reshape(-1, 1)
    a, mu_p = torch.full_like(b, 0.3), torch.full_like(b, -0.2)
    for form in INTERPRETED_FORMS if _interpreted(backend) else FORMS:
        options = _options(form)
        single = [t.float() for t in (a, b, mu_p, raw_p)]
        fused = _sample_and_kl_run(single, backend, options)
        ref = _sample_and_kl_run(single, "reference", options)
        truth_values, truth_grads = _sample_and_kl_run([t.double() for t in (a, b, mu_p, raw_p)], "reference", options)
        for what, value, ref_value, truth in zip(
            ("z", "kl", "grad a", "grad b", "grad mu_p", "grad raw_p"),
            [*fused[0], *fused[1]],
            [*ref[0], *ref[1]],
            [*truth_values, *truth_grads],
            strict=True,
        ):
            finite = torch.isfinite(ref_value) & torch.isfinite(truth.to(ref_value.device))
            assert torch.isfinite(value[finite]).all(), (form, what)
            if finite.any():
                assert_as_accurate_as_reference(value[finite], ref_value[finite], truth[finite.cpu()], f"{form} {what}")


# --------------------------------------------------------------------------------------------
# (c) gradcheck of the cpu backend in float64, every combination
# --------------------------------------------------------------------------------------------


def _cpu_only() -> None:
    if "cpu" not in FUSED_BACKENDS:
        pytest.skip("the C++ extension is not built")


@pytest.mark.parametrize("form", FORMS, ids=_form_id)
def test_cpu_sample_and_kl_gradcheck_float64(form: tuple) -> None:
    _cpu_only()
    params = tuple(t.requires_grad_(True) for t in _inputs((2, 3, 2, 2), device="cpu", seed=8))
    assert torch.autograd.gradcheck(lambda *p: ops.sample_and_kl(*p, **_options(form), seed=3, backend="cpu"), params)


@pytest.mark.parametrize("form", KL_FORMS, ids=_form_id)
def test_cpu_gaussian_kl_gradcheck_float64(form: tuple) -> None:
    _cpu_only()
    params = tuple(t.requires_grad_(True) for t in _inputs((2, 3, 2, 2), device="cpu", seed=9))
    assert torch.autograd.gradcheck(lambda *p: ops.gaussian_kl(*p, **_options(form), backend="cpu"), params)


@pytest.mark.parametrize("scale", reference.SCALES)
def test_cpu_sample_gaussian_gradcheck_float64(scale: str) -> None:
    _cpu_only()
    mu, raw = (t.requires_grad_(True) for t in _inputs((2, 3, 2, 2), device="cpu", seed=10)[:2])
    assert torch.autograd.gradcheck(
        lambda m, r: ops.sample_gaussian(m, r, temperature=0.7, scale=scale, seed=3, backend="cpu"), (mu, raw)
    )


def test_kernels_refuse_unknown_codes_with_a_clear_error() -> None:
    _cpu_only()
    params = _inputs((2, 3), torch.float32, device="cpu")
    kernels = torch.ops.vdvae_fast_C
    with pytest.raises(RuntimeError, match="posterior must be 0 \\(direct\\), 1 \\(residual\\) or 2"):
        kernels.sample_and_kl_forward(*params, 1, 0, 0.5, 3, 0)
    with pytest.raises(RuntimeError, match="scale must be 0 \\(exp\\) or 1 \\(softplus\\)"):
        kernels.gaussian_kl_forward(*params, 2, 0.5, 0)
    with pytest.raises(RuntimeError, match="beta .* must be finite and > 0"):
        kernels.sample_gaussian_forward(params[0], params[1], 1.0, 1, 1, -1.0)


# --------------------------------------------------------------------------------------------
# (d) VDVAE's default path: the same bits as before the parametrizations, the same saved bytes
# --------------------------------------------------------------------------------------------


def _exact_inputs(shape, dtype, fmt, salt) -> list[torch.Tensor]:
    """Inputs from integer arithmetic (the same on every machine), values in [-1.5, 1.5]."""
    index = torch.arange(math.prod(shape), dtype=torch.int64)
    out = []
    for k in range(4):
        values = (((index * 7919 + 104729 * (k + salt)) % 2003).double() / 1001.0 - 1.0) * (1.5 if k % 2 else 1.0)
        t = values.reshape(shape)
        out.append((t.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else t).to(dtype))
    return out


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous()
        h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()[:16]


def _default_path_digests(shape, dtype, fmt) -> tuple[str, str, str]:
    """sha256 prefixes of (sample_and_kl, gaussian_kl, sample_gaussian) outputs and gradients on the cpu backend."""
    a, b, m, r = (t.requires_grad_(True) for t in _exact_inputs(shape, dtype, fmt, 0))
    grad_z = _exact_inputs(shape, dtype, fmt, 5)[0]
    z, kl = ops.sample_and_kl(a, b, m, r, seed=123456789, backend="cpu")
    grads = torch.autograd.grad((z, kl), (a, b, m, r), (grad_z, torch.linspace(0.5, 1.5, shape[0], dtype=kl.dtype)))
    kl_elements = ops.gaussian_kl(a, b, m, r, backend="cpu")
    kl_grads = torch.autograd.grad(kl_elements, (a, b, m, r), _exact_inputs(shape, kl_elements.dtype, fmt, 7)[1])
    prior_z = ops.sample_gaussian(a, b, temperature=0.7, seed=987654321, backend="cpu")
    prior_grads = torch.autograd.grad(prior_z, (a, b), grad_z)
    return _digest([z, kl, *grads]), _digest([kl_elements, *kl_grads]), _digest([prior_z, *prior_grads])


# Made by _default_path_digests with the C++ kernels before the parametrizations (commit 0ef2dce), built with
# -march=native on an x86-64 CPU with FMA (gcc contracts the same products into FMAs with AVX2 or AVX-512).
DEFAULT_PATH_DIGESTS = {
    ((3, 5, 6, 7), "float32", "contiguous"): ("4cb2947380e28784", "ebbd8e52fc0041bd", "a7595835fed5de45"),
    ((3, 5, 6, 7), "float32", "channels_last"): ("430fb1df6d80f8e7", "ebbd8e52fc0041bd", "a7595835fed5de45"),
    ((3, 5, 6, 7), "bfloat16", "contiguous"): ("825bfda604b2e2e6", "147ad70de410754f", "c238fbcafc0f0f17"),
    ((3, 5, 6, 7), "bfloat16", "channels_last"): ("825bfda604b2e2e6", "147ad70de410754f", "c238fbcafc0f0f17"),
    ((3, 5, 6, 7), "float16", "contiguous"): ("00b779d0cc62162d", "7dfdf12c1b59cda2", "71025a65db36c862"),
    ((3, 5, 6, 7), "float16", "channels_last"): ("00b779d0cc62162d", "7dfdf12c1b59cda2", "71025a65db36c862"),
    ((3, 5, 6, 7), "float64", "contiguous"): ("0980b3ceba2e707e", "1c1283c679a29940", "c9a070ce58a0b491"),
    ((3, 5, 6, 7), "float64", "channels_last"): ("8f335fee12852a87", "1c1283c679a29940", "c9a070ce58a0b491"),
    ((2, 16, 32, 40), "float32", "contiguous"): ("6fa83687d694b7a2", "1a563e38d84d8038", "cdee0a593101f945"),
    ((2, 16, 32, 40), "float32", "channels_last"): ("6fa83687d694b7a2", "1a563e38d84d8038", "cdee0a593101f945"),
    ((2, 16, 32, 40), "bfloat16", "contiguous"): ("f092e4dfcc675114", "0b05abdef8a7bab8", "c3bab398b17376fd"),
    ((2, 16, 32, 40), "bfloat16", "channels_last"): ("f092e4dfcc675114", "0b05abdef8a7bab8", "c3bab398b17376fd"),
    ((2, 16, 32, 40), "float16", "contiguous"): ("e1fa20880f9f96d5", "30abd93714f8bd3e", "bf4fd6e058397fd1"),
    ((2, 16, 32, 40), "float16", "channels_last"): ("e1fa20880f9f96d5", "30abd93714f8bd3e", "bf4fd6e058397fd1"),
    ((2, 16, 32, 40), "float64", "contiguous"): ("622eb09681794bcd", "bc974c7fe02db973", "c1fbf2fb0557281f"),
    ((2, 16, 32, 40), "float64", "channels_last"): ("edfbd25799fdeadb", "bc974c7fe02db973", "c1fbf2fb0557281f"),
}


def _x86_with_fma() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return platform.machine() == "x86_64" and cpuinfo.exists() and " fma " in cpuinfo.read_text()


@pytest.mark.parametrize("key", list(DEFAULT_PATH_DIGESTS), ids=lambda k: f"{k[0][0]}x{k[0][1]}-{k[1]}-{k[2]}")
def test_default_path_is_bit_identical_to_the_kernels_before(key: tuple) -> None:
    _cpu_only()
    if not _x86_with_fma():
        pytest.skip("the stored digests are those of an x86-64 build with FMA")
    shape, dtype_name, fmt = key
    assert _default_path_digests(shape, getattr(torch, dtype_name), fmt) == DEFAULT_PATH_DIGESTS[key]


def _saved_bytes(call) -> int:
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call()
    return sum(saved)


@pytest.mark.parametrize("form", FORMS, ids=_form_id)
def test_every_form_saves_only_the_inputs_and_the_seed(backend: str, form: tuple) -> None:
    if _interpreted(backend) and form not in INTERPRETED_FORMS:
        pytest.skip("interpreted Triton runs INTERPRETED_FORMS")
    params = [t.requires_grad_(True) for t in _inputs((4, 8, 6, 6), torch.float32, "channels_last", seed=11)]
    input_bytes = sum(t.numel() * t.element_size() for t in params)
    seed_bytes = torch.tensor(0).element_size()
    options = _options(form)
    assert _saved_bytes(lambda: ops.sample_and_kl(*params, **options, backend=backend)) == input_bytes + seed_bytes
    options.pop("kl_estimator")
    assert _saved_bytes(lambda: ops.gaussian_kl(*params, **options, backend=backend)) == input_bytes
    two = params[:2]
    call = lambda: ops.sample_gaussian(*two, scale=form[0], backend=backend)  # noqa: E731
    assert _saved_bytes(call) == input_bytes // 2 + seed_bytes
