"""The kernels as torch.library ops: schemas, fake (meta) implementations and autograd checked by opcheck, and
the Triton ops decomposing into their kernels when torch.compile traces them, so Inductor can fuse around them."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.op_cases import DEVICE, FUSED_BACKENDS, INTERPRETED
from vdvae_fast import ops

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {  # kernel module -> its entry points, as in docs/kernel-contract.md
    "dmol_nll": ("dmol_nll_forward", "dmol_nll_backward"),
    "dmol_sample": ("dmol_sample",),
    "gaussian_kl": ("gaussian_kl_forward", "gaussian_kl_backward"),
    "sample_and_kl": ("sample_and_kl_forward", "sample_and_kl_backward"),
    "sample_gaussian": ("sample_gaussian_forward", "sample_gaussian_backward"),
}


def _sample_args(name: str, fmt: torch.memory_format) -> tuple:
    """Small valid arguments of entry point `name`, float tensors in layout `fmt`, requiring grad for the
    differentiable forward ops (backward ops have no double backward)."""
    gen = torch.Generator().manual_seed(0)
    differentiable = name.endswith("_forward") and name != "dmol_sample"

    def tensor(*shape, scale=0.5):
        t = (torch.randn(shape, generator=gen) * scale).contiguous(memory_format=fmt)
        return t.to(DEVICE).requires_grad_(differentiable)

    seed = torch.tensor(7)
    logits, x = tensor(2, 20, 3, 4), (torch.rand(2, 3, 3, 4, generator=gen) * 2 - 1).contiguous(memory_format=fmt)
    params = [tensor(2, 3, 4, 5) for _ in range(4)]
    return {
        "dmol_nll_forward": (logits, x.to(DEVICE), 8, 0, 0.7, -7.0),
        "dmol_nll_backward": (torch.rand(2, device=DEVICE), logits, x.to(DEVICE), 5, 1, 0.7, float("-inf")),
        "dmol_sample": (logits.detach(), 1, 0.7, -7.0, seed),
        "gaussian_kl_forward": (*params, 1, 0.7, 2),
        "gaussian_kl_backward": (tensor(2, 3, 4, 5).detach(), *params, 1, 0.7, 2),
        "sample_and_kl_forward": (*params, seed, 1, 0.7, 1, 1),
        "sample_and_kl_backward": (
            tensor(2, 3, 4, 5).detach(),
            torch.rand(2, device=DEVICE),
            *params,
            seed,
            1,
            0.7,
            1,
            1,
        ),
        "sample_gaussian_forward": (params[0], params[1], 0.7, seed, 1, 0.7),
        "sample_gaussian_backward": (tensor(2, 3, 4, 5).detach(), params[0], params[1], 0.7, seed, 1, 0.7),
    }[name]


def _op(name: str, backend: str):
    return getattr(torch.ops.vdvae_fast, f"{name}_triton" if backend == "triton" else name).default


ALL_ENTRY_POINTS = [name for names in ENTRY_POINTS.values() for name in names]


def test_every_entry_point_is_registered_for_each_backend_family() -> None:
    for name in ALL_ENTRY_POINTS:
        assert hasattr(torch.ops.vdvae_fast, name)
        assert hasattr(torch.ops.vdvae_fast, f"{name}_triton") == ops.triton_available()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("name", ALL_ENTRY_POINTS)
@pytest.mark.parametrize("backend", FUSED_BACKENDS or ["none"])
def test_opcheck_schema_fake_and_autograd(backend: str, name: str, fmt: torch.memory_format) -> None:
    """opcheck runs the op for real and on fake tensors and compares outputs' shapes, dtypes and strides."""
    if backend == "none":
        pytest.skip("no fused backend built")
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if backend == "triton" and INTERPRETED:
        checks = checks[:3]  # AOT tracing runs the launcher on fake tensors, which an interpreted kernel cannot take
    torch.library.opcheck(_op(name, backend), _sample_args(name, fmt), test_utils=checks)


_TRACE = """
import torch
from torch._functorch.aot_autograd import aot_function
from torch._subclasses import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from vdvae_fast import ops

ops._register_triton_ops()  # no GPU and no interpreter here, so the import left it to the first use

class Traced(Exception):
    pass

def capture(gm, example_inputs):
    raise Traced(gm.code)

def seed():
    return torch.randint(0, 2**62, (), dtype=torch.int64)  # drawn as ops draws it: not a constant

t_ops = torch.ops.vdvae_fast
calls = {  # entry point -> (function of tensors only, its tensor inputs' shapes)
    "dmol_nll_forward": (
        lambda l, x: t_ops.dmol_nll_forward_triton(l, x, 8, 0, 0.7, -7.0), [(2, 30, 4, 4), (2, 3, 4, 4)]
    ),
    "dmol_nll_backward": (
        lambda g, l, x: t_ops.dmol_nll_backward_triton(g, l, x, 8, 1, 0.7, -7.0), [(2,), (2, 30, 4, 4), (2, 3, 4, 4)]
    ),
    "dmol_sample": (lambda l: t_ops.dmol_sample_triton(l, 1, 0.7, -7.0, seed()), [(2, 30, 4, 4)]),
    "gaussian_kl_forward": (lambda *p: t_ops.gaussian_kl_forward_triton(*p, 1, 0.7, 2), [(2, 3, 4, 4)] * 4),
    "gaussian_kl_backward": (lambda *p: t_ops.gaussian_kl_backward_triton(*p, 1, 0.7, 2), [(2, 3, 4, 4)] * 5),
    "sample_and_kl_forward": (
        lambda *p: t_ops.sample_and_kl_forward_triton(*p, seed(), 1, 0.7, 1, 1), [(2, 3, 4, 4)] * 4
    ),
    "sample_and_kl_backward": (
        lambda gz, gkl, *p: t_ops.sample_and_kl_backward_triton(gz, gkl, *p, seed(), 1, 0.7, 1, 1),
        [(2, 3, 4, 4), (2,)] + [(2, 3, 4, 4)] * 4,
    ),
    "sample_gaussian_forward": (
        lambda mu, ls: t_ops.sample_gaussian_forward_triton(mu, ls, 0.7, seed(), 1, 0.7), [(2, 3, 4, 4)] * 2
    ),
    "sample_gaussian_backward": (
        lambda g, mu, ls: t_ops.sample_gaussian_backward_triton(g, mu, ls, 0.7, seed(), 1, 0.7), [(2, 3, 4, 4)] * 3
    ),
}
with FakeTensorMode(shape_env=ShapeEnv()):
    for name, (call, shapes) in calls.items():
        try:
            aot_function(call, fw_compiler=capture)(*(torch.randn(s, device="cuda") for s in shapes))
        except Traced as traced:
            code = str(traced)
            print(name, code.count("triton_kernel_wrapper_functional("), code.count("aten._local_scalar_dense.default("))
"""


