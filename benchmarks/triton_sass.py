"""Every Triton kernel the ops can launch, compiled for sm_90 with no GPU, and what its SASS costs.

The kernels are compiled through the ops' own launch code: `vdvae_fast.ops` with backend="triton" on CPU
tensors, Triton's driver replaced by one that reports a `GPUTarget("cuda", 90, 32)`, and JIT launches
turned into compile-only calls (warmup), so nothing runs and no GPU is needed; ptxas and cuobjdump come
from Triton's wheel. This process must not have imported triton before (it does so itself): run it as

    PYTHONPATH=. python -m benchmarks.triton_sass --table benchmarks/results/sm90-triton.md
    PYTHONPATH=. python -m benchmarks.triton_sass --check      # exit 1 on a failed compile, > 128 registers, spills

`--only TEXT` (repeatable) compiles the cases whose label contains TEXT; TRITON_SASS_DIR=DIR keeps each kernel's SASS there.

tests/test_triton_compile.py runs the `--check` form in a subprocess.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import shlex
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

MAX_REGISTERS = 128
DTYPES = ("float32", "bfloat16", "float16")
LAYOUTS = ("contiguous", "channels_last")
MIXTURES = (1, 10, 32)
BITS = (8, 5)
# Shapes of the compiled launches: the pixel count (64 x 64) and the Gaussian tensor (16 x 32 x 32 per image)
# are multiples of 16, as in training, so Triton specializes them as it would there.
DMOL_SHAPE = (2, 64, 64)
GAUSSIAN_SHAPE = (2, 16, 32, 32)


@dataclasses.dataclass(frozen=True)
class Case:
    """One op call with backend="triton": its forward and (where it has one) backward launches."""

    op: str
    dtype: str
    layout: str
    num_mix: int = 0
    bits: int = 0

    @property
    def label(self) -> str:
        dmol = f" M={self.num_mix}" + (f" {self.bits}-bit" if self.bits else "") if self.num_mix else ""
        return f"{self.op} {self.dtype} {self.layout}{dmol}"


def cases() -> list[Case]:
    """Every kernel variant the ops launch: dtypes x layouts, and for the DMoL ops mixtures x bit depths."""
    out = []
    for dtype in DTYPES:
        for layout in LAYOUTS:
            for num_mix in MIXTURES:
                out += [Case("dmol_nll", dtype, layout, num_mix, bits) for bits in BITS]
                out.append(Case("dmol_sample", dtype, layout, num_mix))
            out += [Case(op, dtype, layout) for op in ("sample_and_kl", "gaussian_kl", "sample_gaussian")]
    return out


def _tool(name: str) -> str | None:
    """Path of one of the CUDA tools in Triton's wheel (found without importing triton), or None."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], "backends", "nvidia", "bin", name)


def ptxas_missing() -> str | None:
    """Why Triton cannot compile for a CUDA target here, or None when it can."""
    for tool in ("ptxas", "cuobjdump"):
        path = _tool(tool)
        if path is None:
            return "triton is not installed"
        if not os.access(path, os.X_OK):
            return f"{path} is missing: this triton wheel cannot compile CUDA kernels"
    return None


def compile_process_env(root: str) -> dict[str, str]:
    """The environment of a fresh process that compiles for sm_90 (tests run this module or scripts calling
    it so): real JIT functions, not the interpreter's, and `root` importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is every version's default
    return env


def run_compile_script(code: str, root: str, timeout: float = 900) -> object:
    """Run `code` (which calls _install_compile_only_sm90 first) in a fresh process; the JSON of its last line."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=compile_process_env(root), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the compile script failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


# ---- compile-only launches (set up once per process, before anything imports triton) ----------------------

_LAUNCHES: list[tuple[str, object, dict]] = []


def _install_compile_only_sm90() -> None:
    """Triton reports an sm_90 GPU and compiles instead of launching; the ops accept CPU tensors for triton."""
    if "triton" in sys.modules:
        raise RuntimeError("benchmarks.triton_sass must import triton itself (run it in a fresh process)")
    os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions, not the interpreter's
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import ty_to_cpp
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class Sm90CompileOnlyDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def map_python_to_cpp_type(self, ty):
            return ty_to_cpp(ty)

    driver.set_active(Sm90CompileOnlyDriver())
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        _LAUNCHES.append((self.fn.__name__, kernel, {**dict(zip(self.arg_names, args, strict=False)), **kwargs}))
        return kernel

    JITFunction.run = compile_only
    import vdvae_fast.kernels

    for module in pkgutil.iter_modules(vdvae_fast.kernels.__path__):  # ops imports them lazily: do it now, as JIT
        importlib.import_module(f"vdvae_fast.kernels.{module.name}")

    os.environ["TRITON_INTERPRET"] = "1"  # read by ops at call time only: lets backend="triton" take CPU tensors


