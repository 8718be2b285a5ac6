"""Every Triton kernel the ops launch compiles for sm_90 (H100/H200) within 128 registers and without spills.

No GPU is needed: benchmarks/triton_sass.py compiles through the ops' own launch code with a driver that
reports an sm_90 target, compile-only. It runs in a subprocess because it must import triton itself, not
interpreted, and replaces Triton's driver: neither may leak into the other tests, which run interpreted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import triton_sass

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


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Compile every case once, in a fresh process; rows by case label."""
    out = tmp_path_factory.mktemp("sm90") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is every version's default
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.triton_sass", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0 and out.exists(), (
        f"the compile run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return {row["label"]: row for row in json.loads(out.read_text())["rows"]}


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
