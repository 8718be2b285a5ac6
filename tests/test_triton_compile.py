"""Every Triton kernel the ops launch compiles for sm_90 (H100/H200) within 128 registers and without spills.

No GPU is needed: benchmarks/triton_sass.py compiles through the ops' own launch code with a driver that
reports an sm_90 target, compile-only. It runs in a subprocess because it must import triton itself, not
interpreted, and replaces Triton's driver: neither may leak into the other tests, which run interpreted.
The Gaussian kernels' other parametrizations (each a specialization of its own) are compiled the same way
through their launchers: `python -m tests.test_triton_compile OUT_JSON` is that subprocess.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from benchmarks import triton_sass
from vdvae_fast import reference  # imports no triton: the compiling subprocess must import it itself

ROOT = Path(__file__).resolve().parents[1]
CASES = triton_sass.cases()
# The kernels each op launches: a failure to launch one would otherwise pass as "nothing to check".
EXPECTED_KERNELS = {
    "dmol_nll": {"_dmol_nll_forward_kernel", "_dmol_nll_backward_kernel"},
    "dmol_sample": {"_dmol_sample_kernel"},
    "sample_and_kl": {"_sample_and_kl_forward_kernel", "_sample_and_kl_backward_kernel"},
    "gaussian_kl": {"_gaussian_kl_forward_kernel", "_gaussian_kl_backward_kernel"},
    "sample_gaussian": {"_sample_gaussian_forward_kernel", "_sample_gaussian_backward_kernel"},
}
_MISSING = triton_sass.ptxas_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"cannot compile Triton for sm_90: {_MISSING}")


def _compile_subprocess(args: list[str], out: Path) -> dict[str, dict]:
    """Run a compile-only module in a fresh process (see the module docstring); its rows by case label."""
    done = subprocess.run(
        [sys.executable, "-m", *args, str(out)],
        cwd=ROOT,
        env=triton_sass.compile_process_env(str(ROOT)),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0 and out.exists(), (
        f"the compile run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return {row["label"]: row for row in json.loads(out.read_text())["rows"]}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Compile every case once, in a fresh process; rows by case label."""
    return _compile_subprocess(["benchmarks.triton_sass", "--json"], tmp_path_factory.mktemp("sm90") / "kernels.json")


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_compiles_for_sm90_in_registers_without_spills(compiled: dict[str, dict], case: triton_sass.Case) -> None:
    row = compiled[case.label]
    assert not row["error"], row["error"]
    assert {k["kernel"] for k in row["kernels"]} == EXPECTED_KERNELS[case.op]
    for kernel in row["kernels"]:
        name = kernel["kernel"]
        assert "registers" in kernel, f"{name}: no cubin was produced"
        assert kernel["registers"] <= triton_sass.MAX_REGISTERS, f"{name}: {kernel['registers']} registers"
        assert kernel["local"] == 0 and kernel["stack"] == 0, f"{name} spills: {kernel}"
        assert kernel["local_memory_ops"] == 0, f"{name} reads or writes local memory"
    assert triton_sass.problems(row) == []


