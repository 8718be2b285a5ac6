"""Public functional API of the fused ops: input checks, backend choice, dispatch and autograd.

Backends:

- ``cpu``  — C++ kernels of vdvae_fast._C (torch.ops.vdvae_fast_C) on CPU tensors,
- ``cuda`` — CUDA kernels of the same extension on CUDA tensors; both wrapped in torch.library custom ops,
  which torch.compile traces as opaque calls (no graph breaks),
- ``triton`` — the Triton kernels of vdvae_fast.kernels, registered with torch.library.triton_op so that
  torch.compile sees the kernels themselves and can fuse around them (CUDA tensors, or CPU tensors under
  TRITON_INTERPRET=1),
- ``reference`` — the eager formulas of vdvae_fast.reference with plain autograd (the oracle),
- ``original`` — the same formulas with torch's own generator for the noise, as openai/vdvae runs them
  (the baseline of the benchmarks; it takes no seed: torch.manual_seed reproduces it),
- ``auto`` — on CUDA tensors the backend AUTO_TABLE names for the op, layout and dtype, or whichever compiled
  backend is built; on CPU tensors the C++ kernels when built. The env var VDVAE_FAST_BACKEND overrides it.

Backward passes are separate ops that recompute everything from the saved inputs, so each op saves only its
inputs (and a seed) for backward. The torch.library ops are what torch.compile sees; eager calls run the same
kernels and autograd formula without their Python dispatch (_EntryPoint).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import math
import numbers
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from . import philox, reference

BACKENDS = ("reference", "original", "triton", "cuda", "cpu", "auto")
EAGER_BACKENDS = ("reference", "original")  # plain PyTorch with autograd, no kernels
SUPPORTED_NUM_BITS = (5, 8)
MAX_MIXTURES = 32
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------------------------
# Backend discovery and choice
# --------------------------------------------------------------------------------------------


def _load_extension() -> ModuleType | None:
    try:
        return importlib.import_module("vdvae_fast._C")
    except ImportError:
        return None


_EXTENSION = _load_extension()
# Looked up once: torch.compile traces through backend selection, and an import inside it would break the graph.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def extension_built() -> bool:
    """Whether the compiled C++ extension (vdvae_fast._C) is importable."""
    return _EXTENSION is not None


def cuda_kernels_built() -> bool:
    """Whether the compiled extension includes the CUDA kernels."""
    return _EXTENSION is not None and bool(_EXTENSION.built_with_cuda())


def triton_available() -> bool:
    """Whether Triton is importable (kernels run on CUDA, or on CPU under TRITON_INTERPRET=1)."""
    return _TRITON_FOUND


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on tensors of `device` here: compiled ones first, then the eager ones.

    Empty for CUDA without a usable GPU (no tensor can live there); only the eager ones for meta tensors,
    which have shapes but no values (FLOP counting, shape inference)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return []
    if device.type == "cuda":
        compiled = [name for name, built in (("cuda", cuda_kernels_built()), ("triton", _TRITON_FOUND)) if built]
        return compiled + list(EAGER_BACKENDS)
    found = ["cpu"] if device.type == "cpu" and extension_built() else []
    found += EAGER_BACKENDS
    if device.type == "cpu" and _TRITON_FOUND and _triton_interpreted():
        found.append("triton")  # the interpreter is for tests: slower than eager, never chosen by auto
    return found


# Which backend `auto` runs on CUDA tensors: (op, layout) -> backend for float32, bfloat16, float16 inputs.
# To be set from measurements: benchmarks/run_gpu.sh prints each case's winner beside auto_table(). Until the
# first GPU results these rows keep the order auto used before (cuda, then triton). A backend that is not
# built falls back to the other compiled one.
_AUTO_ROWS: dict[tuple[str, str], tuple[str, str, str]] = {
    ("dmol_nll", "contiguous"): ("cuda", "cuda", "cuda"),
    ("dmol_nll", "channels_last"): ("cuda", "cuda", "cuda"),
    ("dmol_sample", "contiguous"): ("cuda", "cuda", "cuda"),
    ("dmol_sample", "channels_last"): ("cuda", "cuda", "cuda"),
    ("gaussian_kl", "contiguous"): ("cuda", "cuda", "cuda"),
    ("gaussian_kl", "channels_last"): ("cuda", "cuda", "cuda"),
    ("sample_and_kl", "contiguous"): ("cuda", "cuda", "cuda"),
    ("sample_and_kl", "channels_last"): ("cuda", "cuda", "cuda"),
    ("sample_gaussian", "contiguous"): ("cuda", "cuda", "cuda"),
    ("sample_gaussian", "channels_last"): ("cuda", "cuda", "cuda"),
}
_AUTO_DTYPES = ("float32", "bfloat16", "float16")
AUTO_TABLE: dict[tuple[str, str, str], str] = {
    (op, layout, dtype): row[i] for (op, layout), row in _AUTO_ROWS.items() for i, dtype in enumerate(_AUTO_DTYPES)
}


def auto_table() -> dict[tuple[str, str, str], str]:
    """A copy of the table `auto` follows on CUDA: (op, layout, dtype name) -> backend."""
    return dict(AUTO_TABLE)


def layout_of(t: Tensor) -> str:
    """The layout name AUTO_TABLE is keyed by: 'channels_last' or 'contiguous'."""
    return "channels_last" if reference.is_channels_last(t) else "contiguous"


def resolve_backend(
    backend: str,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    *,
    op: str | None = None,
    layout: str = "contiguous",
) -> str:
    """Turn `backend` (possibly ``auto``) into a concrete backend that can run on `device`, or raise.

    `op` and `layout` select auto's row of AUTO_TABLE on CUDA; without them auto takes the first built backend.
    float64 (for gradcheck) runs on the cpu and reference backends only; ``auto`` picks between those.
    """
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = _backend_from_env() or _auto_backend(device, dtype, op, layout)
    if backend not in available_backends(device):
        raise ValueError(f"backend {backend!r} cannot run on {device} tensors here: {_why_missing(backend, device)}")
    if dtype == torch.float64 and backend in ("triton", "cuda"):
        raise TypeError(f"the {backend} backend computes in float32; use float32/bfloat16/float16 inputs")
    if backend == "triton":
        _ensure_triton_ops()
    return backend


def _backend_from_env() -> str | None:
    override = os.environ.get("VDVAE_FAST_BACKEND")
    if override and (override not in BACKENDS or override == "auto"):
        choices = ", ".join(b for b in BACKENDS if b != "auto")
        raise ValueError(f"VDVAE_FAST_BACKEND={override!r} is not a backend; choose one of {choices}")
    return override or None


def _auto_backend(device: torch.device, dtype: torch.dtype, op: str | None, layout: str) -> str:
    available = available_backends(device)
    if not available:
        raise ValueError(f"no backend runs on {device} tensors here: {_why_missing('auto', device)}")
    if dtype == torch.float64:
        return "cpu" if "cpu" in available else "reference"
    preferred = AUTO_TABLE.get((op, layout, str(dtype).removeprefix("torch.")))
    return preferred if device.type == "cuda" and preferred in available else available[0]


def _why_missing(backend: str, device: torch.device) -> str:
    if device.type == "meta":
        return "meta tensors hold no values, which only the eager backends (reference, original) can do without"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is usable (torch.cuda.is_available() is False)"
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


# --------------------------------------------------------------------------------------------
# Kernel entry points as torch.library ops, one per backend family
# --------------------------------------------------------------------------------------------


def _device_guard(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device, which need not be the tensors' (cuda:1)."""
    if t.device.type == "cuda" and torch.cuda.device_count() > 1:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _launching(launch: Callable, signature: inspect.Signature) -> Callable:
    """An op body with `signature`: the seed goes to the kernels as a scalar (a SymInt while torch.compile
    traces a triton_op), the launch happens on the inputs' device."""
    seed_at = list(signature.parameters).index("seed") if "seed" in signature.parameters else None

    def body(*args: Any) -> Any:
        if seed_at is not None:
            args = (*args[:seed_at], args[seed_at].item(), *args[seed_at + 1 :])
        with _device_guard(args[0]):
            return launch(*args)

    body.__signature__ = signature  # the schema torch.library infers
    return body


