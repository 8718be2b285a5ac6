"""Static audit of the CUDA kernels for sm_90, with no GPU: the SASS that nvcc and ptxas make of csrc/*.cu.

    python benchmarks/cuda_sass.py --out benchmarks/results/sm90-cuda.md

Per kernel: registers, spill bytes and static shared memory (ptxas -v), SASS instructions and MUFU (special
function unit) instructions, the widths of its global loads and stores (cuobjdump -sass; the cuobjdump in
triton's wheel serves where the CUDA toolkit has none), and the instructions one thread executes, read off
the control-flow graph of the SASS:
- the dmol kernels at M = 10 have every loop of their fast paths unrolled (the mixtures; the vector copies of
  contiguous and channels_last tensors): a thread, which handles one pixel, executes at most the longest path
  from the entry to an EXIT, each loop that is left (the scalar copies of unaligned or other strided tensors)
  counted once. An upper bound per pixel for the vector copies; the instructions of a warp count once per
  lane, idle lanes included, which is what they cost in issue slots;
- a kernel with loops (grid-stride loops over packets of elements, the Gaussian ops) executes its longest loop
  iteration once per packet: per element, that iteration over the packet's element count (its last template
  argument; prologue and epilogue are left out); the finish kernels: per partial summed.
Calls to the slow paths of IEEE division and square root (denormal or huge operands) are not followed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCH = "sm_90"
DMOL_MIXTURES = 10  # the M of the dmol rows' dynamic shared memory and per-pixel counts
TILE_PITCH = 65  # dmol_tile_cuda.cuh's kTilePitch: floats per channel row of a tile


def nvcc_path() -> str | None:
    from torch.utils import cpp_extension

    found = shutil.which("nvcc")
    if found:
        return found
    return os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None


def nvcc_command(source: Path, output: Path, *extra: str) -> list[str]:
    """nvcc on one csrc/ file with the flags setup.py's CUDAExtension uses, for sm_90, into `output`."""
    import torch
    from torch.utils import cpp_extension

    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    includes += [f"-I{ROOT / 'csrc'}", f"-I{sysconfig.get_paths()['include']}"]
    # The CPU torch wheel ships c10/cuda without its generated config header (Windows export macros only).
    config = Path(cpp_extension.include_paths()[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    return [
        nvcc_path() or "nvcc",
        str(source),
        "-o",
        str(output),
        "-std=c++17",
        "-O3",
        "--use_fast_math",
        f"-arch={ARCH}",
        *cpp_extension.COMMON_NVCC_FLAGS,  # relaxed constexpr, no half operators
        "-DTORCH_EXTENSION_NAME=_C",
        "-DVDVAE_FAST_WITH_CUDA",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *([] if config.exists() else ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]),
        *includes,
        *extra,
    ]


def cuobjdump_path() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not bundled.exists():
        sys.exit("cuobjdump not found: install the CUDA toolkit or triton")
    return str(bundled)


@dataclass
class Kernel:
    mangled: str
    name: str = ""
    registers: int = 0
    spill_bytes: int = 0
    static_smem: int = 0
    instructions: list[tuple[int, str]] = field(default_factory=list)  # (address, instruction text)


def _ptxas_resources(log: str) -> dict[str, dict[str, int]]:
    """Registers, spill bytes and static shared memory per mangled function, from ptxas -v."""
    resources: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        found = re.search(r"Function properties for (\S+)", line)
        if found:
            current = resources.setdefault(found.group(1), {"registers": 0, "spill": 0, "smem": 0})
            continue
        if current is None:
            continue
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills:
            current["spill"] = int(spills.group(1)) + int(spills.group(2))
        registers = re.search(r"Used (\d+) registers", line)
        if registers:
            current["registers"] = int(registers.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(smem.group(1)) if smem else 0
    return resources


def _sass_functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    functions: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in sass.splitlines():
        header = re.match(r"\s+Function : (\S+)", line)
        if header:
            current = functions.setdefault(header.group(1), [])
            continue
        instruction = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+([^;]*);", line)
        if instruction and current is not None:
            text = instruction.group(2).strip()
            if not text.startswith("NOP"):
                current.append((int(instruction.group(1), 16), text))
    return functions


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {name: name for name in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines(), strict=True))


def compile_kernels(sources: list[Path], workdir: Path) -> list[Kernel]:
    """Every __global__ function of the sources, compiled in parallel."""
    jobs = {}
    for source in sources:
        cubin = workdir / f"{source.stem}.cubin"
        command = nvcc_command(source, cubin, "-cubin", "-Xptxas", "-v")
        jobs[source] = (cubin, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    kernels = []
    for source, (cubin, job) in jobs.items():
        log, _ = job.communicate()
        if job.returncode != 0:
            sys.exit(f"nvcc failed on {source.name}:\n{log[-4000:]}")
        resources = _ptxas_resources(log)
        sass = subprocess.run([cuobjdump_path(), "-sass", str(cubin)], capture_output=True, text=True, check=True)
        for mangled, instructions in _sass_functions(sass.stdout).items():
            kernel = Kernel(mangled, instructions=instructions)
            found = resources.get(mangled, {})
            kernel.registers, kernel.spill_bytes, kernel.static_smem = (
                found.get("registers", 0),
                found.get("spill", 0),
                found.get("smem", 0),
            )
            kernels.append(kernel)
    names = _demangle([k.mangled for k in kernels])
    for kernel in kernels:
        kernel.name = _short_name(names[kernel.mangled])
    return sorted(kernels, key=lambda k: k.name)


def _short_name(demangled: str) -> str:
    """`void vdvae_fast::(anonymous namespace)::k<float, 10>(float const*, ...)` -> `k<fp32, 10>`"""
    name = demangled.removeprefix("void ").replace("vdvae_fast::", "").replace("(anonymous namespace)::", "")
    cut = name.index("(") if "(" in name else len(name)
    if "<" in name[:cut]:
        depth = 0
        for i, char in enumerate(name):
            depth += {"<": 1, ">": -1}.get(char, 0)
            if char == ">" and depth == 0:
                cut = i + 1
                break
    name = name[:cut].replace("c10::BFloat16", "bf16").replace("c10::Half", "fp16").replace("float", "fp32")
    # the dmol kernels' scale parametrization: VDVAE's exp or Efficient-VDVAE's softplus
    return re.sub(
        r"dmol::Scales<(false|true), fp32>\s*", lambda m: "exp" if m.group(1) == "false" else "softplus", name
    )


# ---------------------------------------------------------------------------------------------------------
# Control flow of the SASS
# ---------------------------------------------------------------------------------------------------------

_BRANCH = re.compile(r"^(@!?U?P\w+\s+)?BRA(\.\w+)*\s+(?:!?U?P\w+,\s*)?(0x[0-9a-f]+)")


@dataclass
class Block:
    start: int
    size: int = 0
    successors: list[int] = field(default_factory=list)


def control_flow(instructions: list[tuple[int, str]]) -> dict[int, Block]:
    """Basic blocks by start address, with their successors (EXIT ends a path; a BRA to itself is the padding)."""
    addresses = [a for a, _ in instructions]
    leaders = {addresses[0]}
    for i, (address, text) in enumerate(instructions):
        branch = _BRANCH.match(text)
        if branch and int(branch.group(3), 16) != address:
            leaders.add(int(branch.group(3), 16))
        if (branch or "EXIT" in text) and i + 1 < len(instructions):
            leaders.add(addresses[i + 1])
    blocks: dict[int, Block] = {}
    current = None
    for i, (address, text) in enumerate(instructions):
        if address in leaders:
            current = blocks.setdefault(address, Block(address))
        current.size += 1
        branch = _BRANCH.match(text)
        predicated = text.startswith("@")
        following = addresses[i + 1] if i + 1 < len(instructions) else None
        ends = branch or "EXIT" in text or (following in leaders)
        if not ends:
            continue
        if branch:
            target = int(branch.group(3), 16)
            if target != address:
                current.successors.append(target)
            if predicated and following is not None:
                current.successors.append(following)
        elif "EXIT" in text:
            if predicated and following is not None:
                current.successors.append(following)
        elif following is not None:
            current.successors.append(following)
    return blocks


def _back_edges(blocks: dict[int, Block], entry: int) -> set[tuple[int, int]]:
    back, state = set(), {}
    stack = [(entry, iter(blocks[entry].successors))]
    state[entry] = "open"
    while stack:
        node, successors = stack[-1]
        for succ in successors:
            if state.get(succ) == "open":
                back.add((node, succ))
            elif succ not in state:
                state[succ] = "open"
                stack.append((succ, iter(blocks[succ].successors)))
                break
        else:
            state[node] = "done"
            stack.pop()
    return back


def _longest_paths_from(blocks: dict[int, Block], start: int, back: set[tuple[int, int]]) -> dict[int, int]:
    """Instructions on the longest path from `start` to the end of each block, back edges removed."""
    order, seen = [], set()

    def visit(node: int) -> None:
        stack = [(node, iter(blocks[node].successors))]
        seen.add(node)
        while stack:
            current, successors = stack[-1]
            for succ in successors:
                if (current, succ) not in back and succ not in seen:
                    seen.add(succ)
                    stack.append((succ, iter(blocks[succ].successors)))
                    break
            else:
                order.append(current)
                stack.pop()

    visit(start)
    longest = {start: blocks[start].size}
    for node in reversed(order):
        if node not in longest:
            continue
        for succ in blocks[node].successors:
            if (node, succ) not in back:
                longest[succ] = max(longest.get(succ, 0), longest[node] + blocks[succ].size)
    return longest


@dataclass
class PathCount:
    longest: int  # the longest path from entry to an exit, each loop's body counted once
    loop_iteration: int  # the longest single iteration of any loop (0: no loops)


def path_count(instructions: list[tuple[int, str]]) -> PathCount:
    blocks = control_flow(instructions)
    entry = instructions[0][0]
    back = _back_edges(blocks, entry)
    longest = _longest_paths_from(blocks, entry, back)
    exits = [b for b in blocks.values() if b.start in longest and not b.successors]
    iteration = 0
    for tail, head in back:
        within = _longest_paths_from(blocks, head, back)
        iteration = max(iteration, within.get(tail, 0))
    return PathCount(max(longest[b.start] for b in exits), iteration)


# ---------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------


def _widths(instructions: list[tuple[int, str]], opcode: str) -> str:
    widths: dict[int, int] = {}
    for _, text in instructions:
        op = text.split()[1] if text.startswith("@") else text.split()[0]
        if not op.startswith(opcode + "."):
            continue
        found = re.search(r"\.(128|64|U16|S16|U8|S8)\b", op)
        bits = {"U16": 16, "S16": 16, "U8": 8, "S8": 8}.get(found.group(1), 0) if found else 32
        bits = bits or int(found.group(1))
        widths[bits] = widths.get(bits, 0) + 1
    return ", ".join(f"{count}×{bits}" for bits, count in sorted(widths.items(), reverse=True)) or "–"


def _dynamic_smem(name: str) -> int:
    rows = {"dmol_nll_backward_kernel": 11, "dmol_nll_forward_kernel": 10, "dmol_sample_forward_kernel": 10}
    for kernel, per_mixture in rows.items():
        if name.startswith(kernel):
            return per_mixture * DMOL_MIXTURES * TILE_PITCH * 4
    return 0


def _packet_elements(name: str) -> int:
    found = re.search(r", (\d+)>$", name)
    return int(found.group(1)) if found else 1


def _dmol_mixtures(name: str) -> int | None:
    """The compile-time M of a dmol kernel (`dmol_nll_forward_kernel<fp32, 10, exp>` -> 10), else None."""
    found = re.match(r"dmol_\w+<\w+, (\d+)", name)
    return int(found.group(1)) if found else None


def _executed(kernel: Kernel) -> str:
    count = path_count(kernel.instructions)
    mixtures = _dmol_mixtures(kernel.name)
    if mixtures == DMOL_MIXTURES:
        return f"≤ {count.longest} per pixel"
    if mixtures == 0:
        return "– (M at run time: loops over the mixtures)"
    if count.loop_iteration == 0:
        return f"≤ {count.longest} per thread"
    per = count.loop_iteration / _packet_elements(kernel.name)
    return f"{per:.0f} per element"


def table(kernels: list[Kernel], command: str) -> str:
    lines = [
        "# CUDA kernels for sm_90: registers, spills, SASS",
        "",
        "Made without a GPU by",
        "",
        "```bash",
        command,
        "```",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        f"Dynamic shared memory of the dmol kernels is at M = {DMOL_MIXTURES} (their tile of 64 pixels; it grows with M).",
        "",
        "| kernel | registers | spill bytes | shared memory (static + dynamic) | SASS | MUFU | global loads (count × bits) "
        "| global stores | executed instructions |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    per_pixel = {k.name: path_count(k.instructions).longest for k in kernels}
    totals = []
    for scales in ("exp", "softplus"):
        forward = per_pixel.get(f"dmol_nll_forward_kernel<fp32, {DMOL_MIXTURES}, {scales}>")
        backward = per_pixel.get(f"dmol_nll_backward_kernel<fp32, {DMOL_MIXTURES}, {scales}>")
        if forward and backward:
            totals.append(
                f"dmol_nll forward + backward at M = {DMOL_MIXTURES} in fp32, {scales} scales: at most "
                f"{forward} + {backward} = {forward + backward} instructions per pixel."
            )
    lines[-3:-3] = [line + "\n" for line in totals[:-1]] + totals[-1:]
    for k in kernels:
        mufu = sum(1 for _, text in k.instructions if "MUFU." in text)
        smem = f"{k.static_smem} + {_dynamic_smem(k.name)}"
        lines.append(
            f"| `{k.name}` | {k.registers} | {k.spill_bytes} | {smem} | {len(k.instructions)} | {mufu} | "
            f"{_widths(k.instructions, 'LDG')} | {_widths(k.instructions, 'STG')} | {_executed(k)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="markdown file for the table (default: print it)")
    parser.add_argument("sources", nargs="*", type=Path, help="csrc/*.cu files (default: all)")
    args = parser.parse_args(argv)
    sources = args.sources or sorted((ROOT / "csrc").glob("*.cu"))
    with tempfile.TemporaryDirectory() as workdir:
        kernels = compile_kernels(sources, Path(workdir))
    command = "python benchmarks/cuda_sass.py" + (f" --out {args.out}" if args.out else "")
    text = table(kernels, command)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
