"""Op suite: each fused op × backend × shape × dtype × layout × (forward, forward+backward).

Backends: ``original`` (the eager formulas with torch's sampler: what openai/vdvae runs), ``compile``
(torch.compile of the original: what a user would do instead), and every kernel backend of this installation
on the device. The seeded ``reference`` oracle is left out: its eager Philox generator is far slower than
torch's sampler and would flatter the kernels.

Every ``compile`` row is its own compiled function (dynamo's caches reset first), compiled whole
(``fullgraph=True``), and counted: a row whose timed calls did not all run the compiled graph is a failed row,
never eager time printed as compile time. Any backend that fails a case gives a row saying why; the suite goes on.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vdvae_fast import ops

from .timing import saved_bytes, time_calls

__all__ = ["Case", "CompiledCalls", "bytes_moved", "cases", "make_forward", "make_inputs", "make_step", "run"]

NUM_MIXTURES = 10
ZDIM = 16
OPS = ("dmol_nll", "dmol_sample", "sample_and_kl", "gaussian_kl", "sample_gaussian")
DTYPES = (torch.float32, torch.bfloat16)
LAYOUTS = ("contiguous", "channels_last")
SIZES = ("tiny", "quick", "full")
# The order of the compile rows, which a time budget may cut: float32 as most models run, then the training
# step's `best` format (bfloat16, channels_last).
COMPILE_ORDER = [
    (torch.float32, "contiguous"),
    (torch.bfloat16, "channels_last"),
    (torch.bfloat16, "contiguous"),
    (torch.float32, "channels_last"),
]

# quick: the roofline shapes, (B, C, H, W) of the DMoL logits and of the latents of one imagenet64 layer.
ROOFLINE_DMOL_SHAPES = ((32, 100, 64, 64), (4, 100, 64, 64))
ROOFLINE_GAUSSIAN_SHAPES = ((32, 16, 64, 64),)
# full: (preset, batch, side), image shapes of the presets at the batch sizes users train with.
GPU_PRESET_SHAPES = (
    ("cifar10", 16, 32),
    ("imagenet32", 8, 32),
    ("imagenet32", 64, 32),
    ("imagenet64", 4, 64),
    ("imagenet64", 32, 64),
    ("ffhq256", 1, 256),
    ("ffhq256", 4, 256),
)
CPU_PRESET_SHAPES = (("cifar10", 16, 32), ("imagenet64", 4, 64), ("imagenet64", 8, 64))
# tiny: a check that every path runs (run_gpu.sh --dry-run, tests), not a measurement.
TINY_SIDE, TINY_BATCH = 8, 2


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str = "contiguous"
    backward: bool = True
    num_bits: int = 8

    @property
    def mode(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def __str__(self) -> str:
        return f"{self.op} {self.mode} {'x'.join(map(str, self.shape))} {self.dtype_name} {self.layout}"


def _op_cases(op: str, shapes: list[tuple[tuple[int, ...], int]], combos: list[tuple[torch.dtype, str]]) -> list[Case]:
    modes = (False,) if op == "dmol_sample" else (False, True)
    return [
        Case(op, shape, dtype, layout, backward, bits)
        for (shape, bits), (dtype, layout), backward in itertools.product(shapes, combos, modes)
    ]


def cases(device: torch.device, size: str = "full") -> list[Case]:
    """The cases of a run: ``tiny`` (a smoke run), ``quick`` (the roofline shapes) or ``full`` (preset shapes)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    combos = list(itertools.product(DTYPES, LAYOUTS))
    if size == "tiny":  # each dtype and each layout once
        combos = [(torch.float32, "contiguous"), (torch.bfloat16, "channels_last")]
        image = [((TINY_BATCH, TINY_SIDE, TINY_SIDE), 8)]
    elif size == "quick":
        image = [((b, h, w), 8) for b, _, h, w in ROOFLINE_DMOL_SHAPES]
    else:
        presets = CPU_PRESET_SHAPES if device.type == "cpu" else GPU_PRESET_SHAPES
        image = [((batch, side, side), 5 if name == "ffhq256" else 8) for name, batch, side in presets]
    if size == "quick":
        latent = [((b, h, w), 8) for b, _, h, w in ROOFLINE_GAUSSIAN_SHAPES]
    else:
        latent = image
    found = []
    for op in OPS:
        channels = 10 * NUM_MIXTURES if op.startswith("dmol") else ZDIM
        shapes = [((b, channels, h, w), bits) for (b, h, w), bits in (image if op.startswith("dmol") else latent)]
        found += _op_cases(op, shapes, combos)
    return found