class _EntryPoint:
    """One kernel entry point on each backend family. `library[family]` is its torch.library op, which
    torch.compile traces: a custom op for the extension's kernels (cpu and cuda), a triton_op on
    vdvae_fast.kernels.<module>.<name> once _register_triton_ops ran. Eager calls skip the library op's Python
    dispatch (30-50 µs a forward and backward, more than a small layer's kernels take) and run the launch the
    op wraps, through an autograd.Function with the same formula where the op has a backward.
    `fake` computes the outputs' metadata; its signature is the ops' schema. `autograd` is (backward entry point,
    setup, grad) for a differentiable forward."""

    def __init__(self, module: str, name: str, fake: Callable) -> None:
        self.module, self.name, self.fake = module, name, fake
        self.library: dict[str, Any] = {}
        self.launch: dict[str, Callable] = {}
        self.function: dict[str, type[torch.autograd.Function]] = {}
        self.autograd: tuple[_EntryPoint, Callable, Callable] | None = None

    def __call__(self, backend: str, *args: Any) -> Any:
        family = "triton" if backend == "triton" else "extension"
        if torch.compiler.is_compiling():
            return self.library[family](*args)
        function = self.function.get(family)
        return function.apply(*args) if function is not None else self.launch[family](*args)

    def add(self, family: str, op_name: str, register: Callable, launch: Callable) -> None:
        """Registers `launch` as library op `op_name` with `register` (torch.library.custom_op or triton_op)."""
        library_op = register(op_name, launch, mutates_args=())
        library_op.register_fake(self.fake)  # the explicit contract, not a trace of the launcher
        self.library[family], self.launch[family] = library_op, _profiled(op_name, launch)

    def add_autograd(self, family: str) -> None:
        """The formula `grad` (calling the backward entry point's op) on one family's library op and eager function."""
        backward, setup, grad = self.autograd
        self.library[family].register_autograd(functools.partial(grad, backward.library[family]), setup_context=setup)
        self.function[family] = _eager_function(
            self.name, self.launch[family], backward.launch[family], backward.library[family], setup, grad
        )


