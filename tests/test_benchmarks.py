"""The benchmark suite's measurements and files: row schema, exact byte counts, speedups against the right
baseline, the results files and their merge. Timings themselves are never asserted."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import ops_suite, report, sample_suite, train_suite
from vdvae_fast import ops

CPU = torch.device("cpu")
needs_cpu_kernels = pytest.mark.skipif(not ops.extension_built(), reason="vdvae_fast._C is not built")


def _case(op: str, shape: tuple[int, ...], backward: bool = True) -> ops_suite.Case:
    return ops_suite.Case(op, "imagenet64", shape, torch.float32, backward)


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
    monkeypatch.setattr(ops_suite, "cases", lambda device, quick: small)
    rows = ops_suite.run(CPU, with_compile=False)
    assert {(r["name"], r["backend"]) for r in rows} == {(c.op, b) for c in small for b in ("cpu", "original")}
    for row in rows:
        for key in ("suite", "name", "backend", "shape", "dtype", "mode", "median_ms", "bytes", "saved_bytes"):
            assert key in row, key
        assert row["median_ms"] > 0
    by = {(r["name"], r["backend"]): r for r in rows}
    assert by["dmol_nll", "original"]["speedup_vs_eager"] == 1.0
    assert by["dmol_nll", "cpu"]["speedup_vs_eager"] == pytest.approx(
        by["dmol_nll", "original"]["median_ms"] / by["dmol_nll", "cpu"]["median_ms"]
    )
    assert math.isnan(by["dmol_nll", "cpu"]["speedup_vs_compile"])  # compile was not run
    # The fused op saves exactly its inputs: the logits and the float32 targets.
    assert by["dmol_nll", "cpu"]["saved_bytes"] == 2 * 100 * 8 * 8 * 4 + 2 * 3 * 8 * 8 * 4
    assert by["dmol_nll", "original"]["saved_bytes"] > 4 * by["dmol_nll", "cpu"]["saved_bytes"]
    assert by["sample_and_kl", "cpu"]["saved_bytes"] == 0  # forward only


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


def test_sample_suite_compares_the_fused_backend_with_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sample_suite, "CPU_CASES", (("tiny", 2),))
    rows = sample_suite.run(CPU, quick=False)
    backends = [r["backend"] for r in rows]
    assert "original" in backends and "reference" not in backends
    for row in rows:
        assert row["images_per_s"] == pytest.approx(2 / (row["median_ms"] * 1e-3))
    eager = next(r for r in rows if r["backend"] == "original")
    assert eager["speedup_vs_eager"] == 1.0


def _results(rows: list[dict]) -> dict:
    environment = {"device": "Test Device (2 threads)", "torch": "x", "triton": None, "cuda": None}
    environment.update(commit="abc", date="today", device_type="cpu")
    return {"environment": environment, "bandwidth_gbps": 10.0, "peak_tflops": 1.0, "rows": rows}


def test_results_files_merge_suites_and_hold_a_table_and_a_plot(tmp_path) -> None:
    ops_row = {"suite": "ops", "name": "dmol_nll", "mode": "fwd", "shape": [1, 10, 2, 2], "dtype": "float32"}
    ops_row.update(backend="cpu", median_ms=1.0, speedup_vs_eager=3.0)
    train_row = {"suite": "train", "name": "cifar10", "config": "fused", "batch": 4, "dtype": "float32"}
    train_row.update(median_ms=2000.0, images_per_s=2.0, speedup_vs_baseline=1.2)
    path = report.write(_results([ops_row]), tmp_path)
    assert path.name == "test-device-2-threads.json"
    report.write(_results([train_row]), tmp_path)  # a later run of another suite keeps the first one's rows
    saved = json.loads(path.read_text())
    assert [r["suite"] for r in saved["rows"]] == ["ops", "train"]
    table = path.with_suffix(".md").read_text()
    assert "| dmol_nll | fwd | 1×10×2×2 | float32 | cpu | 1 |" in table
    assert "| cifar10 | fused | 4 | float32 | 2,000 | 2 |" in table
    plotted = importlib.util.find_spec("matplotlib") is not None  # optional: the bench extra
    assert path.with_suffix(".png").exists() == plotted
    if plotted:
        assert path.with_suffix(".png").stat().st_size > 0
    report.write(_results([{**ops_row, "median_ms": 5.0}]), tmp_path)  # the same suite again replaces its rows
    assert [r["median_ms"] for r in json.loads(path.read_text())["rows"]] == [2000.0, 5.0]


@needs_cpu_kernels
def test_command_line_writes_the_results_of_a_quick_ops_run(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops_suite, "cases", lambda device, quick: [_case("gaussian_kl", (2, 4, 4, 4))])
    monkeypatch.setattr(cli, "copy_bandwidth_gbps", lambda device: 10.0)
    monkeypatch.setattr(cli, "matmul_peak_tflops", lambda device: 1.0)
    cli.main(["--suite", "ops", "--no-compile", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("*.json")
    saved = json.loads(path.read_text())
    assert saved["environment"]["torch"] == torch.__version__
    assert {r["backend"] for r in saved["rows"]} == {"cpu", "original"}
    assert all(r["pct_bandwidth"] == pytest.approx(10 * r["gbps"]) for r in saved["rows"])


@needs_cpu_kernels
def test_profile_of_a_step_reports_the_share_of_the_fused_ops(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import profile_step

    profile_step.main(["--hps", "tiny", "--config", "fused", "--batch", "2", "--device", "cpu"])
    share = float(capsys.readouterr().out.splitlines()[-1].split("fused ops ")[1].split("%")[0])
    assert 0 < share < 100  # the custom ops ran inside the profiled step
    profile_step.main(["--hps", "tiny", "--config", "baseline", "--batch", "2", "--device", "cpu"])
    assert "fused ops 0.0%" in capsys.readouterr().out  # the original ops are plain PyTorch
