"""Builds vdvae_fast._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc exists.

Build against the installed torch (`pip install --no-build-isolation -e .`): an isolated build
environment would download a second, CUDA-enabled torch.
"""

from __future__ import annotations

import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
# Architectures built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (a build machine): A100 and
# H100/H200 natively, later GPUs through the PTX of the newest.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def cuda_arch_list(configured: str | None, visible_capabilities: list[tuple[int, int]]) -> tuple[str | None, str]:
    """The TORCH_CUDA_ARCH_LIST to set (None: leave torch to choose from the visible GPUs), and why.

    Unset (or "native") with no GPU visible, torch's own choice fails (an IndexError in its arch detection), so
    a default is set instead.
    """
    if configured and not (configured == "native" and not visible_capabilities):
        return configured, f"TORCH_CUDA_ARCH_LIST={configured}"
    if visible_capabilities:
        archs = sorted({f"{major}.{minor}" for major, minor in visible_capabilities})
        return None, f"the visible GPUs' architectures ({', '.join(archs)})"
    return DEFAULT_CUDA_ARCHS, f"{DEFAULT_CUDA_ARCHS}: no GPU visible and TORCH_CUDA_ARCH_LIST unset"


def announce(message: str) -> None:
    """Prints a line of the build plan where a user sees it: pip hides a build backend's output unless run with
    -v (pypa/pip#6634), so it also goes to the terminal when pip captures stdout."""
    print(message, flush=True)
    if sys.stdout.isatty():
        return
    try:
        with open("/dev/tty", "w") as terminal:
            terminal.write(message + "\n")
    except OSError:  # no terminal (CI): the line stays in the build log, shown with pip -v
        pass


def _cxx_flags() -> list[str]:
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-std=c++17"]
    # The kernels are built where they run (an editable install); VDVAE_FAST_PORTABLE=1 builds for any x86-64.
    if os.environ.get("VDVAE_FAST_PORTABLE") != "1":
        flags.append("-march=native")
    return flags


def _op_names(sources: list[str]) -> str:
    """The ops with a kernel file among `sources` (`<op>_cpu.cpp`, `<op>_cuda.cu`)."""
    bases = [os.path.basename(source) for source in sources]
    return ", ".join(sorted({b.rsplit("_", 1)[0] for b in bases if b.endswith(("_cpu.cpp", "_cuda.cu"))}))


def _extension() -> cpp_extension.CppExtension:
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    want_cuda = os.environ.get("VDVAE_FAST_NO_CUDA") != "1"
    has_cuda_torch = torch.version.cuda is not None
    has_nvcc = cpp_extension.CUDA_HOME is not None
    if want_cuda and has_cuda_torch and has_nvcc:
        visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        archs, why = cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), visible)
        if archs is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        announce(
            f"vdvae_fast: building the C++ CPU kernels and the CUDA kernels ({_op_names(cuda_sources)}) for {why}, "
            f"nvcc from {cpp_extension.CUDA_HOME}: several minutes on a few cores"
        )
        return cpp_extension.CUDAExtension(
            "vdvae_fast._C",
            cpu_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("VDVAE_FAST_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": _cxx_flags(),
                "nvcc": ["-O3", "--use_fast_math", "-std=c++17", "-lineinfo"],
            },
            extra_link_args=["-fopenmp"],
        )
    reason = (
        "VDVAE_FAST_NO_CUDA=1"
        if not want_cuda
        else "torch was built without CUDA"
        if not has_cuda_torch
        else "nvcc was not found (set CUDA_HOME)"
    )
    announce(
        f"vdvae_fast: building the C++ CPU kernels ({_op_names(cpu_sources)}); CUDA kernels skipped because {reason}"
    )
    return cpp_extension.CppExtension(
        "vdvae_fast._C",
        cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": _cxx_flags()},
        extra_link_args=["-fopenmp"],
    )


def persistent_build_temp() -> str:
    """Where the object files live across builds, one folder per Python ABI."""
    return os.path.join(ROOT, "build", f"temp.vdvae_fast.{sys.implementation.cache_tag}")


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension with its object files kept in the project's build/ folder: pip's editable install
    builds in a fresh temporary folder each time, so `pip install -e ".[bench]"` after a first install would
    recompile every kernel; there ninja finds the objects up to date and only links."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.build_temp = persistent_build_temp()


if __name__ == "__main__":
    setup(
        packages=find_packages(include=["vdvae_fast", "vdvae_fast.*"]),
        ext_modules=[_extension()],
        cmdclass={"build_ext": BuildExtension},
    )