def _profiled(name: str, launch: Callable) -> Callable:
    """`launch`, which an active torch profiler records under `name`, the library op's name, as it would the op."""

    def run(*args: Any) -> Any:
        if not torch._C._autograd._profiler_enabled():
            return launch(*args)
        with torch.profiler.record_function(name):
            return launch(*args)

    return run


_ENTRY_POINTS: list[_EntryPoint] = []


def _kernel_ops(module: str, name: str, fake: Callable) -> _EntryPoint:
    """Kernel entry point `name` of op `module`, with the extension's op (torch.ops.vdvae_fast_C.<name>, looked up
    at call time: the extension is optional) registered now."""
    entry = _EntryPoint(module, name, fake)

    def compiled_launch(*args: Any) -> Any:
        return getattr(torch.ops.vdvae_fast_C, name)(*args)

    launch = _launching(compiled_launch, inspect.signature(fake))
    entry.add("extension", f"vdvae_fast::{name}", torch.library.custom_op, launch)
    _ENTRY_POINTS.append(entry)
    return entry


def _eager_function(
    name: str, forward: Callable, backward: Callable, backward_library: Callable, setup: Callable, grad: Callable
) -> type[torch.autograd.Function]:
    """The library op's autograd as an autograd.Function named `name` (its grad_fn is `name`Backward), in the
    style whose forward takes ctx: apply then skips binding the arguments to forward's signature, which costs as
    much as the rest of the call."""

    def forward_and_setup(ctx: Any, *args: Any) -> Any:
        output = forward(*args)
        setup(ctx, args, output)
        return output

    def backward_formula(ctx: Any, *grads: Any) -> Any:
        # Under create_graph, the library op: the backward kernels have no derivative, and its missing formula
        # raises if one is taken, where the launch's outputs would silently leave the graph.
        return grad(backward_library if torch.is_grad_enabled() else backward, ctx, *grads)

    methods = {"forward": staticmethod(forward_and_setup), "backward": staticmethod(backward_formula)}
    return type(name, (torch.autograd.Function,), methods)


def _register_autograd(forward: _EntryPoint, backward: _EntryPoint, setup: Callable, grad: Callable) -> None:
    """The same autograd formula on each backend family's forward, calling that family's backward."""
    forward.autograd = (backward, setup, grad)
    forward.add_autograd("extension")


def _register_triton_ops() -> None:
    """Every entry point as a triton_op (torch.compile traces into it and sees the kernels), with autograd."""
    for entry in _ENTRY_POINTS:
        launch = getattr(importlib.import_module(f"vdvae_fast.kernels.{entry.module}"), entry.name)
        body = _launching(launch, inspect.signature(entry.fake))
        entry.add("triton", f"vdvae_fast::{entry.name}_triton", torch.library.triton_op, body)
    for entry in _ENTRY_POINTS:
        if entry.autograd is not None:
            entry.add_autograd("triton")


