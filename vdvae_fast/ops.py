"""Public functional API of the fused ops: input checks, backend dispatch and autograd.

Each op is a torch.library custom op (so torch.compile traces it without graph breaks) whose
implementation calls one backend's kernels:

- ``cpu``  — C++ kernels of vdvae_fast._C (torch.ops.vdvae_fast_C) on CPU tensors,
- ``cuda`` — CUDA kernels of the same extension on CUDA tensors,
- ``triton`` — the Triton kernels of vdvae_fast.kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
- ``reference`` — the eager formulas of vdvae_fast.reference with plain autograd (the oracle),
- ``original`` — the same formulas with torch's own generator for the noise, as openai/vdvae runs them
  (the baseline of the benchmarks; it takes no seed: torch.manual_seed reproduces it),
- ``auto`` — the fastest one built for the tensors' device; the env var VDVAE_FAST_BACKEND overrides it.

Backward passes are separate custom ops that recompute everything from the saved inputs, so
each op saves only its inputs (and a seed) for backward.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Any

import torch

from . import philox, reference

BACKENDS = ("reference", "original", "triton", "cuda", "cpu", "auto")
EAGER_BACKENDS = ("reference", "original")  # plain PyTorch with autograd, no kernels
SUPPORTED_NUM_BITS = (5, 8)
MAX_MIXTURES = 32
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------------------------
# Backend discovery
# --------------------------------------------------------------------------------------------


def _load_extension() -> ModuleType | None:
    try:
        return importlib.import_module("vdvae_fast._C")
    except ImportError:
        return None


_EXTENSION = _load_extension()


def extension_built() -> bool:
    """Whether the compiled C++ extension (vdvae_fast._C) is importable."""
    return _EXTENSION is not None


def cuda_kernels_built() -> bool:
    """Whether the compiled extension includes the CUDA kernels."""
    return _EXTENSION is not None and bool(_EXTENSION.built_with_cuda())


# Looked up once: torch.compile traces through backend selection, and an import inside it would break the graph.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether Triton is importable (kernels run on CUDA, or on CPU under TRITON_INTERPRET=1)."""
    return _TRITON_FOUND


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on tensors of `device` in this installation, fastest first."""
    device = torch.device(device)
    found = []
    if device.type == "cuda":
        if cuda_kernels_built():
            found.append("cuda")
        if triton_available():
            found.append("triton")
    elif device.type == "cpu" and extension_built():
        found.append("cpu")
    found += EAGER_BACKENDS
    if device.type == "cpu" and triton_available() and _triton_interpreted():
        found.append("triton")  # the interpreter is for tests: slower than eager, never chosen by auto
    return found


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Turn `backend` (possibly ``auto``) into a concrete backend that can run on `device`, or raise.

    float64 (for gradcheck) runs on the cpu and reference backends only; ``auto`` picks between those.
    """
    if dtype == torch.float64:
        if backend in ("triton", "cuda"):
            raise TypeError(f"the {backend} backend computes in float32; use float32/bfloat16/float16 inputs")
        if backend == "auto" and not os.environ.get("VDVAE_FAST_BACKEND") and device.type != "cpu":
            return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        override = os.environ.get("VDVAE_FAST_BACKEND")
        if override:
            if override not in BACKENDS or override == "auto":
                raise ValueError(
                    f"VDVAE_FAST_BACKEND={override!r} is not a backend; choose one of "
                    f"{', '.join(b for b in BACKENDS if b != 'auto')}"
                )
            backend = override
        else:
            return available_backends(device)[0]
    if backend not in available_backends(device):
        raise ValueError(
            f"backend {backend!r} cannot run on {device.type} tensors here: {_why_missing(backend, device)}"
        )
    return backend


def _why_missing(backend: str, device: torch.device) -> str:
    if backend == "cpu":
        if device.type != "cpu":
            return "the cpu backend takes CPU tensors"
        return "the C++ extension vdvae_fast._C is not built (pip install --no-build-isolation -e .)"
    if backend == "cuda":
        if device.type != "cuda":
            return "the cuda backend takes CUDA tensors"
        return "the extension was built without CUDA kernels (needs CUDA torch and nvcc at build time)"
    if not triton_available():
        return "triton is not installed"
    return "Triton runs on CUDA tensors, or on CPU tensors only with TRITON_INTERPRET=1"