def test_sass_statistics_count_what_the_text_holds() -> None:
    """The parser behind the committed table, on a hand-written SASS excerpt."""
    sass = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!P1 LDG.E.128 R4, desc[UR4][R24.64] ;
        /*0020*/                   LDG.E.U16 R8, desc[UR4][R2.64] ;
        /*0030*/                   MUFU.EX2 R9, R9 ;
        /*0040*/                   MUFU.RCP R9, R9 ;
        /*0050*/               @P0 STG.E.64 desc[UR4][R2.64], R8 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70;
        /*0080*/                   NOP;
    """
    counts = triton_sass.sass_counts(sass)
    assert counts["sass"] == 7 and counts["mufu"] == 2 and counts["branches"] == 0
    assert counts["ldg"] == {"128": 1, "16": 1} and counts["stg"] == {"64": 1}


@dataclasses.dataclass(frozen=True)
class Parametrization:
    """One Gaussian kernel launch under a non-default parametrization (codes index reference.SCALES, POSTERIORS,
    KL_ESTIMATORS), called through its launcher."""

    op: str
    dtype: str
    layout: str
    scale: int
    posterior: int = 0
    kl_estimator: int = 0

    @property
    def label(self) -> str:
        names = [reference.SCALES[self.scale]]
        if self.op != "sample_gaussian":
            names.append(reference.POSTERIORS[self.posterior])
        if self.op == "sample_and_kl":
            names.append(reference.KL_ESTIMATORS[self.kl_estimator])
        return f"{self.op} {self.dtype} {self.layout} " + " ".join(names)


def parametrizations() -> list[Parametrization]:
    """Every combination but the default (exp, direct, analytic; the ops' cases compile it), in float32 contiguous
    and bfloat16 channels_last: the codes are orthogonal to dtype and layout, which the ops' cases cover."""
    out = []
    for dtype, layout in (("float32", "contiguous"), ("bfloat16", "channels_last")):
        for scale, posterior, estimator in itertools.product(range(2), range(3), range(2)):
            out.append(Parametrization("sample_and_kl", dtype, layout, scale, posterior, estimator))
            if estimator == 0:
                out.append(Parametrization("gaussian_kl", dtype, layout, scale, posterior))
            if estimator == 0 and posterior == 0:
                out.append(Parametrization("sample_gaussian", dtype, layout, scale))
    return [p for p in out if (p.scale, p.posterior, p.kl_estimator) != (0, 0, 0)]


def _compile_parametrization(case: Parametrization) -> dict:
    """Compile one case's forward and backward kernels (in the compiling subprocess) and describe them."""
    import torch

    from vdvae_fast.kernels import gaussian_kl, sample_and_kl, sample_gaussian

    triton_sass._LAUNCHES.clear()
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    t = [torch.zeros(triton_sass.GAUSSIAN_SHAPE, dtype=getattr(torch, case.dtype)).contiguous(memory_format=fmt)] * 5
    beta = 0.7
    if case.op == "sample_and_kl":
        codes = (case.scale, beta, case.posterior, case.kl_estimator)
        sample_and_kl.sample_and_kl_forward(*t[:4], 5, *codes)
        sample_and_kl.sample_and_kl_backward(t[4], torch.zeros(t[0].shape[0]), *t[:4], 5, *codes)
    elif case.op == "gaussian_kl":
        codes = (case.scale, beta, case.posterior)
        gaussian_kl.gaussian_kl_forward(*t[:4], *codes)
        gaussian_kl.gaussian_kl_backward(t[4].float(), *t[:4], *codes)
    else:
        sample_gaussian.sample_gaussian_forward(t[0], t[1], 0.8, 5, case.scale, beta)
        sample_gaussian.sample_gaussian_backward(t[4], t[0], t[1], 0.8, 5, case.scale, beta)
    kernels = [triton_sass.describe(name, kernel, kwargs) for name, kernel, kwargs in triton_sass._LAUNCHES]
    return {"label": case.label, "error": "", "kernels": kernels}


PARAMETRIZATIONS = parametrizations()


@pytest.fixture(scope="module")
def compiled_parametrizations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return _compile_subprocess(["tests.test_triton_compile"], tmp_path_factory.mktemp("sm90") / "codes.json")


@pytest.mark.parametrize("case", PARAMETRIZATIONS, ids=[c.label for c in PARAMETRIZATIONS])
def test_every_gaussian_parametrization_compiles_in_registers_without_spills(
    compiled_parametrizations: dict[str, dict], case: Parametrization
) -> None:
    row = compiled_parametrizations[case.label]
    assert {k["kernel"] for k in row["kernels"]} == EXPECTED_KERNELS[case.op]
    assert all(k["constexprs"]["SCALE"] == case.scale for k in row["kernels"])
    assert triton_sass.problems(row) == []


if __name__ == "__main__":  # the compiling subprocess: python -m tests.test_triton_compile OUT_JSON
    triton_sass._install_compile_only_sm90()
    import triton

    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=multiprocessing.get_context("fork")) as pool:
        rows = list(pool.map(_compile_parametrization, PARAMETRIZATIONS))
    Path(sys.argv[1]).write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