def _call_op(case: Case) -> None:
    import torch

    from vdvae_fast import ops

    dtype = getattr(torch, case.dtype)
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format

    def tensor(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)

    if case.op in ("dmol_nll", "dmol_sample"):
        batch, height, width = DMOL_SHAPE
        logits = tensor(batch, 10 * case.num_mix, height, width)
        if case.op == "dmol_sample":
            ops.dmol_sample(logits.detach(), backend="triton")
            return
        x = torch.zeros(batch, 3, height, width).contiguous(memory_format=fmt)
        ops.dmol_nll(logits, x, num_bits=case.bits, backend="triton").sum().backward()
        return
    params = [tensor(*GAUSSIAN_SHAPE) for _ in range(4)]
    if case.op == "sample_and_kl":
        z, kl = ops.sample_and_kl(*params, backend="triton")
        (z.float().sum() + kl.sum()).backward()
    elif case.op == "gaussian_kl":
        ops.gaussian_kl(*params, backend="triton").sum().backward()
    else:
        ops.sample_gaussian(params[0], params[1], temperature=0.8, backend="triton").float().sum().backward()


def _compile_case(case: Case) -> dict:
    """Compile one case's kernels (in a worker) and describe each compiled kernel."""
    _LAUNCHES.clear()
    try:
        _call_op(case)
        error = ""
    except Exception as e:  # noqa: BLE001  (reported per case; the caller decides)
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    kernels = [describe(name, kernel, kwargs) for name, kernel, kwargs in _LAUNCHES]
    return {"case": dataclasses.asdict(case), "label": case.label, "error": error, "kernels": kernels}


# ---- reading a cubin --------------------------------------------------------------------------------------------