def _kernels(backend: str, op: str) -> Any:
    """The object whose attributes are `op`'s kernels for a concrete compiled backend."""
    if backend == "triton":
        return importlib.import_module(f"vdvae_fast.kernels.{op}")
    return torch.ops.vdvae_fast_C


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def _check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")
    return next(iter(devices.values()))


def _check_dmol_logits(logits: torch.Tensor) -> int:
    _check_float("logits", logits)
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, 10*M, H, W), got shape {tuple(logits.shape)}")
    channels = logits.shape[1]
    if channels % 10 != 0 or not 1 <= channels // 10 <= MAX_MIXTURES:
        raise ValueError(
            f"logits has {channels} channels; the DMoL needs 10*M channels for M mixtures, 1 <= M <= {MAX_MIXTURES}"
        )
    return channels // 10


def _check_num_bits(num_bits: int) -> None:
    if num_bits not in SUPPORTED_NUM_BITS:
        raise ValueError(f"num_bits must be one of {SUPPORTED_NUM_BITS}, got {num_bits!r}")


def _check_image_target(x: torch.Tensor) -> None:
    """Raises unless every target value lies in [-1, 1] (NaN included). Synchronizes a GPU."""
    if not bool(((x >= -1.0) & (x <= 1.0)).all()):
        low, high = float(x.min()), float(x.max())
        raise ValueError(f"x must lie in [-1, 1] (images scaled as VDVAE does), got values in [{low}, {high}]")


