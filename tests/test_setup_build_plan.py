"""setup.py's build plan: the CUDA architectures chosen without a GPU, and where the objects are kept."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup_module():
    spec = importlib.util.spec_from_file_location("vdvae_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only as __main__
    return module


def test_no_gpu_and_no_arch_list_gets_a_default_with_ptx_instead_of_torchs_index_error() -> None:
    archs, why = _setup_module().cuda_arch_list(None, [])
    assert archs is not None and "9.0" in archs.split(";")[-1] and archs.endswith("+PTX")
    assert "no GPU visible" in why
    assert _setup_module().cuda_arch_list("native", [])[0] == archs  # torch's "native" fails the same way


def test_an_arch_list_the_user_sets_is_kept() -> None:
    assert _setup_module().cuda_arch_list("8.6", [])[0] == "8.6"
    assert _setup_module().cuda_arch_list("", [(9, 0)])[0] is None  # empty counts as unset


def test_visible_gpus_leave_the_choice_to_torch_and_are_named() -> None:
    archs, why = _setup_module().cuda_arch_list(None, [(9, 0), (8, 0), (9, 0)])
    assert archs is None and "8.0, 9.0" in why


def test_objects_are_kept_in_the_project_build_folder_across_installs() -> None:
    setup = _setup_module()
    assert Path(setup.persistent_build_temp()).parent == ROOT / "build"
    assert setup._op_names(["csrc/dmol_nll_cuda.cu", "csrc/sample_and_kl_cpu.cpp", "csrc/ops.cpp"]) == (
        "dmol_nll, sample_and_kl"
    )
