"""How benchmarks/triton_sass.py counts the instructions a dmol kernel executes, on hand-written SASS.

A loop over the mixtures runs its body once per trip, unless ptxas unrolled it: a body holding u trips'
global loads and stores then runs trips / u times (the dmol_nll backward's short scaling loop is unrolled 5x
at M = 10). The forward's loop over M = 10 mixtures makes 10 global loads per trip.
"""

from __future__ import annotations

from benchmarks import triton_sass


def _sass(loop_body: list[str]) -> str:
    """A kernel of 2 instructions before a loop, the loop's body (its back branch last) and an exit."""
    lines = ["LDC R1, c[0x0][0x28] ;", "MOV R2, RZ ;", *loop_body, "@P0 BRA 0x20 ;", "EXIT ;", "BRA 0xffff;"]
    return "\n".join(f"        /*{16 * i:04x}*/                   {line}" for i, line in enumerate(lines))


def _loads(n: int) -> list[str]:
    return [f"LDG.E R{4 + i}, desc[UR4][R2.64+0x{4096 * i:x}] ;" for i in range(n)]


def test_a_rolled_loop_runs_its_body_once_per_trip() -> None:
    sass = _sass([*_loads(10), "FADD R3, R4, R5 ;"])  # body: 11 instructions and the branch
    assert triton_sass.loop_bodies(sass) == [(12, 10)]
    static = 2 + 12 + 1
    assert triton_sass.executed_per_thread("_dmol_nll_forward_kernel", sass, {"NUM_MIX": 10}) == static + 9 * 12


def test_an_unrolled_loop_runs_its_body_trips_over_copies_times() -> None:
    sass = _sass([*_loads(20), "FADD R3, R4, R5 ;", "FADD R3, R6, R7 ;"])  # two trips' loads per pass
    static = 2 + 23 + 1
    assert triton_sass.executed_per_thread("_dmol_nll_forward_kernel", sass, {"NUM_MIX": 10}) == static + 4 * 23


def test_a_body_that_is_no_whole_number_of_trips_is_not_counted() -> None:
    uneven = _sass(_loads(15))  # one and a half trips' loads
    assert triton_sass.executed_per_thread("_dmol_nll_forward_kernel", uneven, {"NUM_MIX": 10}) is None
    three = _sass(_loads(30))  # 3 trips per pass do not divide 10 trips
    assert triton_sass.executed_per_thread("_dmol_nll_forward_kernel", three, {"NUM_MIX": 10}) is None