def _dense_layout(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in one dense layout the elementwise kernels take: the first one's if it is
    contiguous or channels_last, else contiguous. Copies only tensors not already in that layout."""
    fmt = _format_of(tensors[0])
    return tuple(t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt) for t in tensors)


def _format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out that way (and not also contiguous), else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _check_gaussians(**tensors: torch.Tensor) -> torch.device:
    for name, t in tensors.items():
        _check_float(name, t)
    shapes = {tuple(t.shape) for t in tensors.values()}
    if len(shapes) > 1:
        listed = ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items())
        raise ValueError(f"the Gaussian parameters must share one shape, got {listed}")
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1:
        listed = ", ".join(f"{name} {t.dtype}" for name, t in tensors.items())
        raise TypeError(f"the Gaussian parameters must share one dtype, got {listed}")
    first = next(iter(tensors.values()))
    if first.dim() < 1:
        raise ValueError("the Gaussian parameters need a batch dimension, got 0-d tensors")
    if first.numel() >= philox.MAX_COUNTER:
        raise ValueError(f"{first.numel()} elements exceed the 2**32 counters of one random draw; split the tensor")
    return _check_same_device(**tensors)


def _seed_tensor(seed: int | None, backend: str) -> torch.Tensor | None:
    """The seed as a 0-d CPU tensor (drawn from torch's generator when None); None for the original backend."""
    if backend == "original":
        if seed is not None:
            raise ValueError(
                "the original backend draws from torch's generator and takes no seed; use torch.manual_seed"
            )
        return None
    if seed is None:
        return philox.draw_seed()
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return torch.tensor(int(seed), dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# dmol_nll
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("vdvae_fast::dmol_nll", mutates_args=())
def _dmol_nll(logits: torch.Tensor, x: torch.Tensor, num_bits: int, backend: str) -> torch.Tensor:
    return _kernels(backend, "dmol_nll").dmol_nll_forward(logits, x, num_bits)


@_dmol_nll.register_fake
def _(logits: torch.Tensor, x: torch.Tensor, num_bits: int, backend: str) -> torch.Tensor:
    return logits.new_empty((logits.shape[0],), dtype=reference.compute_dtype(logits.dtype))


@torch.library.custom_op("vdvae_fast::dmol_nll_backward", mutates_args=())
def _dmol_nll_backward(
    grad_nll: torch.Tensor, logits: torch.Tensor, x: torch.Tensor, num_bits: int, backend: str
) -> torch.Tensor:
    return _kernels(backend, "dmol_nll").dmol_nll_backward(grad_nll, logits, x, num_bits)


@_dmol_nll_backward.register_fake
def _(grad_nll: torch.Tensor, logits: torch.Tensor, x: torch.Tensor, num_bits: int, backend: str) -> torch.Tensor:
    return torch.empty_like(logits)


def _dmol_nll_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    logits, x, num_bits, backend = inputs
    ctx.save_for_backward(logits, x)
    ctx.num_bits, ctx.backend = num_bits, backend


def _dmol_nll_grad(ctx: Any, grad_nll: torch.Tensor) -> tuple:
    logits, x = ctx.saved_tensors
    grad = _dmol_nll_backward(grad_nll.contiguous(), logits, x, ctx.num_bits, ctx.backend)
    return grad, None, None, None


_dmol_nll.register_autograd(_dmol_nll_grad, setup_context=_dmol_nll_setup)


def dmol_nll(
    logits: torch.Tensor,
    x: torch.Tensor,
    *,
    num_bits: int = 8,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """−log p(x) of images under VDVAE's discretized mixture of logistics, in nats per dimension.

    logits: (B, 10·M, H, W) as the model's output conv produces them (any float dtype, contiguous or
    channels_last); x: (B, 3, H, W) targets in [−1, 1]. Returns float32 of shape (B,). x is data: it
    gets no gradient. check_inputs=False skips the [−1, 1] range check, which synchronizes a GPU (it is
    also skipped while torch.compile traces). NaN logits give a NaN loss, so a trainer can skip the step.
    """
    _check_dmol_logits(logits)
    _check_float("x", x)
    _check_num_bits(num_bits)
    device = _check_same_device(logits=logits, x=x)
    batch, _, height, width = logits.shape
    if tuple(x.shape) != (batch, 3, height, width):
        raise ValueError(
            f"x must be (B, 3, H, W) = {(batch, 3, height, width)} to match logits {tuple(logits.shape)}, "
            f"got {tuple(x.shape)}"
        )
    if check_inputs and not torch.compiler.is_compiling():
        _check_image_target(x)
    backend = resolve_backend(backend, device, logits.dtype)
    if backend in EAGER_BACKENDS:
        return reference.dmol_nll(logits, x, num_bits=num_bits)
    x = x.detach().to(reference.compute_dtype(logits.dtype))
    return _dmol_nll(logits, x, num_bits, backend)


# --------------------------------------------------------------------------------------------
# dmol_sample
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("vdvae_fast::dmol_sample", mutates_args=())
def _dmol_sample(logits: torch.Tensor, seed: torch.Tensor, backend: str) -> torch.Tensor:
    return _kernels(backend, "dmol_sample").dmol_sample(logits, int(seed.item()))


@_dmol_sample.register_fake
def _(logits: torch.Tensor, seed: torch.Tensor, backend: str) -> torch.Tensor:
    batch, _, height, width = logits.shape
    return logits.new_empty((batch, 3, height, width), dtype=torch.float32)


def dmol_sample(logits: torch.Tensor, *, seed: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Draw an image from the DMoL: (B, 3, H, W) float32 in [−1, 1]; not differentiable.

    The seed defaults to a draw from torch's default generator (torch.manual_seed reproduces it).
    """
    _check_dmol_logits(logits)
    device = logits.device
    if logits.shape[0] * logits.shape[2] * logits.shape[3] >= philox.MAX_COUNTER:
        raise ValueError("more than 2**32 pixels in one dmol_sample call; split the batch")
    backend = resolve_backend(backend, device, logits.dtype)
    seed_t = _seed_tensor(seed, backend)
    logits = logits.detach()
    if backend in EAGER_BACKENDS:
        return reference.dmol_sample(logits, seed=seed_t, backend=backend)
    return _dmol_sample(logits, seed_t, backend)


# --------------------------------------------------------------------------------------------
# gaussian_kl
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("vdvae_fast::gaussian_kl", mutates_args=())
def _gaussian_kl(
    mu_q: torch.Tensor, logsigma_q: torch.Tensor, mu_p: torch.Tensor, logsigma_p: torch.Tensor, backend: str
) -> torch.Tensor:
    return _kernels(backend, "gaussian_kl").gaussian_kl_forward(mu_q, logsigma_q, mu_p, logsigma_p)


@_gaussian_kl.register_fake
def _(mu_q: torch.Tensor, logsigma_q: torch.Tensor, mu_p: torch.Tensor, logsigma_p: torch.Tensor, backend: str):
    return torch.empty_like(mu_q, dtype=reference.compute_dtype(mu_q.dtype))


@torch.library.custom_op("vdvae_fast::gaussian_kl_backward", mutates_args=())
def _gaussian_kl_backward(
    grad_kl: torch.Tensor,
    mu_q: torch.Tensor,
    logsigma_q: torch.Tensor,
    mu_p: torch.Tensor,
    logsigma_p: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels(backend, "gaussian_kl").gaussian_kl_backward(grad_kl, mu_q, logsigma_q, mu_p, logsigma_p)


@_gaussian_kl_backward.register_fake
def _(grad_kl, mu_q, logsigma_q, mu_p, logsigma_p, backend):
    return tuple(torch.empty_like(t) for t in (mu_q, logsigma_q, mu_p, logsigma_p))


def _gaussian_kl_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    *params, backend = inputs
    ctx.save_for_backward(*params)
    ctx.backend = backend


def _gaussian_kl_grad(ctx: Any, grad_kl: torch.Tensor) -> tuple:
    params = ctx.saved_tensors
    grad_kl = grad_kl.contiguous(memory_format=_format_of(params[0]))
    grads = _gaussian_kl_backward(grad_kl, *params, ctx.backend)
    return (*grads, None)


_gaussian_kl.register_autograd(_gaussian_kl_grad, setup_context=_gaussian_kl_setup)


def gaussian_kl(
    mu_q: torch.Tensor,
    logsigma_q: torch.Tensor,
    mu_p: torch.Tensor,
    logsigma_p: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """KL(q‖p) of diagonal Gaussians, elementwise (float32), differentiable in all four parameters."""
    device = _check_gaussians(mu_q=mu_q, logsigma_q=logsigma_q, mu_p=mu_p, logsigma_p=logsigma_p)
    backend = resolve_backend(backend, device, mu_q.dtype)
    if backend in EAGER_BACKENDS:
        return reference.gaussian_kl(mu_q, logsigma_q, mu_p, logsigma_p)
    return _gaussian_kl(*_dense_layout(mu_q, logsigma_q, mu_p, logsigma_p), backend)


# --------------------------------------------------------------------------------------------
# sample_and_kl
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("vdvae_fast::sample_and_kl", mutates_args=())
def _sample_and_kl(
    mu_q: torch.Tensor,
    logsigma_q: torch.Tensor,
    mu_p: torch.Tensor,
    logsigma_p: torch.Tensor,
    seed: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    kernels = _kernels(backend, "sample_and_kl")
    return kernels.sample_and_kl_forward(mu_q, logsigma_q, mu_p, logsigma_p, int(seed.item()))


@_sample_and_kl.register_fake
def _(mu_q, logsigma_q, mu_p, logsigma_p, seed, backend):
    return torch.empty_like(mu_q), mu_q.new_empty((mu_q.shape[0],), dtype=reference.compute_dtype(mu_q.dtype))


@torch.library.custom_op("vdvae_fast::sample_and_kl_backward", mutates_args=())
def _sample_and_kl_backward(
    grad_z: torch.Tensor,
    grad_kl: torch.Tensor,
    mu_q: torch.Tensor,
    logsigma_q: torch.Tensor,
    mu_p: torch.Tensor,
    logsigma_p: torch.Tensor,
    seed: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    kernels = _kernels(backend, "sample_and_kl")
    return kernels.sample_and_kl_backward(grad_z, grad_kl, mu_q, logsigma_q, mu_p, logsigma_p, int(seed.item()))


@_sample_and_kl_backward.register_fake
def _(grad_z, grad_kl, mu_q, logsigma_q, mu_p, logsigma_p, seed, backend):
    return tuple(torch.empty_like(t) for t in (mu_q, logsigma_q, mu_p, logsigma_p))


def _sample_and_kl_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    mu_q, logsigma_q, mu_p, logsigma_p, seed, backend = inputs
    ctx.save_for_backward(mu_q, logsigma_q, mu_p, logsigma_p, seed)
    ctx.backend = backend


def _sample_and_kl_grad(ctx: Any, grad_z: torch.Tensor | None, grad_kl: torch.Tensor | None) -> tuple:
    mu_q, logsigma_q, mu_p, logsigma_p, seed = ctx.saved_tensors
    grad_z = torch.zeros_like(mu_q) if grad_z is None else grad_z.contiguous(memory_format=_format_of(mu_q))
    if grad_kl is None:
        grad_kl = mu_q.new_zeros((mu_q.shape[0],), dtype=reference.compute_dtype(mu_q.dtype))
    grads = _sample_and_kl_backward(grad_z, grad_kl.contiguous(), mu_q, logsigma_q, mu_p, logsigma_p, seed, ctx.backend)
    return (*grads, None, None)


_sample_and_kl.register_autograd(_sample_and_kl_grad, setup_context=_sample_and_kl_setup)


def sample_and_kl(
    mu_q: torch.Tensor,
    logsigma_q: torch.Tensor,
    mu_p: torch.Tensor,
    logsigma_p: torch.Tensor,
    *,
    seed: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic layer: z = μq + σq·ε (input dtype) and Σ KL(q‖p) per image (float32, shape (B,)).

    One fused kernel forward and one backward; ε is regenerated from the seed, never stored.
    """
    device = _check_gaussians(mu_q=mu_q, logsigma_q=logsigma_q, mu_p=mu_p, logsigma_p=logsigma_p)
    backend = resolve_backend(backend, device, mu_q.dtype)
    seed_t = _seed_tensor(seed, backend)
    if backend in EAGER_BACKENDS:
        return reference.sample_and_kl(mu_q, logsigma_q, mu_p, logsigma_p, seed=seed_t, backend=backend)
    return _sample_and_kl(*_dense_layout(mu_q, logsigma_q, mu_p, logsigma_p), seed_t, backend)


# --------------------------------------------------------------------------------------------
# sample_gaussian
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("vdvae_fast::sample_gaussian", mutates_args=())
def _sample_gaussian(
    mu: torch.Tensor, logsigma: torch.Tensor, temperature: float, seed: torch.Tensor, backend: str
) -> torch.Tensor:
    kernels = _kernels(backend, "sample_gaussian")
    return kernels.sample_gaussian_forward(mu, logsigma, temperature, int(seed.item()))


@_sample_gaussian.register_fake
def _(mu, logsigma, temperature, seed, backend):
    return torch.empty_like(mu)


@torch.library.custom_op("vdvae_fast::sample_gaussian_backward", mutates_args=())
def _sample_gaussian_backward(
    grad_z: torch.Tensor,
    mu: torch.Tensor,
    logsigma: torch.Tensor,
    temperature: float,
    seed: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    kernels = _kernels(backend, "sample_gaussian")
    return kernels.sample_gaussian_backward(grad_z, mu, logsigma, temperature, int(seed.item()))


@_sample_gaussian_backward.register_fake
def _(grad_z, mu, logsigma, temperature, seed, backend):
    return torch.empty_like(mu), torch.empty_like(logsigma)


def _sample_gaussian_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    mu, logsigma, temperature, seed, backend = inputs
    ctx.save_for_backward(mu, logsigma, seed)
    ctx.temperature, ctx.backend = temperature, backend


def _sample_gaussian_grad(ctx: Any, grad_z: torch.Tensor) -> tuple:
    mu, logsigma, seed = ctx.saved_tensors
    grad_z = grad_z.contiguous(memory_format=_format_of(mu))
    grads = _sample_gaussian_backward(grad_z, mu, logsigma, ctx.temperature, seed, ctx.backend)
    return (*grads, None, None, None)


_sample_gaussian.register_autograd(_sample_gaussian_grad, setup_context=_sample_gaussian_setup)


def sample_gaussian(
    mu: torch.Tensor,
    logsigma: torch.Tensor,
    *,
    temperature: float = 1.0,
    seed: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """z = μ + t·σ·ε for prior sampling at temperature t (VDVAE adds log t to logσ); input dtype."""
    device = _check_gaussians(mu=mu, logsigma=logsigma)
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    backend = resolve_backend(backend, device, mu.dtype)
    seed_t = _seed_tensor(seed, backend)
    if backend in EAGER_BACKENDS:
        return reference.sample_gaussian(mu, logsigma, temperature=temperature, seed=seed_t, backend=backend)
    return _sample_gaussian(*_dense_layout(mu, logsigma), float(temperature), seed_t, backend)