def _ensure_triton_ops() -> None:
    """Registers the Triton ops on first use where the import did not: registering imports torch._inductor
    (about a second), which a machine that cannot run Triton at import time should not pay."""
    if "triton" in _ENTRY_POINTS[0].library:
        return
    if torch.compiler.is_compiling():
        raise RuntimeError("call a vdvae_fast op with backend='triton' once before torch.compile traces one")
    _register_triton_ops()


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def _check_device(**tensors: Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")
    return next(iter(devices.values()))


def _checks_values(check_inputs: bool, device: torch.device) -> bool:
    """Whether to run the checks that read values: asked for, not while torch.compile traces (they
    synchronize a GPU), and not on meta tensors (which have none)."""
    return check_inputs and device.type != "meta" and not torch.compiler.is_compiling()


def _check_dmol_logits(logits: Tensor) -> int:
    _check_float("logits", logits)
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, 10*M, H, W), got shape {tuple(logits.shape)}")
    channels = logits.shape[1]
    if channels % 10 != 0 or not 1 <= channels // 10 <= MAX_MIXTURES:
        raise ValueError(
            f"logits has {channels} channels; the DMoL needs 10*M channels for M mixtures, 1 <= M <= {MAX_MIXTURES}"
        )
    return channels // 10


def _check_num_bits(num_bits: int) -> int:
    if isinstance(num_bits, bool) or not isinstance(num_bits, numbers.Integral):
        raise TypeError(f"num_bits must be an int, one of {SUPPORTED_NUM_BITS}; got {num_bits!r}")
    if num_bits not in SUPPORTED_NUM_BITS:
        raise ValueError(f"num_bits must be one of {SUPPORTED_NUM_BITS}, got {num_bits!r}")
    return int(num_bits)


def _check_target_shape(logits: Tensor, x: Tensor) -> None:
    """x must match logits' batch and pixels, of which there must be some: the loss is per dimension."""
    batch, _, height, width = logits.shape
    if tuple(x.shape) != (batch, 3, height, width):
        raise ValueError(
            f"x must be (B, 3, H, W) = {(batch, 3, height, width)} to match logits {tuple(logits.shape)}, "
            f"got {tuple(x.shape)}"
        )
    if height == 0 or width == 0:
        raise ValueError(
            f"dmol_nll needs at least one pixel: the loss is per image dimension, got H={height}, W={width}"
        )


def _check_target_values(x: Tensor) -> None:
    """Raises unless every target value lies in [-1, 1] (NaN included). Synchronizes a GPU."""
    if not bool(((x >= -1.0) & (x <= 1.0)).all()):
        low, high = float(x.min()), float(x.max())
        raise ValueError(f"x must lie in [-1, 1] (images scaled as VDVAE does), got values in [{low}, {high}]")


def _check_finite(name: str, t: Tensor) -> None:
    """Raises unless every value is finite. Synchronizes a GPU."""
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        count = int((~finite).sum())
        raise ValueError(
            f"{name} has {count} non-finite values (NaN or ±Inf), so a sample would be meaningless; "
            "a diverged model gives NaN (check_inputs=False skips this check and gives NaN pixels)"
        )


def _check_gaussians(**tensors: Tensor) -> torch.device:
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
    if next(iter(tensors.values())).dim() < 1:
        raise ValueError("the Gaussian parameters need a batch dimension, got 0-d tensors")
    return _check_device(**tensors)


def _check_counters(count: int, what: str) -> None:
    """Ops that draw noise give each element (or pixel) one Philox counter of 2**32."""
    if count >= philox.MAX_COUNTER:
        raise ValueError(f"{count} {what} exceed the 2**32 counters of one random draw; split the call")


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number >= 0 (a Python float), got {temperature!r}")
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    return float(temperature)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _check_real(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (a Python float), got {value!r}")
    return float(value)


def _check_beta(beta: float) -> float:
    """The softplus sharpness of gradient smoothing, for the Gaussian and the DMoL scales alike."""
    beta = _check_real("beta", beta)
    if not (math.isfinite(beta) and beta > 0.0):
        raise ValueError(f"beta (the softplus sharpness of gradient smoothing) must be finite and > 0, got {beta!r}")
    return beta


def _parametrization(scale: str, beta: float, **choices: str) -> dict[str, Any]:
    """The checked Gaussian parametrization as the reference's keyword arguments (see reference.SCALES,
    POSTERIORS, KL_ESTIMATORS)."""
    known = {"posterior": reference.POSTERIORS, "kl_estimator": reference.KL_ESTIMATORS}
    checked = {name: _check_choice(name, value, known[name]) for name, value in choices.items()}
    return {"scale": _check_choice("scale", scale, reference.SCALES), "beta": _check_beta(beta), **checked}


_CODE_TABLES = {"scale": reference.SCALES, "posterior": reference.POSTERIORS, "kl_estimator": reference.KL_ESTIMATORS}


def _kernel_codes(parametrization: dict[str, Any]) -> tuple:
    """The checked parametrization as the kernels' trailing arguments, in their order (scale, beta[, posterior[,
    kl_estimator]]), each choice as its index in the reference's tuple."""
    return tuple(_CODE_TABLES[k].index(v) if k in _CODE_TABLES else v for k, v in parametrization.items())


def _seed_tensor(seed: int | None, backend: str) -> Tensor | None:
    """The seed as a 0-d int64 CPU tensor (drawn from torch's generator when None); None for the original backend."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int in [0, 2**{philox.SEED_BITS}) or None, got {seed!r}")
    if seed is not None and not 0 <= seed < 2**philox.SEED_BITS:
        raise ValueError(f"seed must be in [0, 2**{philox.SEED_BITS}), got {seed}")
    if backend == "original":
        if seed is not None:
            raise ValueError(
                "the original backend draws from torch's generator and takes no seed; use torch.manual_seed"
            )
        return None
    if seed is None:
        return philox.draw_seed()
    return torch.tensor(int(seed), dtype=torch.int64)


def _dense_layout(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in one dense layout the elementwise kernels take: the first one's if it is
    contiguous or channels_last, else contiguous. Copies only tensors not already in that layout."""
    fmt = reference.memory_format_of(tensors[0])
    return tuple(t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt) for t in tensors)


