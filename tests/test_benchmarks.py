"""The benchmark suite's measurements and files: row schema, exact byte counts, speedups against the right
baseline, compile rows that really ran compiled code, timing statistics, failing backends as rows, the results
files and their merge, the parallel parity runner and the GPU check's dry run. Timings themselves are never
asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import ops_suite, parity, report, sample_suite, timing, train_suite
from vdvae_fast import ops

CPU = torch.device("cpu")
needs_cpu_kernels = pytest.mark.skipif(not ops.extension_built(), reason="vdvae_fast._C is not built")


ROOT = Path(__file__).resolve().parents[1]


def _case(op: str, shape: tuple[int, ...], backward: bool = True, dtype: torch.dtype = torch.float32) -> ops_suite.Case:
    return ops_suite.Case(op, shape, dtype, "contiguous", backward)


def test_bytes_moved_counts_each_tensor_the_op_must_touch() -> None:
    # dmol_nll: logits read (forward, again in backward), 3 float32 targets per pixel, one loss per image,
    # and the logits' gradient written once.
    logits_bytes, targets_bytes = 2 * 100 * 4 * 4 * 4, 2 * 3 * 4 * 4 * 4
    forward = logits_bytes + targets_bytes + 2 * 4
    assert ops_suite.bytes_moved(_case("dmol_nll", (2, 100, 4, 4), backward=False)) == forward
    assert ops_suite.bytes_moved(_case("dmol_nll", (2, 100, 4, 4))) == 2 * forward + logits_bytes
    # sample_and_kl: four parameters read and z written, a KL per image; backward reads the four and grad_z and
    # writes four gradients.
    tensor = 2 * 16 * 4 * 4 * 4
    assert ops_suite.bytes_moved(_case("sample_and_kl", (2, 16, 4, 4), backward=False)) == 5 * tensor + 2 * 4
    assert ops_suite.bytes_moved(_case("sample_and_kl", (2, 16, 4, 4))) == 14 * tensor + 2 * 4


@needs_cpu_kernels
def test_ops_suite_rows_measure_every_backend_against_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    small = [_case("dmol_nll", (2, 100, 8, 8)), _case("sample_and_kl", (2, 16, 8, 8), backward=False)]
    monkeypatch.setattr(ops_suite, "cases", lambda device, size: small)
    rows = ops_suite.run(CPU, size="tiny", with_compile=False)
    assert {(r["name"], r["backend"]) for r in rows} == {(c.op, b) for c in small for b in ("cpu", "original")}
    for row in rows:
        for key in ("suite", "name", "backend", "shape", "dtype", "layout", "mode", "bytes", "saved_bytes"):
            assert key in row, key
        assert 0 < row["min_ms"] <= row["median_ms"] and row["repeats"] >= 3 and row["spread_pct"] >= 0
    report.add_speedups(rows)
    by = {(r["name"], r["backend"]): r for r in rows}
    assert by["dmol_nll", "cpu"]["auto"] == "cpu"  # what the ops pick for the case, beside each kernel row
    assert by["dmol_nll", "original"]["speedup_vs_eager"] == 1.0
    assert by["dmol_nll", "cpu"]["speedup_vs_eager"] == pytest.approx(
        by["dmol_nll", "original"]["median_ms"] / by["dmol_nll", "cpu"]["median_ms"]
    )
    assert math.isnan(by["dmol_nll", "cpu"]["speedup_vs_compile"])  # compile was not run
    # The fused op saves exactly its inputs: the logits and the float32 targets.
    assert by["dmol_nll", "cpu"]["saved_bytes"] == 2 * 100 * 8 * 8 * 4 + 2 * 3 * 8 * 8 * 4
    assert by["dmol_nll", "original"]["saved_bytes"] > 4 * by["dmol_nll", "cpu"]["saved_bytes"]
    assert by["sample_and_kl", "cpu"]["saved_bytes"] == 0  # forward only


def test_op_cases_cover_both_layouts_and_dtypes_in_their_memory_format() -> None:
    found = ops_suite.cases(CPU, "quick")
    assert {c.op for c in found} == set(ops_suite.OPS)
    assert {(c.dtype, c.layout) for c in found} == {(d, lay) for d in ops_suite.DTYPES for lay in ops_suite.LAYOUTS}
    assert {c.shape for c in found if c.op == "dmol_nll"} == set(ops_suite.ROOFLINE_DMOL_SHAPES)
    assert {c.shape for c in found if c.op == "gaussian_kl"} == set(ops_suite.ROOFLINE_GAUSSIAN_SHAPES)
    case = ops_suite.Case("sample_and_kl", (2, 16, 4, 4), torch.bfloat16, "channels_last")
    for tensor in ops_suite.make_inputs(case, CPU, torch.Generator().manual_seed(0)):
        assert tensor.dtype == torch.bfloat16 and tensor.requires_grad
        assert tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()
    with pytest.raises(ValueError, match="size must be one of tiny, quick, full"):
        ops_suite.cases(CPU, "huge")


def test_each_compile_row_runs_its_own_compiled_graph() -> None:
    # One lambda per op, compiled once for every case, hit dynamo's recompile limit (dtype and grad-mode changes)
    # and then ran eager under the compile label. Two cases that differ in dtype and grad mode: both compiled.
    small = [
        _case("gaussian_kl", (2, 4, 4, 4), backward=False),
        _case("gaussian_kl", (2, 4, 4, 4), dtype=torch.bfloat16),
    ]
    plan = ops_suite.Plan(warmup=1, repeats=3, min_seconds=0.0)
    for case in small:
        row = ops_suite.measure(case, "compile", CPU, plan)
        assert "error" not in row, row.get("error")
        assert row["median_ms"] > 0 and row["backend"] == "compile"


def test_a_compile_row_that_ran_eager_is_a_failed_row() -> None:
    plan = ops_suite.Plan(warmup=1, repeats=3, min_seconds=0.0)
    with torch.compiler.set_stance("force_eager"):  # what dynamo's fallback does: the calls run uncompiled
        row = ops_suite.measure(_case("gaussian_kl", (2, 4, 4, 4), backward=False), "compile", CPU, plan)
    assert "median_ms" not in row
    assert row["error"].startswith("RuntimeError: torch.compile fell back to eager: 0 of")
    compiled = ops_suite.CompiledCalls(lambda a: (a * 2).sin())
    compiled(torch.ones(3))
    compiled.check()  # compiled and ran compiled: no error
    assert (compiled.graphs, compiled.calls, compiled.compiled_runs) == (1, 1, 1)


def test_a_failing_backend_gives_a_row_with_its_error_and_the_suite_goes_on() -> None:
    rows = ops_suite.run(CPU, size="tiny", backends=["no-such-backend", "original"], with_compile=False)
    assert len(rows) == 2 * len(ops_suite.cases(CPU, "tiny"))
    failed = [r for r in rows if r["backend"] == "no-such-backend"]
    assert all("unknown backend 'no-such-backend'" in r["error"] and "median_ms" not in r for r in failed)
    assert all("median_ms" in r for r in rows if r["backend"] == "original")
    table = report.markdown(_results(rows))
    assert "ValueError: unknown backend 'no-such-backend'" in table


def test_timing_reports_median_min_and_spread_and_flags_a_wide_spread() -> None:
    steady = timing.summarize([10.0, 10.2, 9.9, 10.1, 10.0])
    assert (steady.median_ms, steady.min_ms, steady.repeats) == (10.0, 9.9, 5)
    assert steady.spread_pct == pytest.approx(100 * (10.1 - 10.0) / 10.0)  # inclusive quartiles 10.0 and 10.1
    assert not steady.unstable and "unstable" not in steady.fields()
    noisy = timing.summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert noisy.median_ms == 3.0 and noisy.spread_pct == pytest.approx(100 * (4.0 - 2.0) / 3.0)
    assert noisy.unstable and noisy.fields()["unstable"] is True
    row = {"suite": "sample", "name": "tiny", "backend": "cpu", "batch": 2, "dtype": "float32", **noisy.fields()}
    table = report.markdown(_results([row]))
    assert "| (3) |" in table and "unstable: IQR 67% of the median" in table  # flagged, not printed as a fact
    calls = []
    measured = timing.time_calls(lambda: calls.append(1), [()], CPU, warmup=2, repeats=4)
    assert measured.repeats == 4 and len(calls) == 6
    with pytest.raises(ValueError, match="no timed calls"):
        timing.summarize([])


def test_add_bandwidth_divides_bytes_by_time_and_by_the_device_bandwidth() -> None:
    rows = [{"bytes": 2_000_000, "median_ms": 1.0}, {"images_per_s": 3.0}]
    report.add_bandwidth(rows, bandwidth_gbps=4.0)
    assert rows[0]["gbps"] == pytest.approx(2.0)
    assert rows[0]["pct_bandwidth"] == pytest.approx(50.0)
    assert "gbps" not in rows[1]


def test_train_step_rows_compare_configurations_at_equal_batch() -> None:
    plan = train_suite.Plan(warmup=0, repeats=1)
    best = train_suite.Config("best", precision="bf16", grad_checkpoint="all")
    rows = [train_suite.measure("tiny", config, 2, CPU, plan) for config in (train_suite.BASELINE, best)]
    finished = train_suite._finish(rows, peak_tflops=None)
    baseline, lean = finished
    assert baseline["config"] == "baseline" and baseline["speedup_vs_baseline"] == 1.0
    assert lean["speedup_vs_baseline"] == pytest.approx(baseline["median_ms"] / lean["median_ms"])
    assert lean["saved_bytes"] < baseline["saved_bytes"] / 3  # bf16 and recomputation keep far less
    assert baseline["flops"] == 2 * train_suite.flops_per_image("tiny") > 0
    assert baseline["images_per_s"] == pytest.approx(2 / (baseline["median_ms"] * 1e-3))
    assert baseline["peak_mem_bytes"] is None and baseline["mfu"] is None  # no device peak on a CPU


def test_a_configuration_that_fails_becomes_a_row_saying_why() -> None:
    broken = train_suite.Config("broken", backend="no-such-backend")
    row = train_suite._try("tiny", broken, 2, CPU, train_suite.Plan(0, 1), train_suite.Budget())
    assert math.isnan(row["images_per_s"])
    assert "no-such-backend" in row["note"] and row["note"].startswith("failed: ValueError")


def test_sample_suite_compares_the_fused_backend_with_the_original() -> None:
    rows = sample_suite.run(CPU, size="tiny")
    backends = [r["backend"] for r in rows]
    assert "original" in backends and "reference" not in backends
    for row in rows:
        assert row["images_per_s"] == pytest.approx(2 / (row["median_ms"] * 1e-3))
    report.add_speedups(rows)
    eager = next(r for r in rows if r["backend"] == "original")
    assert eager["speedup_vs_eager"] == 1.0


def test_sample_suite_records_a_failing_backend_and_measures_the_rest() -> None:
    rows = sample_suite.run(CPU, size="tiny", backends=["no-such-backend", "original"])
    failed, eager = rows
    assert "unknown backend 'no-such-backend'" in failed["error"] and math.isnan(failed["images_per_s"])
    assert eager["median_ms"] > 0 and "error" not in eager


def _results(rows: list[dict]) -> dict:
    environment = {"device": "Test Device (2 threads)", "torch": "x", "triton": None, "cuda": None}
    environment.update(commit="abc", date="today", device_type="cpu")
    return {"environment": environment, "bandwidth_gbps": 10.0, "peak_tflops": 1.0, "rows": rows}


def test_results_files_merge_suites_and_hold_a_table_and_a_plot(tmp_path) -> None:
    ops_row = {"suite": "ops", "name": "dmol_nll", "mode": "fwd", "shape": [1, 10, 2, 2], "dtype": "float32"}
    ops_row.update(layout="contiguous", backend="cpu", median_ms=1.0, speedup_vs_eager=3.0)
    train_row = {"suite": "train", "name": "cifar10", "config": "fused", "batch": 4, "dtype": "float32"}
    train_row.update(median_ms=2000.0, images_per_s=2.0, speedup_vs_baseline=1.2)
    path = report.write(_results([ops_row]), tmp_path)
    assert path.name == "test-device-2-threads.json"
    report.write(_results([train_row]), tmp_path)  # a later run of another suite keeps the first one's rows
    saved = json.loads(path.read_text())
    assert [r["suite"] for r in saved["rows"]] == ["ops", "train"]
    table = path.with_suffix(".md").read_text()
    assert "| dmol_nll | fwd | 1×10×2×2 | float32 | contiguous | cpu | 1 |" in table
    assert "| cifar10 | fused | 4 | float32 | 2,000 |  |  | 2 |" in table
    plotted = importlib.util.find_spec("matplotlib") is not None  # a dependency, but a machine may lack it
    assert path.with_suffix(".png").exists() == plotted
    if plotted:
        assert path.with_suffix(".png").stat().st_size > 0
    report.write(_results([{**ops_row, "median_ms": 5.0}]), tmp_path)  # a row measured again replaces the old one
    assert [r["median_ms"] for r in json.loads(path.read_text())["rows"]] == [2000.0, 5.0]
    eager = {**ops_row, "backend": "original", "median_ms": 20.0}  # a later stage adds a backend to the same case
    report.write(_results([eager]), tmp_path)
    rows = json.loads(path.read_text())["rows"]
    assert [r["median_ms"] for r in rows] == [2000.0, 5.0, 20.0]
    assert rows[1]["speedup_vs_eager"] == pytest.approx(4.0)  # speedups come from the merged rows


def test_the_fastest_kernel_backend_per_case_is_set_beside_what_auto_picks() -> None:
    def row(backend: str, shape: list[int], ms: float, layout: str = "contiguous") -> dict:
        found = {"suite": "ops", "name": "dmol_nll", "mode": "fwd+bwd", "shape": shape, "dtype": "float32"}
        found.update(layout=layout, backend=backend, median_ms=ms, auto="cuda")
        return found

    rows = [row("cuda", [4, 100, 8, 8], 2.0), row("triton", [4, 100, 8, 8], 1.0), row("cuda", [32, 100, 8, 8], 8.0)]
    rows += [row("triton", [32, 100, 8, 8], 2.0), row("original", [32, 100, 8, 8], 0.1)]  # eager is no candidate
    rows += [row("cuda", [4, 100, 8, 8], 1.0, "channels_last"), {**row("triton", [4, 100, 8, 8], 0, "channels_last")}]
    del rows[-1]["median_ms"]  # triton failed in channels_last: cuda is the only one measured there
    rows[-1]["error"] = "RuntimeError: failed"
    found = {w["layout"]: w for w in report.winners(rows)}
    assert found["contiguous"]["winner"] == "triton" and found["contiguous"]["auto"] == "cuda"
    assert found["contiguous"]["geomean_ms"] == pytest.approx({"cuda": 4.0, "triton": math.sqrt(2.0)})
    assert found["channels_last"]["winner"] == "cuda" and found["channels_last"]["cases"] == 1
    table = report.markdown(_results(rows))
    assert "| dmol_nll | contiguous | float32 | 2 | cuda 4, triton 1.41 | triton | cuda (not the fastest) |" in table


@needs_cpu_kernels
def test_command_line_writes_the_results_of_a_quick_ops_run(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops_suite, "cases", lambda device, size: [_case("gaussian_kl", (2, 4, 4, 4))])
    monkeypatch.setattr(cli, "copy_bandwidth_gbps", lambda device: 10.0)
    monkeypatch.setattr(cli, "matmul_peak_tflops", lambda device: 1.0)
    cli.main(["--suite", "ops", "--no-compile", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("*.json")
    saved = json.loads(path.read_text())
    assert saved["environment"]["torch"] == torch.__version__
    assert {r["backend"] for r in saved["rows"]} == {"cpu", "original"}
    assert all(r["pct_bandwidth"] == pytest.approx(10 * r["gbps"]) for r in saved["rows"])


def test_only_measures_the_cases_whose_label_contains_a_text(monkeypatch: pytest.MonkeyPatch) -> None:
    found = [_case("gaussian_kl", (2, 4, 4, 4)), _case("sample_gaussian", (2, 4, 4, 4), backward=False)]
    monkeypatch.setattr(ops_suite, "cases", lambda device, size: found)
    measured = []
    monkeypatch.setattr(ops_suite, "measure", lambda case, label, device, plan: measured.append((case.op, label)) or {})
    monkeypatch.setattr(ops_suite, "_print", lambda row: None)
    ops_suite.run(CPU, size="tiny", backends=["cpu"], only=["sample_gaussian fwd 2x4x4x4"])
    assert measured == [("sample_gaussian", "cpu")]
    with pytest.raises(ValueError, match="no tiny op case matches --only dmol.*labels read like gaussian_kl fwd"):
        ops_suite.run(CPU, size="tiny", backends=["cpu"], only=["dmol"])


def test_command_line_help_describes_every_option() -> None:
    parser = cli.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    text = " ".join(parser.format_help().split())
    for option in (
        "--suite",
        "--out",
        "--device",
        "--quick",
        "--tiny",
        "--backends",
        "--no-compile",
        "--budget-s",
        "--only",
    ):
        assert option in text
    assert "folder of the results files" in text and "torch device to measure on" in text


@needs_cpu_kernels
def test_profile_of_a_step_finds_the_fused_ops_only_in_a_fused_step() -> None:
    from benchmarks import profile_step

    fused = next(c for c in train_suite.CONFIGS if c.name == "fused")
    names = profile_step.fused_ops(profile_step.profile("tiny", fused, 2, CPU).key_averages())
    for op in ("dmol_nll", "sample_and_kl"):  # the model's loss and every stochastic layer, forward and backward
        assert f"vdvae_fast::{op}_forward" in names and f"vdvae_fast::{op}_backward" in names
    baseline = profile_step.fused_ops(profile_step.profile("tiny", train_suite.BASELINE, 2, CPU).key_averages())
    assert baseline == []  # the original ops are plain PyTorch


def test_parity_runner_keeps_each_kernel_variant_in_one_process() -> None:
    ids = [
        f"{parity.TEST_FILE}::test_op_matches_the_reference[{backend}-{op}-float32-contiguous-{sides}]"
        for backend in ("triton", "cuda")
        for op in ("dmol_nll", "gaussian_kl", "dmol_sample")
        for sides in ("1x1x1", "3x7x9", "4x64x64")
    ]
    buckets = parity.split(ids, jobs=4)
    assert len(buckets) == 4 and sorted(i for b in buckets for i in b) == sorted(ids)  # disjoint, complete
    owner = {parity.variant(i): n for n, bucket in enumerate(buckets) for i in bucket}
    assert all(parity.variant(i) in owner for i in ids) and len(owner) == 6
    for n, bucket in enumerate(buckets):
        assert all(owner[parity.variant(i)] == n for i in bucket)
    assert len(parity.split(ids, jobs=64)) == 6  # never more processes than variants


@needs_cpu_kernels
@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_stage_on_the_cpu(tmp_path) -> None:
    # The stages' time limits are lifted: on a loaded machine they would cut stages short, and this test is about
    # every command of the GPU check running, not about how long it takes. The ops suite's budget is spent at once,
    # so that one torch.compile row runs and the others are skipped as a spent budget skips them.
    limits = {"BUDGET_S": "1800", "BUILD_S": "600", "PARITY_S": "600", "TRAIN_BUDGET_S": "600", "OPS_BUDGET_S": "0"}
    env = {**os.environ, "OUT": str(tmp_path), **limits}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "run_gpu.sh"), "--dry-run"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    files = list(tmp_path.rglob("*"))
    assert len(files) <= 8 and all(f.parent == tmp_path and f.is_file() for f in files)
    names = {f.name for f in files}
    assert {"run_gpu.log", "build.log", "tests.log", "bench.log"} <= names
    (results,) = tmp_path.glob("*.json")
    rows = json.loads(results.read_text())["rows"]
    ops_backends = {r["backend"] for r in rows if r["suite"] == "ops" and "median_ms" in r}
    assert {"triton", "original", "cpu"} <= ops_backends
    compile_rows = [r for r in rows if r["backend"] == "compile"]
    assert compile_rows and all("median_ms" in r or r["error"] == "skipped: time budget spent" for r in compile_rows)
    train = {(r["config"], r["batch"]) for r in rows if r["suite"] == "train" and "median_ms" in r}
    assert {("baseline", 2), ("best", 2), ("baseline", 4), ("best", 4)} <= train  # the batch sweeps ran
    largest = [r["note"] for r in rows if r["suite"] == "train" and r.get("note", "").startswith("largest batch")]
    assert largest == ["largest batch: batch cap 4 reached: at least this fits"] * 2
    log = (tmp_path / "tests.log").read_text()
    assert "quick parity tests of triton: all passed" in log and "quick parity tests of cpu: all passed" in log
    assert "fastest kernel backend" in (tmp_path / "run_gpu.log").read_text()
    assert "0 stage(s) failed" in done.stdout


@needs_cpu_kernels
def test_call_overhead_prints_a_row_per_op_with_both_backends(capsys) -> None:
    from benchmarks import call_overhead

    call_overhead.main(["--calls", "3"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == ["sample_gaussian", "sample_and_kl", "gaussian_kl", "dmol_nll"]
    assert all(float(cell) > 0 for row in rows for cell in row.split("|")[2:4])
    with pytest.raises(SystemExit):
        call_overhead.main(["--calls", "0"])
