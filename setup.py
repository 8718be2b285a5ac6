"""Builds vdvae_fast._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc exists.

Build against the installed torch (`pip install --no-build-isolation -e .`): an isolated build
environment would download a second, CUDA-enabled torch.
"""

from __future__ import annotations

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cxx_flags() -> list[str]:
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-std=c++17"]
    # The kernels are built where they run (an editable install); VDVAE_FAST_PORTABLE=1 builds for any x86-64.
    if os.environ.get("VDVAE_FAST_PORTABLE") != "1":
        flags.append("-march=native")
    return flags


def _extension() -> cpp_extension.CppExtension:
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    want_cuda = os.environ.get("VDVAE_FAST_NO_CUDA") != "1"
    has_cuda_torch = torch.version.cuda is not None
    has_nvcc = cpp_extension.CUDA_HOME is not None
    if want_cuda and has_cuda_torch and has_nvcc:
        print(f"vdvae_fast: building the C++ CPU kernels and the CUDA kernels (nvcc from {cpp_extension.CUDA_HOME})")
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
    print(f"vdvae_fast: building the C++ CPU kernels only; CUDA kernels skipped because {reason}")
    return cpp_extension.CppExtension(
        "vdvae_fast._C",
        cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": _cxx_flags()},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["vdvae_fast", "vdvae_fast.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