# --------------------------------------------------------------------------------------------
# dmol_nll
# --------------------------------------------------------------------------------------------


def _check_dmol_scale(scale: str, beta: float, log_scale_min: float) -> tuple[int, float, float]:
    """The DMoL scale options as the kernels take them: (index of scale in reference.SCALES, beta, floor)."""
    scale = _check_choice("scale", scale, reference.SCALES)
    beta = _check_beta(beta)
    log_scale_min = _check_real("log_scale_min", log_scale_min)
    if math.isnan(log_scale_min) or log_scale_min > 0.0:
        raise ValueError(
            f"log_scale_min must be <= 0 (VDVAE's -7.0) or -inf for no floor of the log-scales, got {log_scale_min}"
        )
    return reference.SCALES.index(scale), beta, log_scale_min


def _dmol_nll_forward_fake(
    logits: Tensor, x: Tensor, num_bits: int, scale: int, beta: float, log_scale_min: float
) -> Tensor:
    return logits.new_empty((logits.shape[0],), dtype=reference.compute_dtype(logits.dtype))


def _dmol_nll_backward_fake(
    grad_nll: Tensor, logits: Tensor, x: Tensor, num_bits: int, scale: int, beta: float, log_scale_min: float
) -> Tensor:
    return torch.empty_like(logits)


def _dmol_nll_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    logits, x, *options = inputs
    ctx.save_for_backward(logits, x)
    ctx.options = options  # num_bits, scale, beta, log_scale_min


def _dmol_nll_grad(backward: Callable, ctx: Any, grad_nll: Tensor) -> tuple:
    logits, x = ctx.saved_tensors
    return backward(grad_nll.contiguous(), logits, x, *ctx.options), None, *(None for _ in ctx.options)


_DMOL_NLL = _kernel_ops("dmol_nll", "dmol_nll_forward", _dmol_nll_forward_fake)
_DMOL_NLL_BACKWARD = _kernel_ops("dmol_nll", "dmol_nll_backward", _dmol_nll_backward_fake)
_register_autograd(_DMOL_NLL, _DMOL_NLL_BACKWARD, _dmol_nll_setup, _dmol_nll_grad)


