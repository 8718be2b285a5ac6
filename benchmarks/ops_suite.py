"""Op suite: each fused op × backend × preset shape × dtype × (forward, forward+backward).

Backends: ``original`` (the eager formulas with torch's sampler: what openai/vdvae runs), ``compile``
(torch.compile of the original: what a user would do instead), and every kernel backend of this installation
on the device. The seeded ``reference`` oracle is left out: its eager Philox generator is far slower than
torch's sampler and would flatter the kernels.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vdvae_fast import ops

from .timing import median_ms, saved_bytes, synchronize

__all__ = ["Case", "cases", "make_forward", "make_inputs", "make_step", "run", "synchronize"]

# (preset, batch, side): image shapes of the presets at the batch sizes users train with.
GPU_SHAPES = [
    ("cifar10", 16, 32),
    ("imagenet32", 8, 32),
    ("imagenet32", 64, 32),
    ("imagenet64", 4, 64),
    ("imagenet64", 32, 64),
    ("ffhq256", 1, 256),
    ("ffhq256", 4, 256),
]
CPU_SHAPES = [("cifar10", 16, 32), ("imagenet64", 4, 64), ("imagenet64", 8, 64)]
NUM_MIXTURES = 10
ZDIM = 16
OPS = ("dmol_nll", "sample_and_kl", "gaussian_kl", "dmol_sample")


@dataclass
class Case:
    op: str
    preset: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    backward: bool

    @property
    def mode(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"


def make_inputs(case: Case, device: torch.device, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    if case.op in ("dmol_nll", "dmol_sample"):
        batch, _, height, width = case.shape
        logits = torch.randn(case.shape, generator=generator) * 0.5
        if case.op == "dmol_sample":
            return (logits.to(device, case.dtype),)
        x = torch.randint(0, 256, (batch, 3, height, width), generator=generator) / 127.5 - 1.0
        return logits.to(device, case.dtype).requires_grad_(case.backward), x.to(device)
    return tuple(
        (torch.randn(case.shape, generator=generator) * 0.5).to(device, case.dtype).requires_grad_(case.backward)
        for _ in range(4)
    )


def make_forward(case: Case, backend: str, compiled: bool) -> Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]:
    """The op as a function of its inputs, returning its outputs; torch.compile'd if `compiled`."""
    seed = {} if backend == "original" else {"seed": 1}  # the original draws from torch's generator
    if case.op == "dmol_nll":
        num_bits = 5 if case.preset == "ffhq256" else 8
        fn = lambda logits, x: ops.dmol_nll(logits, x, num_bits=num_bits, backend=backend, check_inputs=False)  # noqa: E731
    elif case.op == "sample_and_kl":
        fn = lambda *p: ops.sample_and_kl(*p, backend=backend, **seed)  # noqa: E731
    elif case.op == "gaussian_kl":
        fn = lambda *p: ops.gaussian_kl(*p, backend=backend)  # noqa: E731
    else:
        fn = lambda logits: ops.dmol_sample(logits, backend=backend, **seed)  # noqa: E731
    return torch.compile(fn) if compiled else fn


def make_step(case: Case, forward: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]) -> Callable[..., None]:
    """One timed call: the op's forward, or its forward and the backward of dense random output gradients.

    Dense gradients, as the layer above sends them in a model (a sum's expanded gradient would flatter the eager
    ops, which broadcast it), made once per input set in the first, untimed call; torch.autograd.grad, as for
    the activations of a model, so no time goes into accumulating .grad.
    """
    if not case.backward:
        return lambda *inputs: forward(*inputs)
    upstream: dict[int, tuple[torch.Tensor, ...]] = {}

    def forward_backward(*inputs: torch.Tensor) -> None:
        outputs = forward(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        if id(inputs[0]) not in upstream:
            upstream[id(inputs[0])] = tuple(torch.randn_like(o) for o in outputs)
        torch.autograd.grad(outputs, [t for t in inputs if t.requires_grad], upstream[id(inputs[0])])

    return forward_backward


def bytes_moved(case: Case) -> int:
    """Bytes the fused op must move: its inputs read (again in backward), outputs and gradients written once."""
    element = torch.finfo(case.dtype).bits // 8
    numel = 1
    for size in case.shape:
        numel *= size
    batch = case.shape[0]
    if case.op == "dmol_nll":
        pixels = batch * case.shape[2] * case.shape[3]
        forward = numel * element + pixels * 3 * 4 + batch * 4
        return 2 * forward + numel * element if case.backward else forward
    if case.op == "dmol_sample":
        return numel * element + batch * case.shape[2] * case.shape[3] * 3 * 4
    if case.op == "sample_and_kl":
        forward = 5 * numel * element + batch * 4
        return forward + 9 * numel * element if case.backward else forward
    forward = 4 * numel * element + numel * 4
    return forward + 4 * numel * element + numel * 4 + 4 * numel * element if case.backward else forward


def cases(device: torch.device, quick: bool) -> list[Case]:
    shapes = CPU_SHAPES if device.type == "cpu" else GPU_SHAPES
    if quick:
        shapes = shapes[:2]
    dtypes = [torch.float32, torch.bfloat16]
    found = []
    for op, (preset, batch, side), dtype in itertools.product(OPS, shapes, dtypes):
        channels = 10 * NUM_MIXTURES if op.startswith("dmol") else ZDIM
        for backward in (False, True) if op != "dmol_sample" else (False,):
            found.append(Case(op, preset, (batch, channels, side, side), dtype, backward))
    return found


def run(device: torch.device, *, quick: bool = False, with_compile: bool = True) -> list[dict]:
    """Measure every case on `device`; one row per (case, backend)."""
    backends = [
        b for b in ops.available_backends(device) if b != "reference" and not (b == "triton" and device.type == "cpu")
    ]
    rows = []
    for case in cases(device, quick):
        generator = torch.Generator().manual_seed(0)
        input_sets = [make_inputs(case, device, generator) for _ in range(3 if device.type == "cuda" else 2)]
        variants = [(b, b, False) for b in backends]
        if with_compile:
            variants.append(("compile", "original", True))
        timings = {}
        for label, backend, compiled in variants:
            forward = make_forward(case, backend, compiled)
            step = make_step(case, forward)
            try:
                timings[label] = median_ms(step, input_sets, device, repeats=10 if device.type == "cpu" else 30)
            except Exception as error:  # a backend that cannot run this case is reported, not fatal
                print(f"  {case.op} {case.shape} {label}: {type(error).__name__}: {error}")
                continue
            saved = saved_bytes(functools.partial(forward, *input_sets[0])) if case.backward else 0
            rows.append(
                {
                    "suite": "ops",
                    "name": case.op,
                    "preset": case.preset,
                    "backend": label,
                    "shape": list(case.shape),
                    "dtype": str(case.dtype).removeprefix("torch."),
                    "mode": case.mode,
                    "median_ms": timings[label],
                    "bytes": bytes_moved(case),
                    "saved_bytes": saved,
                }
            )
            print(
                f"  {case.op:14s} {case.mode:7s} {str(case.shape):22s} {rows[-1]['dtype']:9s} {label:9s} {timings[label]:9.3f} ms"
            )
        for row in rows:
            if row["name"] == case.op and row["shape"] == list(case.shape) and row["mode"] == case.mode:
                if row["dtype"] == str(case.dtype).removeprefix("torch."):
                    row["speedup_vs_eager"] = timings.get("original", float("nan")) / row["median_ms"]
                    row["speedup_vs_compile"] = timings.get("compile", float("nan")) / row["median_ms"]
    return rows