_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", re.M)
# Each kernel's loops over the mixtures, in program order, for M mixtures and the launch's constexprs: (trips,
# global loads and stores one trip makes) (kernels/dmol_*.py). ptxas may unroll a loop of constant trip count: a
# body holding u trips' loads and stores runs trips / u times.
LOOP_TRIPS = {
    "dmol_nll_forward_kernel": lambda m, kw: [(m, 10)],
    "dmol_nll_backward_kernel": lambda m, kw: [(m, 20), (m, 21)] if kw.get("ONE_PASS") else [(m, 10), (m, 20)],
    "dmol_sample_kernel": lambda m, kw: [(m // 4, 4)],
}


def loop_bodies(sass: str) -> list[tuple[int, int]]:
    """(instructions, global loads and stores) of each loop of the SASS, in program order: a loop is a backward
    branch and the instructions from its target up to it (NOPs left out)."""
    real = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _INSTRUCTION.finditer(sass) if m.group(3) != "NOP"]
    bodies = []
    for address, op, rest in real:
        target = re.match(r"\s*0x([0-9a-f]+)", rest)
        if op == "BRA" and target and int(target.group(1), 16) < address:
            body = [o for a, o, _ in real if int(target.group(1), 16) <= a <= address]
            bodies.append((len(body), sum(o.startswith(("LDG", "STG")) for o in body)))
    return bodies


def executed_per_thread(name: str, sass: str, kwargs: dict) -> int | None:
    """Instructions one thread executes: the static count, plus (passes - 1) more passes of each loop body, a
    body of u trips (unrolled u times) making trips / u passes. None when the loops found are not the ones
    LOOP_TRIPS expects."""
    count = sass_counts(sass)["sass"]
    bodies = loop_bodies(sass)
    loops = LOOP_TRIPS.get(name.lstrip("_"))
    num_mix = kwargs.get("NUM_MIX")
    # M is a constexpr: the compiler drops a loop of 0 trips and the back edge of a loop of 1
    expected = [(t, ops) for t, ops in loops(num_mix, kwargs) if t >= 2] if loops and num_mix else []
    if len(bodies) != len(expected):
        return None
    for (size, memory_ops), (trips, ops_per_trip) in zip(bodies, expected, strict=True):
        unrolled, rest = divmod(memory_ops, ops_per_trip)
        if rest or not unrolled or trips % unrolled:
            return None
        count += (trips // unrolled - 1) * size
    return count


def sass_counts(sass: str) -> dict:
    """Instruction statistics of one kernel's SASS text (cuobjdump -sass)."""
    ops = [(m.group(3), m.group(4)) for m in _INSTRUCTION.finditer(sass)]
    real = [(op, rest) for op, rest in ops if op != "NOP"]
    if real and real[-1][0] == "BRA":  # the branch-to-self that ends every kernel, never executed
        real = real[:-1]
    widths = {"LDG": Counter(), "STG": Counter()}
    for op, _ in real:
        kind = op.split(".")[0]
        if kind in widths:
            bits = re.search(r"\.(128|64|U16|S16|U8|S8)\b", op)
            widths[kind][
                {"U16": "16", "S16": "16", "U8": "8", "S8": "8"}.get(bits.group(1), bits.group(1)) if bits else "32"
            ] += 1
    return {
        "sass": len(real),
        "mufu": sum(op.startswith("MUFU") for op, _ in real),
        "branches": sum(op == "BRA" for op, _ in real),
        "calls": sum(op.startswith("CALL") for op, _ in real),
        "barriers": sum(op.startswith("BAR") for op, _ in real),
        "shuffles": sum(op.startswith("SHFL") for op, _ in real),
        "local_memory_ops": sum(op.startswith(("LDL", "STL")) for op, _ in real),
        "ldg": dict(sorted(widths["LDG"].items(), key=lambda kv: -int(kv[0]))),
        "stg": dict(sorted(widths["STG"].items(), key=lambda kv: -int(kv[0]))),
    }


def describe(name: str, kernel, kwargs: dict) -> dict:
    """Registers, spills, shared memory and SASS statistics of one compiled kernel, and its launch geometry."""
    info = {"kernel": name}
    cubin = kernel.asm.get("cubin")
    if not cubin:
        return info
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    if os.environ.get("TRITON_SASS_DIR"):  # keep the SASS text for reading
        with open(os.path.join(os.environ["TRITON_SASS_DIR"], f"{name}_{kernel.metadata.hash[:12]}.sass"), "w") as f:
            f.write(sass)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m:
        info.update(zip(("registers", "stack", "shared", "local"), map(int, m.groups()), strict=True))
    info.update(sass_counts(sass))
    threads = kernel.metadata.num_warps * 32
    items = kwargs.get("BLOCK_P") or kwargs.get("BLOCK")  # pixels (dmol) or elements (Gaussian) per program
    info["threads"] = threads
    info["items_per_program"] = items
    executed = executed_per_thread(name, sass, kwargs)
    if items and executed is not None:
        info["per_item"] = round(executed * threads / items, 1)
    info["constexprs"] = {k: v for k, v in kwargs.items() if k.isupper() and isinstance(v, (int, bool))}
    return info


def problems(row: dict) -> list[str]:
    """What breaks the compile test's limits in one case's result."""
    found = [f"{row['label']}: {row['error']}"] if row["error"] else []
    if not row["error"] and not row["kernels"]:
        found.append(f"{row['label']}: no kernel was compiled")
    for k in row["kernels"]:
        if "registers" not in k:
            found.append(f"{row['label']} {k['kernel']}: no cubin")
            continue
        if k["registers"] > MAX_REGISTERS:
            found.append(f"{row['label']} {k['kernel']}: {k['registers']} registers > {MAX_REGISTERS}")
        if k["local"] or k["stack"] or k["local_memory_ops"]:
            found.append(f"{row['label']} {k['kernel']}: spills (local {k['local']} B, stack {k['stack']} B)")
    return found


# ---- the committed table ------------------------------------------------------------------------------------------

_DIRECTION = {"forward": "forward", "backward": "backward"}


def _direction(kernel: str) -> str:
    return next((d for d in _DIRECTION if d in kernel), "forward")


def _widths(counts: dict) -> str:
    return " ".join(f"{n}x{w}" for w, n in counts.items()) or "-"


def table(result: dict) -> str:
    lines = [
        "# Triton kernels compiled for sm_90 (H100/H200): registers, spills, SASS",
        "",
        f"Made with `{result['command']}` (triton {result['triton']}, torch {result['torch']}), with no GPU: each kernel",
        'is compiled through `vdvae_fast.ops` (backend="triton") for `GPUTarget("cuda", 90, 32)` and read back',
        "with the `cuobjdump` of Triton's wheel. Launch shapes: dmol (B, H, W) = "
        f"{DMOL_SHAPE}, Gaussian tensors {GAUSSIAN_SHAPE}.",
        "",
        "Columns: `regs` registers per thread; `spill` local memory bytes (stack + local; 0 means no spills);",
        "`smem` static shared memory bytes; `SASS` instructions in the kernel (NOPs and the final branch-to-self",
        "left out); `MUFU` special-function instructions (exp2, rcp, lg2, ...); `LDG`/`STG` global loads/stores",
        "as count x width in bits; `bra` branches (0: straight-line code); `exec/item` instructions executed per",
        "pixel (dmol) or element (Gaussian ops), per thread-lane, derived below.",
        "",
        "**exec/item** = E x threads per program / items per program, where E is what one thread executes: the",
        "SASS count, plus (passes - 1) more passes of each loop body. The dmol kernels loop over the M mixtures",
        "(dmol_nll: M trips, the backward two such loops; dmol_sample: M // 4 groups of four mixtures), a loop",
        "being a backward branch and the instructions from its target to it; where ptxas unrolled a loop u",
        "times (its body holds u trips' global loads and stores) it makes trips / u passes. The Gaussian",
        "kernels are straight-line code. Predicated-off instructions count, as the hardware issues them; other",
        "branches (e.g. a slow path) count every path, an upper bound. A program of T threads handles P pixels",
        "or elements: each costs E x T / P.",
        "",
        "| op | kernel | dtype | layout | M | bits | regs | spill | smem | SASS | MUFU | LDG | STG | bra | exec/item |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        case = row["case"]
        for k in row["kernels"]:
            lines.append(
                f"| {case['op']} | {k['kernel'].strip('_')} | {case['dtype']} | {case['layout']} | "
                f"{case['num_mix'] or '-'} | {case['bits'] or '-'} | {k.get('registers')} | "
                f"{k.get('stack', 0) + k.get('local', 0)} | {k.get('shared')} | {k.get('sass')} | {k.get('mufu')} | "
                f"{_widths(k.get('ldg', {}))} | {_widths(k.get('stg', {}))} | {k.get('branches')} | "
                f"{k.get('per_item', '-')} |"
            )
        if row["error"]:
            lines.append(f"| {case['op']} | FAILED: {row['error']} |" + " |" * 13)
    lines += ["", *_dmol_totals(result)]
    return "\n".join(lines) + "\n"


def _dmol_totals(result: dict) -> list[str]:
    """dmol_nll forward + backward per pixel, the figure the roofline design is held to."""
    out = ["dmol_nll forward + backward, instructions executed per pixel:", ""]
    for row in result["rows"]:
        case = row["case"]
        if case["op"] == "dmol_nll" and case["bits"] == 8 and len(row["kernels"]) == 2:
            total = sum(k.get("per_item", 0) for k in row["kernels"])
            out.append(f"- {case['dtype']} {case['layout']} M={case['num_mix']}: {total:.0f}")
    return out


def run_all(selected: list[Case], jobs: int) -> dict:
    _install_compile_only_sm90()
    import multiprocessing

    import torch
    import triton

    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            rows = list(pool.map(_compile_case, selected))
    else:
        rows = [_compile_case(case) for case in selected]
    return {"triton": triton.__version__, "torch": torch.__version__, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a failed compile, spills or > 128 registers")
    parser.add_argument("--json", help="write every kernel's statistics here")
    parser.add_argument("--table", help="write the markdown table here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiling processes")
    parser.add_argument("--from-json", help="write the table of an earlier --json run instead of compiling")
    parser.add_argument("--case", action="append", help="compile the case with exactly this label (repeatable)")
    parser.add_argument("--only", action="append", help="compile only the cases whose label contains this (repeatable)")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
    else:
        reason = ptxas_missing()
        if reason:
            print(f"cannot compile for sm_90: {reason}", file=sys.stderr)
            return 2
        selected = [
            c
            for c in cases()
            if (not args.only and not args.case)
            or any(text in c.label for text in args.only or ())
            or c.label in (args.case or ())
        ]
        result = run_all(selected, args.jobs)
        words = sys.argv[1:] if argv is None else argv
        result["command"] = "PYTHONPATH=. python -m benchmarks.triton_sass " + " ".join(map(shlex.quote, words))
    found = [p for row in result["rows"] for p in problems(row)]
    for row in result["rows"]:
        kernels = "; ".join(
            f"{k['kernel']} regs={k.get('registers')} spill={k.get('local')} sass={k.get('sass')} "
            f"per_item={k.get('per_item')}"
            for k in row["kernels"]
        )
        print(f"[{'FAIL' if row['error'] else 'ok'}] {row['label']}: {kernels} {row['error']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.table:
        with open(args.table, "w") as f:
            f.write(table(result))
    for p in found:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if (args.check and found) else 0


if __name__ == "__main__":
    sys.exit(main())