def dmol_nll(
    logits: Tensor,
    x: Tensor,
    *,
    num_bits: int = 8,
    scale: str = "exp",
    beta: float = reference.SOFTPLUS_BETA,
    log_scale_min: float = reference.LOG_SCALE_MIN,
    backend: str = "auto",
    check_inputs: bool = True,
) -> Tensor:
    """−log p(x) of images under VDVAE's discretized mixture of logistics, in nats per dimension.

    logits: (B, 10·M, H, W) as the model's output conv produces them (any float dtype, contiguous or
    channels_last); x: (B, 3, H, W) targets in [−1, 1]. Returns float32 of shape (B,). x is data: it
    gets no gradient. check_inputs=False skips the [−1, 1] range check, which synchronizes a GPU (it is
    also skipped while torch.compile traces). NaN logits give a NaN loss, so a trainer can skip the step.

    The scales: scale="exp" (VDVAE: the raw channel is the log-scale) or "softplus" (Efficient-VDVAE's
    gradient smoothing: scale = log(1 + exp(beta·raw)) / beta, 1 at raw = 0 for the default beta = ln 2);
    log-scales below log_scale_min (VDVAE's -7; float("-inf"): no floor) are raised to it
    (reference.dmol_log_scales).
    """
    _check_dmol_logits(logits)
    _check_float("x", x)
    num_bits = _check_num_bits(num_bits)
    scale_options = _check_dmol_scale(scale, beta, log_scale_min)
    device = _check_device(logits=logits, x=x)
    _check_target_shape(logits, x)
    if _checks_values(check_inputs, device):
        _check_target_values(x)
    backend = resolve_backend(backend, device, logits.dtype, op="dmol_nll", layout=layout_of(logits))
    x = x.detach()
    if backend in EAGER_BACKENDS:
        return reference.dmol_nll(
            logits, x, num_bits=num_bits, scale=scale, beta=float(beta), log_scale_min=float(log_scale_min)
        )
    return _DMOL_NLL(backend, logits, x.to(reference.compute_dtype(logits.dtype)), num_bits, *scale_options)


# --------------------------------------------------------------------------------------------
# dmol_sample
# --------------------------------------------------------------------------------------------


def _dmol_sample_fake(logits: Tensor, scale: int, beta: float, log_scale_min: float, seed: Tensor) -> Tensor:
    batch, _, height, width = logits.shape
    fmt = reference.memory_format_of(logits)
    return logits.new_empty((batch, 3, height, width), dtype=torch.float32).contiguous(memory_format=fmt)


_DMOL_SAMPLE = _kernel_ops("dmol_sample", "dmol_sample", _dmol_sample_fake)


def dmol_sample(
    logits: Tensor,
    *,
    scale: str = "exp",
    beta: float = reference.SOFTPLUS_BETA,
    log_scale_min: float = reference.LOG_SCALE_MIN,
    seed: int | None = None,
    backend: str = "auto",
    check_inputs: bool = True,
) -> Tensor:
    """Draw an image from the DMoL: (B, 3, H, W) float32 in [−1, 1], in logits' layout; not differentiable.

    scale, beta and log_scale_min are dmol_nll's: sample with the options the model was trained with.
    The seed defaults to a draw from torch's default generator (torch.manual_seed reproduces it).
    Non-finite logits raise, since their pixels would be NaN; check_inputs=False skips that check, which
    synchronizes a GPU (it is also skipped while torch.compile traces).
    """
    _check_dmol_logits(logits)
    scale_options = _check_dmol_scale(scale, beta, log_scale_min)
    device = _check_device(logits=logits)
    batch, _, height, width = logits.shape
    _check_counters(batch * height * width, "pixels")
    if _checks_values(check_inputs, device):
        _check_finite("logits", logits)
    backend = resolve_backend(backend, device, logits.dtype, op="dmol_sample", layout=layout_of(logits))
    seed_t = _seed_tensor(seed, backend)
    logits = logits.detach()
    if backend in EAGER_BACKENDS:
        return reference.dmol_sample(
            logits, scale=scale, beta=float(beta), log_scale_min=float(log_scale_min), seed=seed_t, backend=backend
        )
    return _DMOL_SAMPLE(backend, logits, *scale_options, seed_t)


# --------------------------------------------------------------------------------------------
# gaussian_kl
# --------------------------------------------------------------------------------------------


def _gaussian_kl_forward_fake(
    mu_q: Tensor, logsigma_q: Tensor, mu_p: Tensor, logsigma_p: Tensor, scale: int, beta: float, posterior: int
) -> Tensor:
    return torch.empty_like(mu_q, dtype=reference.compute_dtype(mu_q.dtype))


def _gaussian_kl_backward_fake(
    grad_kl: Tensor,
    mu_q: Tensor,
    logsigma_q: Tensor,
    mu_p: Tensor,
    logsigma_p: Tensor,
    scale: int,
    beta: float,
    posterior: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(t) for t in (mu_q, logsigma_q, mu_p, logsigma_p))


def _gaussian_kl_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs[:4])
    ctx.codes = inputs[4:]


def _gaussian_kl_grad(backward: Callable, ctx: Any, grad_kl: Tensor) -> tuple:
    params = ctx.saved_tensors
    grad_kl = grad_kl.contiguous(memory_format=reference.memory_format_of(params[0]))
    return (*backward(grad_kl, *params, *ctx.codes), None, None, None)