def test_triton_ops_decompose_into_their_kernels_with_the_seed_as_a_traced_scalar() -> None:
    """Under AOTAutograd (what torch.compile runs) each Triton op becomes its kernel launches, which Inductor
    compiles and fuses around, and the seed stays a runtime value instead of a constant baked into the graph.
    Traced on fake CUDA tensors with real (not interpreted) kernels, so it runs without a GPU."""
    if not ops.triton_available():
        pytest.skip("triton is not installed")
    for module in ENTRY_POINTS:
        source = inspect.getsource(importlib.import_module(f"vdvae_fast.kernels.{module}"))
        if "wrap_triton" not in source:
            pytest.skip(f"vdvae_fast/kernels/{module}.py launches its kernels without torch.library.wrap_triton")
    env = {key: value for key, value in __import__("os").environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_TRACE)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    traced = {line.split()[0]: tuple(map(int, line.split()[1:])) for line in run.stdout.splitlines()}
    assert set(traced) == set(ALL_ENTRY_POINTS)
    for name, (kernels, seeds) in traced.items():
        assert kernels >= 1, name
        assert seeds == int(any(arg.name == "seed" for arg in _op(name, "cpu")._schema.arguments)), name


def test_kernels_launch_on_the_inputs_gpu_with_the_seed_as_an_int(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton launches on the current device: with two GPUs, tensors on cuda:1 must make cuda:1 current."""
    current = []

    class DeviceContext:  # stands in for torch.cuda.device, which needs a GPU
        def __init__(self, device: torch.device) -> None:
            self.device = device

        def __enter__(self) -> None:
            current.append(self.device)

        def __exit__(self, *exc_info: object) -> None:
            current.pop()

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "device", DeviceContext)
    launches = []

    def launch(logits: torch.Tensor, *options_and_seed: object) -> torch.Tensor:
        launches.append((list(current), options_and_seed[-1]))
        return logits

    body = ops._launching(launch, inspect.signature(ops._dmol_sample_fake))
    with torch._subclasses.FakeTensorMode():  # CUDA tensors without a GPU
        body(torch.empty(1, 10, 2, 2, device="cuda:1"), 0, 0.7, -7.0, torch.tensor(123))
    body(torch.empty(1, 10, 2, 2), 0, 0.7, -7.0, torch.tensor(4))  # CPU tensors: no device to switch to
    assert launches == [([torch.device("cuda:1")], 123), ([], 4)]
    assert all(type(seed) is int for _, seed in launches)


_LATE_TRITON = """
import os, sys, torch
from vdvae_fast import ops
print("registered at import:", hasattr(torch.ops.vdvae_fast, "gaussian_kl_forward_triton"))
print("inductor imported:", "torch._inductor" in sys.modules)
os.environ["TRITON_INTERPRET"] = "1"  # after the import, as a tool compiling the kernels without a GPU does
p = [torch.randn(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
try:
    torch.compile(lambda *p: ops.gaussian_kl(*p, backend="triton"), backend="aot_eager", fullgraph=True)(*p)
except Exception as error:
    print("compiled first:", "once before torch.compile" in str(error))
torch.testing.assert_close(ops.gaussian_kl(*p, backend="triton"), ops.gaussian_kl(*p, backend="reference"))
print("registered on first use:", hasattr(torch.ops.vdvae_fast, "gaussian_kl_forward_triton"))
"""


def test_triton_ops_are_registered_on_first_use_where_import_could_not_run_them() -> None:
    """Without a GPU or TRITON_INTERPRET at import, registering (which imports torch._inductor, about a second)
    waits for the first eager call with backend='triton'; a first call inside torch.compile says what to do."""
    if not ops.triton_available():
        pytest.skip("triton is not installed")
    env = {key: value for key, value in __import__("os").environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, as on the machines this path is for
    run = subprocess.run(
        [sys.executable, "-c", _LATE_TRITON], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines() == [
        "registered at import: False",
        "inductor imported: False",
        "compiled first: True",
        "registered on first use: True",
    ]