def make_inputs(case: Case, device: torch.device, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The op's tensor arguments in the case's dtype and layout; those that get gradients require them."""
    memory_format = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format

    def place(t: torch.Tensor, dtype: torch.dtype, grad: bool) -> torch.Tensor:
        return t.to(device, dtype).contiguous(memory_format=memory_format).requires_grad_(grad)

    if case.op.startswith("dmol"):
        batch, _, height, width = case.shape
        logits = place(torch.randn(case.shape, generator=generator) * 0.5, case.dtype, case.backward)
        if case.op == "dmol_sample":
            return (logits,)
        levels = 2**case.num_bits - 1
        pixels = torch.randint(0, levels + 1, (batch, 3, height, width), generator=generator)
        return logits, place(pixels / levels * 2.0 - 1.0, torch.float32, False)
    count = 2 if case.op == "sample_gaussian" else 4
    return tuple(
        place(torch.randn(case.shape, generator=generator) * 0.5, case.dtype, case.backward) for _ in range(count)
    )


def make_forward(case: Case, backend: str) -> Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]:
    """The op on `backend` as a function of its inputs, returning its outputs."""
    seed = {} if backend == "original" else {"seed": 1}  # the original draws from torch's generator
    if case.op == "dmol_nll":
        return functools.partial(ops.dmol_nll, num_bits=case.num_bits, backend=backend, check_inputs=False)
    if case.op == "dmol_sample":
        return functools.partial(ops.dmol_sample, backend=backend, **seed)
    if case.op == "sample_and_kl":
        return functools.partial(ops.sample_and_kl, backend=backend, **seed)
    if case.op == "gaussian_kl":
        return functools.partial(ops.gaussian_kl, backend=backend)
    return functools.partial(ops.sample_gaussian, temperature=0.8, backend=backend, **seed)


class CompiledCalls:
    """torch.compile (Inductor, whole graph) of one case's function, counting the graphs it compiled and the calls
    that ran them: the proof that a compile row timed compiled code, not dynamo's silent fallback to eager."""

    def __init__(self, fn: Callable[..., object]) -> None:
        self.graphs = 0  # graphs dynamo captured and Inductor compiled
        self.calls = 0  # calls of this object
        self.compiled_runs = 0  # calls that ran a compiled graph
        self._compiled = torch.compile(fn, backend=self._backend, fullgraph=True)

    def _backend(self, graph: torch.fx.GraphModule, example_inputs: list) -> Callable[..., object]:
        self.graphs += 1
        compiled = torch._dynamo.lookup_backend("inductor")(graph, example_inputs)

        def run(*args: object) -> object:
            self.compiled_runs += 1
            return compiled(*args)

        run._boxed_call = getattr(compiled, "_boxed_call", False)  # dynamo's calling convention of the result
        return run

    def __call__(self, *args: torch.Tensor) -> object:
        self.calls += 1
        return self._compiled(*args)

    def check(self) -> None:
        """Raise if any call so far ran without compiled code."""
        if self.graphs == 0 or self.compiled_runs != self.calls:
            raise RuntimeError(
                f"torch.compile fell back to eager: {self.compiled_runs} of {self.calls} calls ran a compiled graph "
                f"({self.graphs} graphs compiled)"
            )


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
    numel = math.prod(case.shape)
    batch = case.shape[0]
    if case.op == "dmol_nll":
        pixels = batch * case.shape[2] * case.shape[3]
        forward = numel * element + pixels * 3 * 4 + batch * 4
        return 2 * forward + numel * element if case.backward else forward
    if case.op == "dmol_sample":
        return numel * element + batch * case.shape[2] * case.shape[3] * 3 * 4
    if case.op == "sample_and_kl":  # 4 parameters in, z and a KL per image out; backward: 4 + grad_z in, 4 out
        forward = 5 * numel * element + batch * 4
        return forward + 9 * numel * element if case.backward else forward
    if case.op == "sample_gaussian":  # μ, logσ in, z out; backward: logσ and grad_z in, grad_logσ out (μ's is grad_z)
        forward = 3 * numel * element
        return forward + 3 * numel * element if case.backward else forward
    forward = 4 * numel * element + numel * 4  # gaussian_kl: float32 elementwise KL
    return forward + 4 * numel * element + numel * 4 + 4 * numel * element if case.backward else forward


@dataclass(frozen=True)
class Plan:
    """How long a row is timed: warm-up calls, then at least `repeats` calls and `min_seconds`."""

    warmup: int
    repeats: int
    min_seconds: float


PLANS = {
    ("cuda", "tiny"): Plan(2, 5, 0.0),
    ("cuda", "quick"): Plan(5, 30, 0.25),
    ("cuda", "full"): Plan(5, 50, 0.5),
    ("cpu", "tiny"): Plan(1, 3, 0.0),
    ("cpu", "quick"): Plan(2, 10, 1.0),
    ("cpu", "full"): Plan(2, 10, 1.0),
}


def default_backends(device: torch.device, with_compile: bool = True) -> list[str]:
    """Every kernel backend built for `device` (not interpreted Triton), the original, and compile of it."""
    found = [
        b for b in ops.available_backends(device) if b != "reference" and not (b == "triton" and device.type == "cpu")
    ]
    return found + (["compile"] if with_compile else [])


def _row(case: Case, label: str, device: torch.device) -> dict:
    row = {
        "suite": "ops",
        "name": case.op,
        "backend": label,
        "shape": list(case.shape),
        "dtype": case.dtype_name,
        "layout": case.layout,
        "mode": case.mode,
        "bytes": bytes_moved(case),
    }
    if label not in ("original", "compile"):
        row["auto"] = ops.resolve_backend("auto", device, case.dtype)  # what the ops pick for this case
    return row


def measure(case: Case, label: str, device: torch.device, plan: Plan) -> dict:
    """One row: the case on one backend (``compile``: torch.compile of the original), or why it failed."""
    row = _row(case, label, device)
    try:
        generator = torch.Generator().manual_seed(0)
        input_sets = [make_inputs(case, device, generator) for _ in range(3 if device.type == "cuda" else 2)]
        if label == "compile":
            torch._dynamo.reset()  # one compiled function per case: no recompile limit shared across cases
            forward = CompiledCalls(make_forward(case, "original"))
        else:
            forward = make_forward(case, label)
        step = make_step(case, forward)
        step(*input_sets[0])  # the first call compiles (Triton, Inductor) and draws the upstream gradients
        timing = time_calls(
            step, input_sets, device, warmup=plan.warmup, repeats=plan.repeats, min_seconds=plan.min_seconds
        )
        if isinstance(forward, CompiledCalls):
            forward.check()
        row.update(timing.fields())
        row["saved_bytes"] = saved_bytes(functools.partial(forward, *input_sets[0])) if case.backward else 0
    except Exception as error:  # a backend that cannot run this case is reported in its row, not fatal
        row["error"] = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    return row


def _print(row: dict) -> None:
    if "median_ms" in row:
        flag = "  unstable" if row.get("unstable") else ""
        result = f"{row['median_ms']:9.3f} ms (min {row['min_ms']:.3f}, IQR {row['spread_pct']:.0f}%){flag}"
    else:
        result = row["error"]
    case = f"{row['name']} {row['mode']} {'x'.join(map(str, row['shape']))} {row['dtype']} {row['layout']}"
    print(f"  {case:52s} {row['backend']:8s} {result}", flush=True)


def run(
    device: torch.device,
    *,
    size: str = "full",
    backends: list[str] | None = None,
    with_compile: bool = True,
    budget_s: float | None = None,
    only: list[str] | None = None,
) -> list[dict]:
    """Measure every case on `device`: one row per (case, backend).

    backends: labels to measure (a kernel backend, ``original``, ``compile``); default default_backends().
    only: measure just the cases whose label (e.g. ``sample_gaussian fwd+bwd 8x16x64x64 float32 channels_last``)
    contains one of these texts.
    The compile rows come after all others, in COMPILE_ORDER, and none but the first starts once `budget_s`
    seconds have passed (their rows say so): compiling is what takes the time.
    """
    backends = default_backends(device, with_compile) if backends is None else list(backends)
    if not with_compile and "compile" in backends:
        backends.remove("compile")
    plan = PLANS[("cuda" if device.type == "cuda" else "cpu", size)]
    deadline = time.monotonic() + budget_s if budget_s is not None else math.inf
    found = [c for c in cases(device, size) if not only or any(text in str(c) for text in only)]
    if not found:
        raise ValueError(
            f"no {size} op case matches --only {' / '.join(only or [])}: labels read like {cases(device, size)[0]}"
        )
    rows = []
    for case in found:
        for label in backends:
            if label != "compile":
                rows.append(measure(case, label, device, plan))
                _print(rows[-1])
    if "compile" in backends:
        for case in sorted(found, key=lambda c: COMPILE_ORDER.index((c.dtype, c.layout))):
            if time.monotonic() > deadline and any(r["backend"] == "compile" for r in rows):
                rows.append({**_row(case, "compile", device), "error": "skipped: time budget spent"})
            else:
                rows.append(measure(case, "compile", device, plan))
            _print(rows[-1])
    return rows