_GAUSSIAN_KL = _kernel_ops("gaussian_kl", "gaussian_kl_forward", _gaussian_kl_forward_fake)
_GAUSSIAN_KL_BACKWARD = _kernel_ops("gaussian_kl", "gaussian_kl_backward", _gaussian_kl_backward_fake)
_register_autograd(_GAUSSIAN_KL, _GAUSSIAN_KL_BACKWARD, _gaussian_kl_setup, _gaussian_kl_grad)


def gaussian_kl(
    mu_q: Tensor,
    logsigma_q: Tensor,
    mu_p: Tensor,
    logsigma_p: Tensor,
    *,
    scale: str = "exp",
    beta: float = reference.SOFTPLUS_BETA,
    posterior: str = "direct",
    backend: str = "auto",
) -> Tensor:
    """KL(q‖p) of diagonal Gaussians, elementwise (float32), differentiable in all four parameters.

    With the defaults the inputs are (μq, log σq, μp, log σp). scale="softplus" takes σ = softplus_β(raw)
    (Efficient-VDVAE's gradient smoothing); posterior="residual" (NVAE) or "precision_weighted" (Ladder VAE)
    reads the first two inputs as the posterior network's output combined with the prior
    (reference.posterior_and_prior).
    """
    device = _check_gaussians(mu_q=mu_q, logsigma_q=logsigma_q, mu_p=mu_p, logsigma_p=logsigma_p)
    parametrization = _parametrization(scale, beta, posterior=posterior)
    backend = resolve_backend(backend, device, mu_q.dtype, op="gaussian_kl", layout=layout_of(mu_q))
    if backend in EAGER_BACKENDS:
        return reference.gaussian_kl(mu_q, logsigma_q, mu_p, logsigma_p, **parametrization)
    return _GAUSSIAN_KL(backend, *_dense_layout(mu_q, logsigma_q, mu_p, logsigma_p), *_kernel_codes(parametrization))


# --------------------------------------------------------------------------------------------
# sample_and_kl
# --------------------------------------------------------------------------------------------


def _sample_and_kl_forward_fake(
    mu_q: Tensor,
    logsigma_q: Tensor,
    mu_p: Tensor,
    logsigma_p: Tensor,
    seed: Tensor,
    scale: int,
    beta: float,
    posterior: int,
    kl_estimator: int,
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(mu_q), mu_q.new_empty((mu_q.shape[0],), dtype=reference.compute_dtype(mu_q.dtype))


def _sample_and_kl_backward_fake(
    grad_z: Tensor,
    grad_kl: Tensor,
    mu_q: Tensor,
    logsigma_q: Tensor,
    mu_p: Tensor,
    logsigma_p: Tensor,
    seed: Tensor,
    scale: int,
    beta: float,
    posterior: int,
    kl_estimator: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(t) for t in (mu_q, logsigma_q, mu_p, logsigma_p))


def _sample_and_kl_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(*inputs[:5])
    ctx.codes = inputs[5:]


def _sample_and_kl_grad(backward: Callable, ctx: Any, grad_z: Tensor | None, grad_kl: Tensor | None) -> tuple:
    mu_q, logsigma_q, mu_p, logsigma_p, seed = ctx.saved_tensors
    fmt = reference.memory_format_of(mu_q)
    grad_z = torch.zeros_like(mu_q) if grad_z is None else grad_z.contiguous(memory_format=fmt)
    if grad_kl is None:
        grad_kl = mu_q.new_zeros((mu_q.shape[0],), dtype=reference.compute_dtype(mu_q.dtype))
    grads = backward(grad_z, grad_kl.contiguous(), mu_q, logsigma_q, mu_p, logsigma_p, seed, *ctx.codes)
    return (*grads, None, None, None, None, None)


_SAMPLE_AND_KL = _kernel_ops("sample_and_kl", "sample_and_kl_forward", _sample_and_kl_forward_fake)
_SAMPLE_AND_KL_BACKWARD = _kernel_ops("sample_and_kl", "sample_and_kl_backward", _sample_and_kl_backward_fake)
_register_autograd(_SAMPLE_AND_KL, _SAMPLE_AND_KL_BACKWARD, _sample_and_kl_setup, _sample_and_kl_grad)


def sample_and_kl(
    mu_q: Tensor,
    logsigma_q: Tensor,
    mu_p: Tensor,
    logsigma_p: Tensor,
    *,
    scale: str = "exp",
    beta: float = reference.SOFTPLUS_BETA,
    posterior: str = "direct",
    kl_estimator: str = "analytic",
    seed: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One stochastic layer: z = μq + σq·ε (input dtype) and Σ KL(q‖p) per image (float32, shape (B,)).

    One fused kernel forward and one backward; ε is regenerated from the seed, never stored. scale, beta and
    posterior as for gaussian_kl; kl_estimator="sampled" returns Σ log q(z) − log p(z) at the drawn z instead of
    the analytic KL (what an importance-weighted likelihood needs).
    """
    device = _check_gaussians(mu_q=mu_q, logsigma_q=logsigma_q, mu_p=mu_p, logsigma_p=logsigma_p)
    _check_counters(mu_q.numel(), "elements")
    parametrization = _parametrization(scale, beta, posterior=posterior, kl_estimator=kl_estimator)
    backend = resolve_backend(backend, device, mu_q.dtype, op="sample_and_kl", layout=layout_of(mu_q))
    seed_t = _seed_tensor(seed, backend)
    if backend in EAGER_BACKENDS:
        return reference.sample_and_kl(
            mu_q, logsigma_q, mu_p, logsigma_p, **parametrization, seed=seed_t, backend=backend
        )
    params = _dense_layout(mu_q, logsigma_q, mu_p, logsigma_p)
    return _SAMPLE_AND_KL(backend, *params, seed_t, *_kernel_codes(parametrization))


# --------------------------------------------------------------------------------------------
# sample_gaussian
# --------------------------------------------------------------------------------------------


def _sample_gaussian_forward_fake(
    mu: Tensor, logsigma: Tensor, temperature: float, seed: Tensor, scale: int, beta: float
) -> Tensor:
    return torch.empty_like(mu)


def _sample_gaussian_backward_fake(
    grad_z: Tensor, mu: Tensor, logsigma: Tensor, temperature: float, seed: Tensor, scale: int, beta: float
) -> Tensor:
    return torch.empty_like(logsigma)


def _sample_gaussian_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    mu, logsigma, temperature, seed, scale, beta = inputs
    ctx.save_for_backward(mu, logsigma, seed)
    ctx.temperature, ctx.codes = temperature, (scale, beta)


def _sample_gaussian_grad(backward: Callable, ctx: Any, grad_z: Tensor) -> tuple:
    """∂z/∂μ = 1: μ's gradient is grad_z itself, passed through as eager autograd does; the backward op, whose
    output may not alias its input, computes only logσ's."""
    mu, logsigma, seed = ctx.saved_tensors
    grad_z = grad_z.contiguous(memory_format=reference.memory_format_of(mu))
    grad_logsigma = backward(grad_z, mu, logsigma, ctx.temperature, seed, *ctx.codes)
    return grad_z, grad_logsigma, None, None, None, None


_SAMPLE_GAUSSIAN = _kernel_ops("sample_gaussian", "sample_gaussian_forward", _sample_gaussian_forward_fake)
_SAMPLE_GAUSSIAN_BACKWARD = _kernel_ops("sample_gaussian", "sample_gaussian_backward", _sample_gaussian_backward_fake)
_register_autograd(_SAMPLE_GAUSSIAN, _SAMPLE_GAUSSIAN_BACKWARD, _sample_gaussian_setup, _sample_gaussian_grad)


def sample_gaussian(
    mu: Tensor,
    logsigma: Tensor,
    *,
    temperature: float = 1.0,
    scale: str = "exp",
    beta: float = reference.SOFTPLUS_BETA,
    seed: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """z = μ + t·σ·ε for prior sampling at temperature t (VDVAE adds log t to logσ); input dtype.

    t must be a finite real number >= 0: an infinite one would give infinite z, a silent all-black image.
    σ = exp(logσ), or softplus_β(logσ) with scale="softplus" (gradient smoothing).
    """
    device = _check_gaussians(mu=mu, logsigma=logsigma)
    temperature = _check_temperature(temperature)
    parametrization = _parametrization(scale, beta)
    _check_counters(mu.numel(), "elements")
    backend = resolve_backend(backend, device, mu.dtype, op="sample_gaussian", layout=layout_of(mu))
    seed_t = _seed_tensor(seed, backend)
    if backend in EAGER_BACKENDS:
        return reference.sample_gaussian(
            mu, logsigma, temperature=temperature, **parametrization, seed=seed_t, backend=backend
        )
    codes = _kernel_codes(parametrization)
    return _SAMPLE_GAUSSIAN(backend, *_dense_layout(mu, logsigma), temperature, seed_t, *codes)


if _TRITON_FOUND and (torch.cuda.is_available() or _triton_interpreted()):
    _register_triton_ops()  # where Triton can run: so that torch.compile finds the ops registered
